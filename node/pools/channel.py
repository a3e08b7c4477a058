"""The channel event pool: permission and store (batch into Raft).

Sharded by channel. Sends arrive as one `ChannelSendBatch` per channel and socket read (event type
`send_batch`); the `send` chain runs on each send inside it. A channel has at most one batch in flight:
sends that arrive meanwhile wait in its pending list and go together in the next batch. So sends of one
connection to one channel keep their order in message_seq even when a proposal has to be retried, and a
busy channel gets larger batches, not more. The proposer merges the batches of all channels into shared
Raft entries.

Committed messages do not come back through this pool: the committed stream (committed.py) finds their
recipients and hands them to the pusher pool per entry. It runs the `distribute` chain per message only
when a plugin is on it, so plugin observers still see every committed message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.cluster.ids import Snowflake
from node.cluster.proposer import Proposer
from node.config import Tuning
from node.gateway.connection import Connection
from node.pools.eventbus import EventPool
from node.trace import Trace
from node.wire.protocol import Reason, Sendack
from raft.apply import Result
from raft.commands import (
    CHANNEL_PERSON,
    CHANNEL_TEMP,
    HF_ALL,
    MAX_UID_BYTES,
    PAIR_CHANNEL_TYPES,
    SUPPORTED_CHANNEL_TYPES,
    BadCommand,
    Op,
    agent_channel_id,
    person_channel_id,
    send_op,
    valid_uid,
)
from raft.permissions import send_permission
from storage.store import Store

SEND = "send"
SEND_BATCH = "send_batch"
DISTRIBUTE = "distribute"
# Sends this node proposed whose commit it has not distributed yet (message id -> sending connection id).
# Entries leave at distribute, or when the commit failed; the cap only matters if a commit is never seen.
ORIGINS_MAX = 100_000


@dataclass(slots=True)
class ChannelSend:
    """A send that passed the user pool: plaintext payload, stored channel id."""

    conn: Connection | None
    client_seq: int
    client_msg_no: str
    channel_id: str
    channel_type: int
    peer: str  # the other party of a person or agent channel, "" for groups
    sender: str
    setting: int
    payload: bytes
    api: bool = False  # sent by the business server over HTTP: channel-level checks only
    reply: Callable[[Result], None] | None = None  # for sends without a connection (HTTP)
    trace: Trace | None = None  # a sampled send's latency trace (node/trace.py)
    header: int = 0  # the HF_* flags (RedDot, SyncOnce, NoPersist) every RECV carries
    expire: int = 0
    topic: str = ""
    subscribers: list[str] | None = None  # a temporary channel's uid list (business server only)

    @property
    def route_key(self) -> str:
        return f"{self.channel_type}:{self.channel_id}"


@dataclass(slots=True)
class ChannelSendBatch:
    """Sends to one channel (one route key), in the order they were read."""

    route_key: str
    sends: list[ChannelSend]


@dataclass(slots=True)
class Delivery:
    """A committed message on its way to its recipients."""

    op: dict[str, Any]
    result: Result
    trace: Trace | None = None


def open_send(
    *,
    sender: str,
    channel_id: str,
    channel_type: int,
    client_msg_no: str,
    payload: bytes,
    setting: int = 0,
    conn: Connection | None = None,
    client_seq: int = 0,
    api: bool = False,
    reply: Callable[[Result], None] | None = None,
    trace: Trace | None = None,
    header: int = 0,
    expire: int = 0,
    topic: str = "",
    subscribers: list[str] | None = None,
) -> ChannelSend | int:
    """The one way a message enters the channel pool, from a client (SEND) or the business server (HTTP).

    `channel_id` is the id the sender addressed (for a person or agent channel: the other user). Returns
    the send, under the channel's stored id, or the reason code it is refused with before anything is
    queued.
    A temporary channel (`subscribers`) is the business server's alone.
    """
    temporary = channel_type == CHANNEL_TEMP and api and subscribers is not None
    if channel_type not in SUPPORTED_CHANNEL_TYPES and not temporary:
        return Reason.NOT_SUPPORT_CHANNEL_TYPE
    if not channel_id or not client_msg_no:
        return Reason.CHANNEL_ID_ERROR
    if channel_type in PAIR_CHANNEL_TYPES:
        if channel_id == sender or not valid_uid(channel_id) or len(channel_id.encode()) > MAX_UID_BYTES:
            # No channel with oneself (WuKongIM), nor with a uid none can have: with `@`, or longer than a
            # uid (the wire allows 128 bytes, a group id's). The sender's mistake, so not SYSTEM_ERROR.
            return Reason.CHANNEL_ID_ERROR
        if channel_type == CHANNEL_PERSON:
            stored = person_channel_id(sender, channel_id)
        else:
            stored = agent_channel_id(sender, channel_id)
        peer = channel_id
    else:
        stored, peer = channel_id, ""
    return ChannelSend(
        conn,
        client_seq,
        client_msg_no,
        stored,
        channel_type,
        peer,
        sender,
        setting,
        payload,
        api,
        reply,
        trace,
        header & HF_ALL,
        expire,
        topic,
        subscribers,
    )


@dataclass
class ChannelBatch:
    pending: list[tuple[ChannelSend, Op]] = field(default_factory=list)
    in_flight: bool = False
    # A ChannelSendBatch is being stored: its sends go to Raft together, once all have been through the
    # chain (the first one alone would hold the rest back a whole commit).
    filling: bool = False
    # While filling: the permission answers of this batch, by (sender, peer, api).
    permissions: dict[tuple[str, str, bool], int] = field(default_factory=dict)


@dataclass
class ChannelContext:
    tuning: Tuning
    store: Store
    proposer: Proposer
    ids: Snowflake
    batches: dict[str, ChannelBatch] = field(default_factory=dict)
    # Node-local, never in the log: which connection sent a message this node proposed, so the push
    # skips it (no echo to the sending device) and only this node notices its offline recipients.
    # Entries leave when the committed stream distributes the message (committed.py) or the commit fails.
    origins: dict[int, int] = field(default_factory=dict)
    acked: int = 0


def _sendack(send: ChannelSend, result: Result) -> None:
    if send.reply is not None:
        send.reply(result)
    if send.conn is not None:
        send.conn.send_packet(
            Sendack(int(result.get("mid", 0)), send.client_seq, int(result.get("seq", 0)), int(result["r"]))
        )
        if send.trace is not None:
            send.trace.mark("completion")
            send.conn.trace_next_write(send.trace, "sendack_write")


# -- send ------------------------------------------------------------------------------------------------
async def permission(ctx: ChannelContext, send: ChannelSend) -> int | None:
    """Fast path only: apply checks again against the replicated state and decides."""
    if send.trace is not None:
        send.trace.mark("channel_pool_wait")
    if send.channel_type == CHANNEL_TEMP:
        return None  # the business server's own uid list: nothing to check (apply agrees)
    # The sends of one channel batch mostly share sender and peer: one store read answers them all (a
    # change committed meanwhile is still caught: apply checks again).
    channel = ctx.batches.get(send.route_key)
    memo = channel.permissions if channel is not None and channel.filling else None
    key = (send.sender, send.peer, send.api)
    reason = memo.get(key) if memo is not None else None
    if reason is None:
        with ctx.store.read() as txn:
            reason = send_permission(
                txn, send.channel_id, send.channel_type, send.sender, send.peer, api=send.api
            )
        if memo is not None:
            memo[key] = reason
    return None if reason == Reason.SUCCESS else reason


async def store(ctx: ChannelContext, send: ChannelSend) -> int | None:
    batch = ctx.batches.setdefault(send.route_key, ChannelBatch())
    if len(batch.pending) >= ctx.tuning.pending_per_channel_max:
        return Reason.RATE_LIMIT
    try:
        op = send_op(
            channel_id=send.channel_id,
            channel_type=send.channel_type,
            sender=send.sender,
            receiver=send.peer,
            client_msg_no=send.client_msg_no,
            message_id=ctx.ids.next(),
            timestamp=int(time.time()),
            setting=send.setting,
            payload=send.payload,
            api=send.api,
            header=send.header,
            expire=send.expire,
            topic=send.topic,
            subscribers=send.subscribers,
        )
    except BadCommand:
        # An id or payload over apply's caps: refused here as apply would refuse it (reason 15), as a
        # rejection, not a failure (a failing built-in step would trip its breaker).
        return Reason.SYSTEM_ERROR
    if len(ctx.origins) >= ORIGINS_MAX:
        del ctx.origins[next(iter(ctx.origins))]  # the oldest: a commit this node never saw
    ctx.origins[op["mid"]] = send.conn.id if send.conn is not None else 0
    batch.pending.append((send, op))
    if send.trace is not None:
        send.trace.mark("channel_pool")
    if not batch.in_flight and not batch.filling:
        _flush(ctx, send.route_key, batch)
    return None


async def run_send_batch(pool: EventPool[ChannelContext], batch: ChannelSendBatch) -> None:
    """The `send` chain on each send of one channel, then one flush for all that were stored.

    Invariant: every send of the batch is answered, by its rejection here or by the commit's SENDACK.
    """
    ctx, key = pool.ctx, batch.route_key
    channel = ctx.batches.setdefault(key, ChannelBatch())
    channel.filling = True
    try:
        for send in batch.sends:
            await pool.run_chain(SEND, send)
    finally:
        channel.filling = False
        channel.permissions.clear()
        # A plugin step may have waited, and a completion meanwhile replaced this channel's batch state:
        # flush whichever is current.
        current = ctx.batches.get(key)
        if current is not None and not current.in_flight:
            if current.pending:
                _flush(ctx, key, current)
            elif not current.filling:
                del ctx.batches[key]  # every send was refused: nothing of this channel is left to track


async def submit_sends(pool: EventPool[Any], sends: list[ChannelSend]) -> None:
    """Hand sends to the channel pool, one event per channel (order kept within each); waits while a
    channel's shard is full (backpressure on the caller)."""
    by_channel: dict[str, list[ChannelSend]] = {}
    for send in sends:
        by_channel.setdefault(send.route_key, []).append(send)
    for key, channel_sends in by_channel.items():
        await pool.submit(key, SEND_BATCH, ChannelSendBatch(key, channel_sends))


