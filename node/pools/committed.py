"""The stream of committed entries, on every node: what each applied op means for this node.

Raft hands every applied entry over once, in log order (raft/bridge.py). The committed sends of an entry are
distributed right here, without another pool visit: recipients found (one store read per entry), then one
event per pusher shard for the whole entry (every node pushes to its own connections). Each recipient maps
to one shard, and a shard takes its events in order, so a connection gets the RECVs of a channel in
message_seq order. Presence, user and handler changes act on this node's connections and chains.
Replayed entries never come through here (apply skips them), so nothing is pushed twice after a restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from node.cluster.presence import Presence
from node.gateway.registry import Registry
from node.pools.channel import DISTRIBUTE, Delivery
from node.pools.eventbus import EventPool
from node.pools.pusher import BUILTIN_PUSH, PUSH, PUSH_BATCH, PushBatch, PushEvent
from node.trace import Tracer
from node.wire.protocol import Reason
from raft.commands import (
    OP_DEVICE_QUIT,
    OP_HANDLER_STATE,
    OP_NODE_DOWN,
    OP_PRESENCE,
    OP_SEND,
    OP_TOKEN,
    PAIR_CHANNEL_TYPES,
    R_SUCCESS,
)
from raft.machine import Committed
from storage.keys import channel_key
from storage.store import Store

# The built-in handler of the channel pool's `distribute` chain: a placeholder (see channel.distribute).
BUILTIN_DISTRIBUTE = ("distribute",)


def sync_handler_states(store: Store, pools: Mapping[str, EventPool[Any]]) -> None:
    """Make the local chains match the replicated list of disabled handlers."""
    with store.read() as txn:
        disabled = txn.meta("handlers_disabled") or []
    names = {h.name for pool in pools.values() for t in pool.event_types() for h in pool.chain(t)}
    for name in names:
        for pool in pools.values():
            pool.set_enabled(name, name not in disabled)


class CommittedStream:
    def __init__(
        self,
        entries: Callable[[], AsyncIterator[Committed]],
        store: Store,
        channel_pool: EventPool[Any],
        pusher_pool: EventPool[Any],
        origins: dict[int, int],
        presence: Presence,
        registry: Registry,
        on_handler_states: Callable[[], None],
        tracer: Tracer,
    ) -> None:
        self._entries = entries
        self._tracer = tracer
        self._store = store
        self._channel_pool = channel_pool
        self._pusher_pool = pusher_pool
        # The channel pool's: message id -> the local connection that sent it (no echo, offline notices).
        self._origins = origins
        self._presence = presence
        self._registry = registry
        self._on_handler_states = on_handler_states
        self.committed_messages = 0

    async def run(self) -> None:
        async for committed in self._entries():
            deliveries: list[Delivery] = []
            for op, result in zip(committed.ops, committed.results, strict=False):
                if not isinstance(op, dict):
                    continue
                kind, ok = op.get("t"), result.get("r") == R_SUCCESS
                if kind in (OP_PRESENCE, OP_NODE_DOWN):
                    if ok and not result.get("stale"):
                        self._presence.on_committed(op)
                elif kind == OP_HANDLER_STATE:
                    if ok:
                        self._on_handler_states()
                elif kind in (OP_DEVICE_QUIT, OP_TOKEN):
                    if ok:
                        self._kick_after_user_change(op)
                elif kind == OP_SEND and ok and not result.get("dup"):
                    self.committed_messages += 1
                    trace = self._tracer.start("deliver", committed.applied_at or None)
                    if trace is not None:
                        trace.mark("to_trio")
                    deliveries.append(Delivery(op, result, trace))
            if deliveries:
                await self._distribute(deliveries)

    async def _distribute(self, deliveries: list[Delivery]) -> None:
        """The committed messages of one entry to the pusher pool: one event per shard, in log order."""
        by_shard: dict[int, list[PushEvent]] = {}
        shard_of = self._pusher_pool.shard_of
        members = self._group_members(deliveries)
        # With only the built-in push steps, a recipient with no device on this node matters here only
        # if this node took the send (it notices offline recipients): the others are skipped before any
        # event is built. A plugin on `push` sees every recipient, as before.
        local = None if self._pusher_pool.has_handlers(PUSH, besides=BUILTIN_PUSH) else self._registry.by_uid
        for delivery in deliveries:
            op, result, trace = delivery.op, delivery.result, delivery.trace
            if trace is not None:
                trace.mark("distribute_wait")
            if op["ct"] in PAIR_CHANNEL_TYPES:
                recipients = [op["from"], op["to"]] if op.get("to") else [op["from"]]
            elif "subs" in op:
                recipients = list(dict.fromkeys(op["subs"]))  # a temporary channel's uid list
            else:
                recipients = members[channel_key(op["cid"], op["ct"])]
            origin = self._origins.pop(result["mid"], None)
            if local is not None and origin is None:
                recipients = [uid for uid in recipients if uid in local]
            uids_by_shard: dict[int, list[str]] = {}
            for uid in recipients:
                uids_by_shard.setdefault(shard_of(uid), []).append(uid)
            for shard, uids in uids_by_shard.items():
                # A traced delivery's pushes share its trace: the first RECV queued on this node claims it.
                by_shard.setdefault(shard, []).append(PushEvent(op, result, uids, origin, trace=trace))
            if trace is not None:
                trace.mark("distribute")
        if self._channel_pool.has_handlers(DISTRIBUTE, besides=BUILTIN_DISTRIBUTE):
            # Plugins on `distribute` see each committed message (observers off the path, in their lanes).
            for delivery in deliveries:
                await self._channel_pool.run_chain(DISTRIBUTE, delivery)
        for pushes in by_shard.values():
            await self._pusher_pool.submit(pushes[0].uids[0], PUSH_BATCH, PushBatch(pushes))

    def _group_members(self, deliveries: list[Delivery]) -> dict[bytes, list[str]]:
        """The subscribers of each group channel among `deliveries`: one short read transaction per entry,
        none when the entry holds person messages only."""
        groups = {
            channel_key(d.op["cid"], d.op["ct"])
            for d in deliveries
            if d.op["ct"] not in PAIR_CHANNEL_TYPES and "subs" not in d.op
        }
        if not groups:
            return {}
        with self._store.read() as txn:
            return {key: txn.members("subscribers", key) for key in groups}

    def _kick_after_user_change(self, op: dict[str, Any]) -> None:
        """device_quit logs devices out; a master-level token (device_level 1) replaces older logins."""
        if op["t"] == OP_TOKEN and op.get("level") != 1:
            return
        flag = op["flag"]
        for conn in list(self._registry.of_uid(op["uid"])):
            if flag == -1 or conn.device_flag == flag:
                conn.close(
                    Reason.CONNECT_KICK, "logged out" if op["t"] == OP_DEVICE_QUIT else "logged in elsewhere"
                )
                self._registry.remove(conn)
