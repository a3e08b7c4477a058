"""Operator actions a node serves over its authenticated admin endpoints: status, membership, digests.

Membership rules (RAFT_NOTES.md): one change at a time; refuse an add unless every member is up and caught
up (adding a node while another is down can leave a quorum that cannot commit until the newcomer catches
up); a node cannot remove itself, and a leader is asked to hand over before it is removed.
"""

from __future__ import annotations

import hashlib
import resource
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import cbor2

from raft.bridge import ProposeFailed
from storage.keys import split_channel_key
from storage.store import DB_NAMES

if TYPE_CHECKING:
    from node.server import Node

MEMBERSHIP_TIMEOUT_S = 15.0


class AdminRefused(Exception):
    """The request is refused and nothing was changed; the message says why."""


def node_id_of(node: Node, raft_address: str | None) -> str | None:
    if raft_address is None:
        return None
    for node_id, spec in node.config.nodes.items():
        if spec.raft == raft_address:
            return node_id
    return raft_address


def status(node: Node) -> dict[str, Any]:
    """This node's view, in the shape `imnode admin status --json` prints per node."""
    raft = node.raft.status()
    commit, applied = raft.get("commit_index") or 0, raft.get("applied_index") or 0
    return {
        "id": node.spec.id,
        "role": raft["role"],
        "leader": node_id_of(node, raft["leader"]),
        "term": raft["term"],
        "commit_index": commit,
        "applied_index": applied,
        "lag": max(0, commit - applied),
        "store_applied_index": raft["store_applied_index"],
        "log_len": raft["log_len"],
        "members": [node_id_of(node, m) for m in raft["members"]],
        "connected": {node_id_of(node, k): v for k, v in raft["connected"].items()},
        "has_quorum": raft["has_quorum"],
        "connections": len(node.registry),
        "online_users": node.registry.online_users(),
        "pools": {
            pool.name: {"queue_depth": sum(pool.queue_depths()), "dead_letters": len(pool.dead_letters)}
            for pool in (node.user_pool, node.channel_pool, node.pusher_pool)
        },
        "dead_letters": sum(
            len(p.dead_letters) for p in (node.user_pool, node.channel_pool, node.pusher_pool)
        ),
        "proposer": node.proposer.statistics(),
        "messages": {
            "committed": node.committed_messages,
            "acked": node.channel_ctx.acked,
            "delivered": node.push_ctx.delivered,
            "resent": node.push_ctx.resent,
            "expired": node.push_ctx.expired,
            "offline_notices": node.push_ctx.offline_notices,
        },
        "gateway": node.gateway.statistics(),
        "store": node.store.stats(),
        "process": {
            # ru_maxrss is in KiB on Linux: the process's peak resident set since it started.
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cpu_s": round(time.process_time(), 2),
        },
    }


def _address_of(node: Node, node_id: str) -> str:
    spec = node.config.nodes.get(node_id)
    if spec is None:
        raise AdminRefused(f"unknown node {node_id!r}: it has no [nodes.{node_id}] table in the config")
    return spec.raft


async def _one_change_at_a_time(node: Node, change: Coroutine[Any, Any, None]) -> None:
    """Run one membership change; PySyncObj allows one at a time, so a second is refused, not queued."""
    if node.membership_busy:
        change.close()
        raise AdminRefused("another membership change is in progress")
    node.membership_busy = True
    try:
        await change
    except ProposeFailed as exc:
        raise AdminRefused(f"the cluster did not commit the change: {exc.reason}") from None
    finally:
        node.membership_busy = False


async def add_member(node: Node, node_id: str) -> dict[str, Any]:
    address = _address_of(node, node_id)
    raft = node.raft.status()
    if raft["role"] != "leader":
        raise AdminRefused(f"{node.spec.id} is not the leader; ask {node_id_of(node, raft['leader'])}")
    if address in raft["members"]:
        raise AdminRefused(f"{node_id} is already a member")
    down = [node_id_of(node, m) for m, ok in raft["connected"].items() if not ok]
    if down:
        raise AdminRefused(f"members not connected: {', '.join(map(str, down))}; bring them back first")
    behind = [
        node_id_of(node, m) for m, idx in raft["match_index"].items() if idx < raft["commit_index"] - 1000
    ]
    if behind:
        raise AdminRefused(f"members still catching up: {', '.join(map(str, behind))}")
    await _one_change_at_a_time(node, node.raft.add_member(address, timeout_s=MEMBERSHIP_TIMEOUT_S))
    return {"added": node_id, "members": [node_id_of(node, m) for m in node.raft.members()]}


async def remove_member(node: Node, node_id: str) -> dict[str, Any]:
    address = _address_of(node, node_id)
    members = node.raft.members()
    if address not in members:
        raise AdminRefused(f"{node_id} is not a member")
    if len(members) <= 1:
        raise AdminRefused("cannot remove the last member")
    if address == node.spec.raft:
        raise AdminRefused("a node cannot remove itself: ask another member (hand leadership over first)")
    await _one_change_at_a_time(node, node.raft.remove_member(address, timeout_s=MEMBERSHIP_TIMEOUT_S))
    return {"removed": node_id, "members": [node_id_of(node, m) for m in node.raft.members()]}


async def transfer_leadership(node: Node, node_id: str | None) -> dict[str, Any]:
    address = _address_of(node, node_id) if node_id else None
    try:
        await node.raft.transfer_leadership(address, timeout_s=5.0)
    except ProposeFailed as exc:
        raise AdminRefused(f"leadership transfer refused: {exc.reason}") from None
    return {"requested": True}


def digests(node: Node) -> dict[str, Any]:
    """Per-channel (count, last seq, hash of the messages) and one hash of all other replicated state."""
    channels: dict[str, dict[str, Any]] = {}
    state = hashlib.blake2b(digest_size=16)
    with node.store.read() as txn:
        applied = txn.applied_index()
        for name in sorted(DB_NAMES):
            if name == "meta":
                continue
            if name == "messages":
                for key, value in txn.raw_items(name):
                    channel_id, channel_type, used = split_channel_key(key)
                    entry = channels.setdefault(
                        f"{channel_type}:{channel_id}",
                        {"count": 0, "last_seq": 0, "hash": hashlib.blake2b(digest_size=16)},
                    )
                    entry["count"] += 1
                    entry["last_seq"] = int.from_bytes(key[used : used + 8], "big")
                    entry["hash"].update(key)
                    entry["hash"].update(value)
                continue
            state.update(name.encode())
            for key, value in txn.raw_items(name):
                state.update(len(key).to_bytes(2, "big") + key)
                state.update(len(value).to_bytes(4, "big") + value)
        system_uids = cbor2.dumps(txn.meta("system_uids"))
    state.update(system_uids)
    return {
        "id": node.spec.id,
        "applied_index": applied,
        "state": state.hexdigest(),
        "channels": {
            name: {"count": e["count"], "last_seq": e["last_seq"], "hash": e["hash"].hexdigest()}
            for name, e in sorted(channels.items())
        },
    }