def _flush(ctx: ChannelContext, key: str, batch: ChannelBatch) -> None:
    items, batch.pending = batch.pending, []
    batch.in_flight = True

    def done(results: list[Result]) -> None:
        for (send, op), result in zip(items, results, strict=True):
            if result.get("r") != Reason.SUCCESS or result.get("dup"):
                ctx.origins.pop(op["mid"], None)  # no distribute will come for this message id
            _sendack(send, result)
        ctx.acked += len(items)
        batch.in_flight = False
        if batch.pending:
            _flush(ctx, key, batch)
        elif ctx.batches.get(key) is batch:
            del ctx.batches[key]

    traces = [send.trace for send, _op in items if send.trace is not None]
    ctx.proposer.submit([op for _send, op in items], done, traces)


async def reject_send(ctx: ChannelContext, send: ChannelSend, reason: int) -> None:
    _sendack(send, {"r": reason})


# -- distribute ------------------------------------------------------------------------------------------
async def distribute(ctx: ChannelContext, delivery: Delivery) -> int | None:
    """The built-in's place in the `distribute` chain, for plugins placed before or after it.

    The work itself (recipients, then the pusher pool) is done per Raft entry by the committed stream
    (committed.py), which runs this chain per message only when a plugin is on it.
    """
    return None


def build_channel_pool(ctx: ChannelContext) -> EventPool[ChannelContext]:
    tuning = ctx.tuning
    pool: EventPool[ChannelContext] = EventPool(
        "channel",
        ctx,
        shards=tuning.channel_pool_shards,
        queue_size=tuning.pool_queue_size,
        handler_timeout_s=tuning.handler_timeout_s,
        handler_retries=tuning.handler_retries,
        dead_letters_max=tuning.dead_letters_max,
    )
    pool.event_type(SEND, on_reject=reject_send)
    pool.register(SEND, "permission", permission, retries=1, timeout_s=None)
    pool.register(SEND, "store", store, retries=0, timeout_s=None)
    pool.batch_event_type(SEND_BATCH, run_send_batch)
    pool.event_type(DISTRIBUTE)
    pool.register(DISTRIBUTE, "distribute", distribute, timeout_s=None)
    return pool
