"""The user event pool: connect (auth, then kick and CONNACK), send, recvack, ping, close.

Sharded by uid, so one user's connects, sends and closes are handled in order. A send leaves this pool as
soon as it is decrypted, verified and rate-checked: the channel pool takes it from there, and the SENDACK
is written when the commit comes back, so the user shard never waits on Raft.

Sends arrive as one `SendBatch` per socket read; the `send` chain runs on each (a rejected one is answered
at once, in order) and the accepted ones go on to the channel pool as one event per channel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from node.cluster.presence import Presence, login_replaces, replace_older
from node.config import Config
from node.gateway.connection import Connection
from node.gateway.events import (
    CLOSE,
    CONNECT,
    PING,
    RECVACK,
    RECVACK_BATCH,
    SEND,
    SEND_BATCH,
    ConnectEvent,
    ConnEvent,
    RecvackBatch,
    RecvackEvent,
    SendBatch,
    SendEvent,
)
from node.gateway.registry import Registry
from node.pools.channel import SEND as CHANNEL_SEND
from node.pools.channel import ChannelSend, open_send, submit_sends
from node.pools.eventbus import EventPool
from node.wire.crypto import CryptoError, Session, generate_keypair, msg_key_matches, random_salt
from node.wire.protocol import (
    I64_MAX,
    I64_MIN,
    SETTING_NO_ENCRYPT,
    Connack,
    Pong,
    Reason,
    Sendack,
    negotiate_version,
)
from raft.commands import CHANNEL_PERSON, MAX_UID_BYTES, valid_uid
from storage.keys import channel_key
from storage.store import Store


@dataclass
class UserContext:
    config: Config
    node_numeric_id: int
    store: Store
    registry: Registry
    channel_pool: EventPool[Any]
    presence: Presence


# -- connect ---------------------------------------------------------------------------------------------
async def auth(ctx: UserContext, ev: ConnectEvent) -> int | None:
    packet = ev.packet
    if not packet.uid or len(packet.uid.encode()) > MAX_UID_BYTES or not valid_uid(packet.uid):
        return Reason.AUTH_FAIL
    if ctx.config.encryption and ev.conn.has_key_exchange and not packet.client_key:
        return Reason.CLIENT_KEY_IS_EMPTY
    with ctx.store.read() as txn:
        user = txn.user(packet.uid) if ctx.config.token_auth else None
        person = txn.channel(channel_key(packet.uid, CHANNEL_PERSON)) or {}
    if ctx.config.token_auth:
        tokens = (user or {}).get("tokens", {})
        expected = tokens.get(str(packet.device_flag))
        if not expected or not msg_key_matches(expected, packet.token):
            return Reason.AUTH_FAIL
        ev.conn.device_level = (user or {}).get("levels", {}).get(str(packet.device_flag), 0)
    if person.get("ban"):
        return Reason.BAN  # a banned user (`/channel/info` ban on its person channel), as WuKongIM
    return None


async def uid_limit(ctx: UserContext, ev: ConnectEvent) -> int | None:
    """At most `connections_per_uid` connections of one uid on this node (each can hold its own queues):
    past it, CONNACK reason 22. Counted as the login would leave them, so a reconnect of a device that
    replaces its older connection is never refused."""
    packet, level = ev.packet, ev.conn.device_level
    staying = sum(
        1
        for older in ctx.registry.of_uid(packet.uid)
        if older.device_flag != packet.device_flag
        or login_replaces(older.device_id, packet.device_id, level) is None
    )
    if staying >= ctx.config.tuning.connections_per_uid:
        return Reason.RATE_LIMIT
    return None


def kick_older(registry: Registry, conn: Connection) -> None:
    """A login replaces older ones of its uid and device flag by WuKongIM's device-level rules."""
    replace_older(registry, conn.uid, conn.device_flag, conn.device_id, conn.device_level, keep=conn)


async def connack(ctx: UserContext, ev: ConnectEvent) -> int | None:
    """The last step of the chain: the only one that changes sessions, once every check has passed.

    Whatever can still refuse the login (the key exchange) or fail (encoding the CONNACK) comes first:
    a refused CONNECT must never have kicked the live session of its uid and device flag.
    """
    conn, packet = ev.conn, ev.packet
    session, server_key, salt = None, "", ""
    if ctx.config.encryption and conn.has_key_exchange:
        private_key, server_key = generate_keypair()
        salt = random_salt()
        try:
            session = Session.from_keys(private_key, packet.client_key, salt)
        except CryptoError:
            return Reason.CLIENT_KEY_IS_EMPTY
    # Any i64 is a valid client_timestamp (the Go SDK even sends seconds), so the difference can leave
    # CONNACK's i64: clamp it rather than fail the login over a clock.
    time_diff = min(max(int(time.time() * 1000) - packet.client_timestamp, I64_MIN), I64_MAX)
    version = negotiate_version(packet.version)
    frame = conn.encode(
        Connack(
            time_diff=time_diff,
            reason_code=Reason.SUCCESS,
            server_key=server_key,
            salt=salt,
            server_version=version,
            node_id=ctx.node_numeric_id,
        ),
        version,
    )
    conn.session = session
    conn.uid = packet.uid
    conn.device_flag = packet.device_flag
    conn.device_id = packet.device_id
    conn.version = version
    conn.authenticated = True
    conn.rate_tokens = float(ctx.config.tuning.send_burst)
    kick_older(ctx.registry, conn)
    ctx.registry.bind(conn)
    ctx.presence.online(conn)  # replicated in the background: the CONNACK does not wait for it
    conn.send_frame(frame)
    conn.auth_done.set()
    return None


