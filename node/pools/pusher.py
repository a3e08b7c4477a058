"""The pusher event pool: RECV to this node's online devices, resends until RECVACK, offline notices.

Sharded by recipient uid. Each node pushes only to its own connections; every node applies every committed
message, so every node runs this for its own clients. The payload is encrypted once per connection (each
connection has its own key), and a RECV that is not acknowledged is resent with DUP by `resend_due`.

The committed stream hands this pool one `PushBatch` per shard per Raft entry (event type `push_batch`);
the `push` chain runs on each `PushEvent` (one message, its recipients on this shard) in log order, so the
RECVs of one channel reach a connection in message_seq order.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.config import Tuning
from node.gateway.connection import Connection
from node.gateway.registry import Registry
from node.pools.eventbus import EventPool
from node.trace import Trace
from node.wire.protocol import (
    FLAG_NO_PERSIST,
    FLAG_RED_DOT,
    SETTING_NO_ENCRYPT,
    SETTING_STREAM,
    Recv,
)
from raft.apply import Result
from raft.commands import CHANNEL_AGENT, CHANNEL_PERSON, SYSTEM_UID, person_peer

PUSH = "push"
PUSH_BATCH = "push_batch"
# The built-in handlers of the `push` chain. With only these on it, a node skips recipients it has no
# device of (committed.py): neither would do anything for them.
BUILTIN_PUSH = ("push_online", "offline_notice")


@dataclass(slots=True)
class PushEvent:
    op: dict[str, Any]
    result: Result
    uids: list[str]
    # The connection that sent the message, when this node took the send (0: over HTTP); None elsewhere.
    origin_conn: int | None = None
    offline: list[str] = field(default_factory=list)
    trace: Trace | None = None  # a sampled delivery's latency trace (node/trace.py)


@dataclass(slots=True)
class PushBatch:
    """The pushes of one Raft entry for one shard, in log order."""

    pushes: list[PushEvent]


@dataclass
class PushContext:
    tuning: Tuning
    registry: Registry
    online_among: Callable[[list[str]], set[str]]  # those online anywhere in the cluster (presence)
    delivered: int = 0
    resent: int = 0
    expired: int = 0
    offline_notices: int = 0
    # When the RECVs being pushed fall due for a resend: set once per batch (`run_push_batch`), since a
    # clock reading per message cost three Python calls on every node.
    resend_due_at: float = 0.0
    # The most recent offline recipients, for inspection until webhooks deliver them.
    recent_offline: collections.deque[tuple[int, str]] = field(
        default_factory=lambda: collections.deque(maxlen=1000)
    )


def recv_frame(conn: Connection, op: dict[str, Any], result: Result, recipient: str) -> bytes:
    """The RECV of one message for one connection, encrypted with that connection's key."""
    # A person channel shows the other party: the receiver sees the sender, the sender's other devices
    # see the receiver. An agent channel shows the id the sender addressed, to both parties (WuKongIM's
    # RECV carries the SEND's channel_id and adjusts person channels only).
    channel_id = op["cid"]
    if op["ct"] == CHANNEL_PERSON:
        channel_id = person_peer(channel_id, recipient)
    elif op["ct"] == CHANNEL_AGENT:
        channel_id = op["to"]
    # WuKongIM (`event_pushonline.go`) shows the system sender as "" and raises no red dot on the
    # sender's own other devices.
    from_uid = "" if op["from"] == SYSTEM_UID else op["from"]
    flags = int(op.get("hf", 0))
    if recipient == op["from"]:
        flags &= ~FLAG_RED_DOT
    payload = op["payload"]
    setting = op["setting"]
    if setting & SETTING_STREAM and not conn.takes_events:
        # The anchor of a streamed message (`/message/send is_stream`), to a client that cannot read its
        # events: an ordinary message. Versions 2-4 would get stream fields in the RECV, which the 1.x JS
        # SDK (stream at 0x04, another order) misreads as the message id and the rest.
        setting &= ~SETTING_STREAM
    msg_key = ""
    if conn.session is not None and not setting & SETTING_NO_ENCRYPT:
        payload = conn.session.encrypt(payload)
        msg_key = conn.session.recv_msg_key(
            result["mid"], result["seq"], op["cmn"], op["ts"], from_uid, channel_id, op["ct"], payload
        )
    packet = Recv(
        setting=setting,
        msg_key=msg_key,
        from_uid=from_uid,
        channel_id=channel_id,
        channel_type=op["ct"],
        client_msg_no=op["cmn"],
        message_id=result["mid"],
        message_seq=result["seq"],
        timestamp=op["ts"],
        payload=payload,
        expire=int(op.get("exp", 0)),
        topic=op.get("tp", ""),
        flags=flags,
    )
    return conn.encode(packet)


