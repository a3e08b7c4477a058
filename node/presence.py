"""Presence: which user is online on which node, replicated so every node knows it.

Rows carry (node, epoch). A node announces a new epoch when it starts, which clears whatever rows its
previous life left (a `kill -9` sends no offline events). Changes are batched, one batch in flight, and a
CONNACK never waits for them. The leader declares a node down when Raft has lost it for
`node_down_after_s`, so its users stop counting as online. When a node applies a login of (uid, device
flag) made on another node, it kicks its own older connection of that pair (reason 12).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from node.config import Config
from node.connection import Connection
from node.proposer import Proposer
from node.protocol import Reason
from node.registry import Registry
from raft.apply import Result
from raft.bridge import RaftNode
from raft.commands import OP_NODE_DOWN, OP_NODE_EPOCH, OP_PRESENCE, R_SUCCESS
from storage.store import Store

log = logging.getLogger("imnode.presence")

EPOCH_RETRY_S = 1.0


class Presence:
    def __init__(self, config: Config, node_numeric_id: int, store: Store, registry: Registry) -> None:
        self.config = config
        self.node = node_numeric_id
        self.store = store
        self.registry = registry
        self.proposer: Proposer | None = None
        self.epoch = 0
        self._pending: list[dict[str, Any]] = []
        self._in_flight = False
        self.kicked_remote = 0
        self.lost_changes = 0

    # -- this node's connections -------------------------------------------------------------------------
    def online(self, conn: Connection) -> None:
        self._queue(conn, True)

    def offline(self, conn: Connection) -> None:
        self._queue(conn, False)

    def _queue(self, conn: Connection, online: bool) -> None:
        self._pending.append(
            {
                "uid": conn.uid,
                "conn": conn.id,
                "flag": conn.device_flag,
                "level": conn.device_level,
                "online": online,
            }
        )
        self._flush()

    def _flush(self) -> None:
        if self._in_flight or not self._pending or not self.epoch or self.proposer is None:
            return
        changes, self._pending = self._pending, []
        self._in_flight = True

        def done(results: list[Result]) -> None:
            self._in_flight = False
            if results[0].get("r") != R_SUCCESS:
                # The proposer already retried for commit_timeout_s; a new epoch at the next restart
                # clears whatever this leaves behind.
                self.lost_changes += len(changes)
                log.warning("presence changes not committed: %s", results[0].get("err"))
            self._flush()

        self.proposer.submit(
            [{"t": OP_PRESENCE, "node": self.node, "epoch": self.epoch, "changes": changes}], done
        )

    async def announce_epoch(self, proposer: Proposer) -> None:
        """Propose this node's new epoch (retrying until it commits), then start sending changes."""
        self.proposer = proposer
        epoch = int(time.time() * 1000)
        while True:
            [result] = await proposer.call([{"t": OP_NODE_EPOCH, "node": self.node, "epoch": epoch}])
            if result.get("r") == R_SUCCESS:
                break
            await trio.sleep(EPOCH_RETRY_S)
        self.epoch = epoch
        self._flush()

    # -- what the cluster says ---------------------------------------------------------------------------
    def on_committed(self, op: dict[str, Any]) -> None:
        """Kick local connections that a newer login elsewhere replaces."""
        if op.get("t") != OP_PRESENCE or op["node"] == self.node:
            return  # this node kicked its own older connection before it announced the new one
        for change in op["changes"]:
            if not change["online"]:
                continue
            for conn in list(self.registry.of_uid(change["uid"])):
                if conn.device_flag == change["flag"]:
                    conn.close(Reason.CONNECT_KICK, "logged in on another node")
                    self.registry.remove(conn)
                    self.kicked_remote += 1

    def is_online(self, uid: str) -> bool:
        """Online anywhere in the cluster (as far as this node has applied)."""
        if self.registry.of_uid(uid):
            return True
        with self.store.read() as txn:
            return bool(txn.presence_of(uid))

    # -- the leader's watch on other nodes ---------------------------------------------------------------
    async def watch_nodes(self, raft: RaftNode) -> None:
        """On the leader: declare a node down once Raft has lost it for `node_down_after_s`."""
        lost_since: dict[str, float] = {}
        declared: set[str] = set()
        by_address = {spec.raft: spec.numeric_id for spec in self.config.nodes.values()}
        while True:
            await trio.sleep(1.0)
            status = raft.status()
            if status["role"] != "leader" or self.proposer is None:
                lost_since.clear()
                continue
            now = trio.current_time()
            for address, connected in status["connected"].items():
                if connected:
                    lost_since.pop(address, None)
                    declared.discard(address)
                    continue
                since = lost_since.setdefault(address, now)
                node = by_address.get(address)
                if node is None or address in declared or now - since < self.config.tuning.node_down_after_s:
                    continue
                with self.store.read() as txn:
                    epoch = int((txn.meta("node_epochs") or {}).get(str(node), 0))
                [result] = await self.proposer.call([{"t": OP_NODE_DOWN, "node": node, "epoch": epoch}])
                if result.get("r") == R_SUCCESS:
                    declared.add(address)
                    log.info("node %s (%s) declared down: %s", node, address, result)
                else:
                    log.warning("node %s (%s) could not be declared down: %s", node, address, result)
