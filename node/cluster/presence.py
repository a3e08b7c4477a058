"""Presence: which user is online on which node, replicated so every node knows it.

Rows carry (node, epoch). A node announces a new epoch when it starts, which clears whatever rows its
previous life left (a `kill -9` sends no offline events). Changes are batched, one batch in flight, and a
CONNACK never waits for them. The leader declares a node down when Raft has lost it for
`node_down_after_s`, so its users stop counting as online. A login replaces older connections of the same
uid and device flag by WuKongIM's device-level rules (`login_replaces`), on the node it lands on at once
and on every other node when its presence change is applied there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import trio

from node.cluster.proposer import Proposer
from node.gateway.connection import Connection
from node.gateway.registry import Registry
from node.wire.protocol import Reason
from raft.apply import Result
from raft.bridge import RaftNode
from raft.commands import (
    MAX_PRESENCE_CHANGES,
    OP_NODE_DOWN,
    OP_PRESENCE,
    R_SUCCESS,
    node_down_op,
    node_epoch_op,
    presence_change,
    presence_op,
)
from storage.store import Store

log = logging.getLogger("imnode.presence")

EPOCH_RETRY_S = 1.0
DEVICE_LEVEL_MASTER = 1  # WuKongIM's DeviceLevelMaster; 0 is a slave (the level without token auth)
KICK = "kick"
CLOSE = "close"


def login_replaces(older_device_id: str, device_id: str | None, device_level: int) -> str | None:
    """What a new login of the same uid and device flag does to an older connection (WuKongIM
    `user/handler/event_connect.go`): a master kicks other device ids (DISCONNECT, reason 12) and closes
    its own device id's older connection without one; a slave closes only its own device id's. None:
    the older connection stays (two browser tabs, each its own device id, as slaves).

    `device_id` None: the login came from a node too old to say (its presence change has no `dev`).
    """
    if device_id is not None and older_device_id == device_id:
        return CLOSE
    if device_level == DEVICE_LEVEL_MASTER:
        return KICK
    return None


def replace_older(
    registry: Registry,
    uid: str,
    device_flag: int,
    device_id: str | None,
    device_level: int,
    *,
    keep: Connection | None = None,
) -> int:
    """Apply `login_replaces` to this node's connections of (uid, device flag) other than `keep`; returns
    how many were closed. A kick sends DISCONNECT first (the only DISCONNECT a node sends); a plain
    close does not, so that client's SDK reconnects if it still runs."""
    closed = 0
    for older in list(registry.of_uid(uid)):
        if older is keep or older.device_flag != device_flag:
            continue
        action = login_replaces(older.device_id, device_id, device_level)
        if action == KICK:
            older.close(Reason.CONNECT_KICK, "login in other device")
        elif action == CLOSE:
            older.close(None, "replaced by a newer connection of the same device")
        else:
            continue
        registry.remove(older)
        closed += 1
    return closed


