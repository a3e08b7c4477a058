"""The stream of committed entries, on every node: what each applied op means for this node.

Raft hands every applied entry over once, in log order (raft/bridge.py). A committed send goes to the channel
pool for distribution (every node pushes to its own connections); presence, user and handler changes act on
this node's connections and chains. Replayed entries never come through here (apply skips them), so
nothing is pushed twice after a restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from node.cluster.presence import Presence
from node.gateway.registry import Registry
from node.pools.channel import DISTRIBUTE, Delivery
from node.pools.eventbus import EventPool
from node.trace import Tracer
from node.wire.protocol import Reason
from raft.commands import (
    OP_DEVICE_QUIT,
    OP_HANDLER_STATE,
    OP_NODE_DOWN,
    OP_PRESENCE,
    OP_SEND,
    OP_TOKEN,
    R_SUCCESS,
)
from raft.machine import Committed
from storage.store import Store


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
        channel_pool: EventPool[Any],
        presence: Presence,
        registry: Registry,
        on_handler_states: Callable[[], None],
        tracer: Tracer,
    ) -> None:
        self._entries = entries
        self._tracer = tracer
        self._channel_pool = channel_pool
        self._presence = presence
        self._registry = registry
        self._on_handler_states = on_handler_states
        self.committed_messages = 0

    async def run(self) -> None:
        async for committed in self._entries():
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
                    await self._channel_pool.submit(
                        f"{op['ct']}:{op['cid']}", DISTRIBUTE, Delivery(op, result, trace)
                    )

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
