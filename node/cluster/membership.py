"""Membership changes a node serves over its admin endpoints: add, remove, hand leadership over.

Rules (RAFT_NOTES.md): one change at a time; refuse an add unless every member is up and caught up (adding a
node while another is down can leave a quorum that cannot commit until the newcomer catches up); a node
cannot remove itself, and a leader is asked to hand over before it is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Mapping
from typing import Any

import trio

from node.config import NodeSpec
from raft.bridge import ProposeFailed, RaftNode

MEMBERSHIP_TIMEOUT_S = 15.0
TRANSFER_TIMEOUT_S = 5.0
CATCH_UP_SLACK_ENTRIES = 1000
# How often the node looks at Raft's view for changes to log: PySyncObj offers no callback for either.
WATCH_INTERVAL_S = 0.2

log = logging.getLogger("imnode.cluster")


class AdminRefused(Exception):
    """The request is refused and nothing was changed; the message says why."""


class Membership:
    """Membership changes through this node's Raft, named by the config's node ids."""

    def __init__(self, raft: RaftNode, nodes: Mapping[str, NodeSpec], self_id: str) -> None:
        self._raft = raft
        self._nodes = nodes
        self._self_id = self_id
        # PySyncObj runs one change at a time: a second one is refused while this is set, not queued.
        self.busy = False

    def name_of(self, raft_address: str | None) -> str | None:
        """The config's node id for a Raft address (the address itself when no node has it)."""
        if raft_address is None:
            return None
        for node_id, spec in self._nodes.items():
            if spec.raft == raft_address:
                return node_id
        return raft_address

    def _address_of(self, node_id: str) -> str:
        spec = self._nodes.get(node_id)
        if spec is None:
            raise AdminRefused(f"unknown node {node_id!r}: it has no [nodes.{node_id}] table in the config")
        return spec.raft

    async def _one_change_at_a_time(self, change: Coroutine[Any, Any, None]) -> None:
        if self.busy:
            change.close()
            raise AdminRefused("another membership change is in progress")
        self.busy = True
        try:
            await change
        except ProposeFailed as exc:
            raise AdminRefused(f"the cluster did not commit the change: {exc.reason}") from None
        finally:
            self.busy = False

    async def add(self, node_id: str) -> dict[str, Any]:
        address = self._address_of(node_id)
        raft = self._raft.status()
        if raft["role"] != "leader":
            raise AdminRefused(f"{self._self_id} is not the leader; ask {self.name_of(raft['leader'])}")
        if address in raft["members"]:
            raise AdminRefused(f"{node_id} is already a member")
        down = [self.name_of(m) for m, ok in raft["connected"].items() if not ok]
        if down:
            raise AdminRefused(f"members not connected: {', '.join(map(str, down))}; bring them back first")
        behind = [
            self.name_of(m)
            for m, idx in raft["match_index"].items()
            if idx < raft["commit_index"] - CATCH_UP_SLACK_ENTRIES
        ]
        if behind:
            raise AdminRefused(f"members still catching up: {', '.join(map(str, behind))}")
        await self._one_change_at_a_time(self._raft.add_member(address, timeout_s=MEMBERSHIP_TIMEOUT_S))
        return {"added": node_id, "members": [self.name_of(m) for m in self._raft.members()]}

    async def remove(self, node_id: str) -> dict[str, Any]:
        address = self._address_of(node_id)
        members = self._raft.members()
        if address not in members:
            raise AdminRefused(f"{node_id} is not a member")
        if len(members) <= 1:
            raise AdminRefused("cannot remove the last member")
        if address == self._nodes[self._self_id].raft:
            raise AdminRefused("a node cannot remove itself: ask another member (hand leadership over first)")
        await self._one_change_at_a_time(self._raft.remove_member(address, timeout_s=MEMBERSHIP_TIMEOUT_S))
        return {"removed": node_id, "members": [self.name_of(m) for m in self._raft.members()]}

    async def transfer_leadership(self, node_id: str | None) -> dict[str, Any]:
        """Ask the leader to hand over (to `node_id`, or the most caught-up follower)."""
        address = self._address_of(node_id) if node_id else None
        try:
            await self._raft.transfer_leadership(address, timeout_s=TRANSFER_TIMEOUT_S)
        except ProposeFailed as exc:
            raise AdminRefused(f"leadership transfer refused: {exc.reason}") from None
        return {"requested": True}

    async def log_changes(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Log each membership and leader change this node observes, until cancelled.

        Polled: PySyncObj's state lives on its own thread and calls nothing back on either change. A change
        shorter than `interval_s` can go unlogged; what is logged is what this node saw.
        """
        members: list[str] | None = None
        leader: str | None = None
        first = True
        while True:
            status = self._raft.status()
            now = [str(self.name_of(m)) for m in status["members"]]
            if members is None:
                log.info("members: %s", ", ".join(now))
            elif sorted(now) != sorted(members):
                added = sorted(set(now) - set(members))
                removed = sorted(set(members) - set(now))
                change = [f"added {', '.join(added)}"] if added else []
                change += [f"removed {', '.join(removed)}"] if removed else []
                log.info("members now: %s (%s)", ", ".join(now), "; ".join(change))
            members = now
            name = self.name_of(status["leader"])
            if name != leader or first:
                if name is None:
                    log.info("no leader (term %s)", status["term"])
                else:
                    me = "this node, " if name == self._self_id else ""
                    log.info("leader is now %s (%sterm %s)", name, me, status["term"])
                leader, first = name, False
            await trio.sleep(interval_s)