async def push_online(ctx: PushContext, ev: PushEvent) -> int | None:
    tuning = ctx.tuning
    due = ctx.resend_due_at
    # A no_persist message is not resent (WuKongIM retries stored messages only): it cannot be synced
    # either, so a RECV lost with its connection is simply gone, as the sender asked.
    resend = not int(ev.op.get("hf", 0)) & FLAG_NO_PERSIST
    # A traced delivery's events (one per shard) share one trace: the first RECV queued claims it.
    trace, ev.trace = ev.trace, None
    taken = time.perf_counter() if trace is not None else 0.0
    by_uid = ctx.registry.by_uid
    for uid in ev.uids:
        conns = by_uid.get(uid)
        if not conns:
            ev.offline.append(uid)
            continue
        for conn in conns:
            if conn.id == ev.origin_conn:
                continue  # never echo a message to the device that sent it
            frame = recv_frame(conn, ev.op, ev.result, uid)
            if conn.send_frame(frame):
                if resend:
                    conn.track_recv(ev.result["mid"], frame, due, tuning.recv_inflight_max)
                ctx.delivered += 1
                if trace is not None:
                    if not trace.claimed:
                        trace.claimed = True
                        trace.mark("push_wait", taken)
                        trace.mark("push")
                        conn.trace_next_write(trace, "recv_write")
                    trace = None
    return None


async def offline_notice(ctx: PushContext, ev: PushEvent) -> int | None:
    """Recipients with no device anywhere in the cluster, counted once: on the node that took the send.

    A step after push_online, run inline: as an observer it cost a queue hop and a task switch per
    message on every node, for a check that is nearly always "nothing to do". It never rejects.
    """
    if ev.origin_conn is None or not ev.offline or ev.op["ct"] == CHANNEL_AGENT:
        return None  # WuKongIM counts nobody offline on an agent channel (no msg.offline either)
    online = ctx.online_among(ev.offline)  # one read for all (a group's: hundreds on other nodes)
    for uid in ev.offline:
        if uid in online:
            continue
        ctx.offline_notices += 1
        ctx.recent_offline.append((ev.result["mid"], uid))
    return None


async def run_push_batch(pool: EventPool[PushContext], batch: PushBatch) -> None:
    pool.ctx.resend_due_at = trio.current_time() + pool.ctx.tuning.recv_resend_interval_s
    for push in batch.pushes:
        await pool.run_chain(PUSH, push)


def resend_due(ctx: PushContext, now: float) -> None:
    """Resend every RECV whose RECVACK is overdue, with DUP set; give up after the configured attempts."""
    tuning = ctx.tuning
    for conn in ctx.registry:
        if not conn.inflight:
            continue
        for message_id, item in list(conn.inflight.items()):
            if item.due > now:
                continue
            if item.attempts >= tuning.recv_resend_attempts:
                conn.untrack_recv(message_id)
                ctx.expired += 1
                continue
            item.attempts += 1
            item.due = now + tuning.recv_resend_interval_s
            if conn.send_frame(item.frame):
                ctx.resent += 1


def build_pusher_pool(ctx: PushContext) -> EventPool[PushContext]:
    tuning = ctx.tuning
    pool: EventPool[PushContext] = EventPool(
        "pusher",
        ctx,
        shards=tuning.pusher_pool_shards,
        queue_size=tuning.pool_queue_size,
        handler_timeout_s=tuning.handler_timeout_s,
        handler_retries=tuning.handler_retries,
        dead_letters_max=tuning.dead_letters_max,
    )
    pool.event_type(PUSH)
    # Not retried: a second run would push the same RECV twice; resends are the DUP mechanism's job.
    pool.register(PUSH, "push_online", push_online, retries=0, timeout_s=None)
    pool.register(PUSH, "offline_notice", offline_notice, retries=0, timeout_s=None, on_error="skip")
    pool.batch_event_type(PUSH_BATCH, run_push_batch)
    return pool