class Presence:
    def __init__(
        self,
        node_numeric_id: int,
        store: Store,
        registry: Registry,
        *,
        node_down_after_s: float,
        numeric_ids: Mapping[str, int],
    ) -> None:
        """`numeric_ids`: every configured node's numeric id by its Raft address (Raft reports addresses)."""
        self.node = node_numeric_id
        self.store = store
        self.registry = registry
        self._node_down_after_s = node_down_after_s
        self._numeric_ids = dict(numeric_ids)
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
            presence_change(conn.uid, conn.id, conn.device_flag, conn.device_level, online, conn.device_id)
        )
        self._flush()

    def _flush(self) -> None:
        if self._in_flight or not self._pending or not self.epoch or self.proposer is None:
            return
        # One op carries at most MAX_PRESENCE_CHANGES (apply's cap); the rest go in the next one.
        changes = self._pending[:MAX_PRESENCE_CHANGES]
        del self._pending[:MAX_PRESENCE_CHANGES]
        self._in_flight = True

        def done(results: list[Result]) -> None:
            self._in_flight = False
            if results[0].get("r") != R_SUCCESS:
                # The proposer already retried for commit_timeout_s; a new epoch at the next restart
                # clears whatever this leaves behind.
                self.lost_changes += len(changes)
                log.warning("presence changes not committed: %s", results[0].get("err"))
            self._flush()

        self.proposer.submit([presence_op(self.node, self.epoch, changes)], done)

    async def announce_epoch(self, proposer: Proposer) -> None:
        """Propose this node's new epoch (retrying until it commits), then start sending changes."""
        self.proposer = proposer
        epoch = int(time.time() * 1000)
        while True:
            [result] = await proposer.call([node_epoch_op(self.node, epoch)])
            if result.get("r") == R_SUCCESS:
                break
            await trio.sleep(EPOCH_RETRY_S)
        self.epoch = epoch
        self._flush()

    # -- what the cluster says ---------------------------------------------------------------------------
    def on_committed(self, op: dict[str, Any]) -> None:
        """Close or kick local connections a newer login elsewhere replaces; come back after a node_down."""
        if op.get("t") == OP_NODE_DOWN:
            if self.epoch and op["node"] == self.node and op["epoch"] == self.epoch:
                self._republish()
            return
        if op.get("t") != OP_PRESENCE or op["node"] == self.node:
            return  # this node kicked its own older connection before it announced the new one
        for change in op["changes"]:
            if not change["online"]:
                continue
            self.kicked_remote += replace_older(
                self.registry, change["uid"], change["flag"], change.get("dev"), change["level"]
            )

    def _republish(self) -> None:
        """The leader lost this node for a while (a partition, a long pause) and cleared its rows, but
        this life's connections are still here: announce them again. Queued behind any change already
        pending, so an offline that happened meanwhile still lands after the online it undoes."""
        live = [conn for conns in self.registry.by_uid.values() for conn in conns]
        log.warning("this node was declared down while alive; announcing %d connections again", len(live))
        for conn in live:
            self._queue(conn, True)

    def online_among(self, uids: list[str]) -> set[str]:
        """Those of `uids` online anywhere in the cluster: one read transaction for them all."""
        online = {uid for uid in uids if uid in self.registry.by_uid}
        rest = [uid for uid in uids if uid not in online]
        if rest:
            with self.store.read() as txn:
                online |= txn.online_among(rest)
        return online

    # -- the leader's watch on other nodes ---------------------------------------------------------------
    async def watch_nodes(self, raft: RaftNode) -> None:
        """On the leader: declare a node down once Raft has lost it for `node_down_after_s`."""
        detector = DownDetector(self._node_down_after_s)
        by_address = self._numeric_ids
        while True:
            await trio.sleep(1.0)
            status = raft.status()
            if status["role"] != "leader" or self.proposer is None:
                detector.reset()
                continue
            connected = {by_address[a]: up for a, up in status["connected"].items() if a in by_address}
            with self.store.read() as txn:
                epochs = {int(n): int(e) for n, e in (txn.meta("node_epochs") or {}).items()}
            for node, epoch in detector.observe(trio.current_time(), connected, epochs):
                [result] = await self.proposer.call([node_down_op(node, epoch)])
                if result.get("r") == R_SUCCESS:
                    detector.declared(node, epoch)
                    log.info("node %s epoch %s declared down: %s", node, epoch, result)
                else:
                    log.warning("node %s could not be declared down: %s", node, result)


class DownDetector:
    """Which nodes the leader should declare down, from what it observes (pure: the caller polls).

    A node is due once it has been seen disconnected for `after_s` and its current epoch has not been
    declared down yet. Keyed by epoch, not by "seen connected again": a node that restarts (or announces
    its first epoch) between two polls must be declarable again even if no poll ever saw it connected.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._lost_since: dict[int, float] = {}
        self._declared: dict[int, int] = {}  # node -> the epoch declared down

    def reset(self) -> None:
        """Not the leader (any more): whoever leads next starts its own clock."""
        self._lost_since.clear()
        self._declared.clear()

    def observe(
        self, now: float, connected: dict[int, bool], epochs: dict[int, int]
    ) -> list[tuple[int, int]]:
        due: list[tuple[int, int]] = []
        for node, up in connected.items():
            if up:
                self._lost_since.pop(node, None)
                self._declared.pop(node, None)  # back: a later loss of this same epoch counts again
                continue
            since = self._lost_since.setdefault(node, now)
            epoch = epochs.get(node, 0)
            if now - since >= self.after_s and self._declared.get(node) != epoch:
                due.append((node, epoch))
        return due

    def declared(self, node: int, epoch: int) -> None:
        self._declared[node] = epoch