async def reject_connect(ctx: UserContext, ev: ConnectEvent, reason: int) -> None:
    conn = ev.conn
    conn.version = negotiate_version(ev.packet.version)
    conn.send_packet(Connack(time_diff=0, reason_code=reason, server_version=conn.version))
    conn.close(None, f"connect refused ({Reason(reason).name.lower()})")
    conn.auth_done.set()


# -- send ------------------------------------------------------------------------------------------------
async def decrypt(ctx: UserContext, ev: SendEvent) -> int | None:
    packet, session = ev.packet, ev.conn.session
    if ev.trace is not None:
        ev.trace.mark("user_pool_wait")
    if session is None or packet.setting & SETTING_NO_ENCRYPT:
        ev.payload = packet.payload
        return None
    expected = session.send_msg_key(
        packet.client_seq, packet.client_msg_no, packet.channel_id, packet.channel_type, packet.payload
    )
    if not msg_key_matches(expected, packet.msg_key):
        return Reason.MSG_KEY_ERROR
    try:
        ev.payload = session.decrypt(packet.payload)
    except CryptoError:
        return Reason.PAYLOAD_DECODE_ERROR
    return None


async def rate_limit(ctx: UserContext, ev: SendEvent) -> int | None:
    """Token bucket per connection: a flood from one client is answered with reason 22."""
    tuning = ctx.config.tuning
    conn = ev.conn
    now = trio.current_time()
    conn.rate_tokens = min(
        float(tuning.send_burst), conn.rate_tokens + (now - conn.rate_stamp) * tuning.send_rate_per_s
    )
    conn.rate_stamp = now
    if conn.rate_tokens < 1.0:
        return Reason.RATE_LIMIT
    conn.rate_tokens -= 1.0
    return None


async def forward(ctx: UserContext, ev: SendEvent) -> int | None:
    """Hand the send to the channel pool under the channel's stored id (person channels: the fake id)."""
    packet = ev.packet
    send = open_send(
        sender=ev.conn.uid,
        channel_id=packet.channel_id,
        channel_type=packet.channel_type,
        client_msg_no=packet.client_msg_no,
        payload=ev.payload,
        setting=packet.setting,
        conn=ev.conn,
        client_seq=packet.client_seq,
        trace=ev.trace,
        header=packet.flags,  # RedDot, SyncOnce, NoPersist travel with the message (DUP is masked)
        expire=packet.expire,
        topic=packet.topic,
    )
    if isinstance(send, int):
        return send
    if ev.trace is not None:
        ev.trace.mark("user_pool")
    if ev.forwarded is not None:
        ev.forwarded.append(send)  # submitted with the rest of its batch (run_send_batch)
    else:
        await ctx.channel_pool.submit(send.route_key, CHANNEL_SEND, send)
    return None


async def run_send_batch(pool: EventPool[UserContext], batch: SendBatch) -> None:
    """The `send` chain on each SEND of one read, in order; then the accepted ones, one event per channel."""
    forwarded: list[ChannelSend] = []
    for ev in batch.sends:
        ev.forwarded = forwarded
        await pool.run_chain(SEND, ev)
    if forwarded:
        await submit_sends(pool.ctx.channel_pool, forwarded)


async def reject_send(ctx: UserContext, ev: SendEvent, reason: int) -> None:
    ev.conn.send_packet(Sendack(0, ev.packet.client_seq, 0, reason))


# -- recvack, ping, close --------------------------------------------------------------------------------
async def recvack(ctx: UserContext, ev: RecvackEvent) -> int | None:
    ev.conn.untrack_recv(ev.packet.message_id)
    return None


async def run_recvack_batch(pool: EventPool[UserContext], batch: RecvackBatch) -> None:
    """The `recvack` chain on each RECVACK of one read, in order."""
    for ack in batch.acks:
        await pool.run_chain(RECVACK, ack)


async def ping(ctx: UserContext, ev: ConnEvent) -> int | None:
    ev.conn.send_packet(Pong())
    return None


async def close(ctx: UserContext, ev: ConnEvent) -> int | None:
    ctx.registry.remove(ev.conn)
    if ev.conn.authenticated:
        ctx.presence.offline(ev.conn)
    return None


def build_user_pool(ctx: UserContext) -> EventPool[UserContext]:
    tuning = ctx.config.tuning
    pool: EventPool[UserContext] = EventPool(
        "user",
        ctx,
        shards=tuning.user_pool_shards,
        queue_size=tuning.pool_queue_size,
        handler_timeout_s=tuning.handler_timeout_s,
        handler_retries=tuning.handler_retries,
        dead_letters_max=tuning.dead_letters_max,
    )
    pool.event_type(CONNECT, on_reject=reject_connect)
    pool.register(CONNECT, "auth", auth, retries=0, timeout_s=None)
    pool.register(CONNECT, "uid_limit", uid_limit, retries=0, timeout_s=None)
    pool.register(CONNECT, "connack", connack, retries=0, timeout_s=None)
    pool.event_type(SEND, on_reject=reject_send)
    pool.register(SEND, "decrypt", decrypt, retries=0, timeout_s=None)
    pool.register(SEND, "rate_limit", rate_limit, retries=0, timeout_s=None)
    # forward may wait on a full channel pool (backpressure); that is not a failure to retry.
    pool.register(SEND, "forward", forward, retries=0, timeout_s=None)
    pool.batch_event_type(SEND_BATCH, run_send_batch)
    pool.register(RECVACK, "recvack", recvack, timeout_s=None)
    pool.batch_event_type(RECVACK_BATCH, run_recvack_batch)
    pool.register(PING, "ping", ping, timeout_s=None)
    pool.register(CLOSE, "close", close, timeout_s=None)
    return pool
