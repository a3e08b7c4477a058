"""The channel event pool: permission, store (batch into Raft), and distribute after commit.

Sharded by channel. A channel has at most one batch in flight: sends that arrive meanwhile wait in its
pending list and go together in the next batch. So sends of one connection to one channel keep their order
in message_seq even when a proposal has to be retried, and a busy channel gets larger batches, not more.
The proposer merges the batches of all channels into shared Raft entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.cluster.ids import Snowflake
from node.cluster.proposer import Proposer
from node.config import Config
from node.gateway.connection import Connection
from node.pools.eventbus import EventPool
from node.pools.pusher import PushEvent
from node.wire.protocol import Reason, Sendack
from raft.apply import Result
from raft.commands import CHANNEL_PERSON, OP_SEND
from raft.permissions import send_permission
from storage.keys import channel_key
from storage.store import Store

SEND = "send"
DISTRIBUTE = "distribute"


@dataclass(slots=True)
class ChannelSend:
    """A send that passed the user pool: plaintext payload, stored channel id."""

    conn: Connection | None
    client_seq: int
    client_msg_no: str
    channel_id: str
    channel_type: int
    peer: str  # the other party of a person channel, "" for groups
    sender: str
    setting: int
    payload: bytes
    api: bool = False  # sent by the business server over HTTP: channel-level checks only
    reply: Callable[[Result], None] | None = None  # for sends without a connection (HTTP)

    @property
    def route_key(self) -> str:
        return f"{self.channel_type}:{self.channel_id}"


@dataclass(slots=True)
class Delivery:
    """A committed message on its way to its recipients."""

    op: dict[str, Any]
    result: Result


@dataclass
class ChannelBatch:
    pending: list[tuple[ChannelSend, dict[str, Any]]] = field(default_factory=list)
    in_flight: bool = False


@dataclass
class ChannelContext:
    config: Config
    node_numeric_id: int
    store: Store
    proposer: Proposer
    pusher_pool: EventPool[Any]
    ids: Snowflake
    batches: dict[str, ChannelBatch] = field(default_factory=dict)
    acked: int = 0


def _sendack(send: ChannelSend, result: Result) -> None:
    if send.reply is not None:
        send.reply(result)
    if send.conn is not None:
        send.conn.send_packet(
            Sendack(int(result.get("mid", 0)), send.client_seq, int(result.get("seq", 0)), int(result["r"]))
        )


# -- send ------------------------------------------------------------------------------------------------
async def permission(ctx: ChannelContext, send: ChannelSend) -> int | None:
    """Fast path only: apply checks again against the replicated state and decides."""
    with ctx.store.read() as txn:
        reason = send_permission(
            txn, send.channel_id, send.channel_type, send.sender, send.peer, api=send.api
        )
    return None if reason == Reason.SUCCESS else reason


async def store(ctx: ChannelContext, send: ChannelSend) -> int | None:
    batch = ctx.batches.setdefault(send.route_key, ChannelBatch())
    if len(batch.pending) >= ctx.config.tuning.pending_per_channel_max:
        return Reason.RATE_LIMIT
    op = {
        "t": OP_SEND,
        "cid": send.channel_id,
        "ct": send.channel_type,
        "from": send.sender,
        "to": send.peer,
        "cmn": send.client_msg_no,
        "mid": ctx.ids.next(),
        "ts": int(time.time()),
        "setting": send.setting,
        "payload": send.payload,
        # Not stored: lets the node that owns the sending connection skip it when pushing.
        "node": ctx.node_numeric_id,
        "conn": send.conn.id if send.conn is not None else 0,
    }
    if send.api:
        op["api"] = True
    batch.pending.append((send, op))
    if not batch.in_flight:
        _flush(ctx, send.route_key, batch)
    return None


def _flush(ctx: ChannelContext, key: str, batch: ChannelBatch) -> None:
    items, batch.pending = batch.pending, []
    batch.in_flight = True

    def done(results: list[Result]) -> None:
        for (send, _op), result in zip(items, results, strict=True):
            _sendack(send, result)
        ctx.acked += len(items)
        batch.in_flight = False
        if batch.pending:
            _flush(ctx, key, batch)
        elif ctx.batches.get(key) is batch:
            del ctx.batches[key]

    ctx.proposer.submit([op for _send, op in items], done)


async def reject_send(ctx: ChannelContext, send: ChannelSend, reason: int) -> None:
    _sendack(send, {"r": reason})


# -- distribute ------------------------------------------------------------------------------------------
async def distribute(ctx: ChannelContext, delivery: Delivery) -> int | None:
    """Find the recipients of a committed message and hand them to the pusher pool, one event per shard."""
    op = delivery.op
    if op["ct"] == CHANNEL_PERSON:
        recipients = [op["from"], op["to"]] if op.get("to") else [op["from"]]
    else:
        with ctx.store.read() as txn:
            recipients = txn.members("subscribers", channel_key(op["cid"], op["ct"]))
    by_shard: dict[int, list[str]] = {}
    for uid in recipients:
        by_shard.setdefault(ctx.pusher_pool.shard_of(uid), []).append(uid)
    for uids in by_shard.values():
        await ctx.pusher_pool.submit(uids[0], "push", PushEvent(op, delivery.result, uids))
    return None


def build_channel_pool(ctx: ChannelContext) -> EventPool[ChannelContext]:
    tuning = ctx.config.tuning
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
    pool.event_type(DISTRIBUTE)
    pool.register(DISTRIBUTE, "distribute", distribute, timeout_s=None)
    return pool
