"""Regression tests for the two PySyncObj safety defects raft/safe_syncobj.py closes.

Found by the chaos harness with partitions (seed 2026, 10 minutes): 3 acknowledged messages lost. Each
test drives a real (unticked) PySyncObj node with the messages a delayed network delivers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.node import TCPNode

from raft.safe_syncobj import SafeSyncObj
from tests.conftest import free_port

LEADER_TERM = 1


@pytest.fixture
def nodes() -> Iterator[tuple[str, str]]:
    yield f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"


def follower(cls: type[SyncObj], nodes: tuple[str, str], last: int = 10) -> tuple[Any, list[dict[str, Any]]]:
    """A follower whose log holds 2..`last` at LEADER_TERM (index 1 is PySyncObj's own)."""
    me, other = nodes
    obj: Any = cls(me, [other], SyncObjConf(autoTick=False))
    sent: list[dict[str, Any]] = []
    obj._SyncObj__transport.send = lambda _node, message: sent.append(message)
    obj._SyncObj__setCurrentTerm(LEADER_TERM, None)
    for index in range(2, last + 1):
        obj._SyncObj__raftLog.add(f"cmd-{index}".encode(), index, LEADER_TERM)
    return obj, sent


def log_of(obj: Any) -> list[tuple[int, int]]:
    return [(index, term) for _cmd, index, term in obj._SyncObj__raftLog[:]]


def append_entries(prev: int, entries: list[tuple[int, int]], commit: int = 0) -> dict[str, Any]:
    return {
        "type": "append_entries",
        "term": LEADER_TERM if not entries else max(term for _i, term in entries),
        "commit_index": commit,
        "prevLogIdx": prev,
        "prevLogTerm": LEADER_TERM,
        "entries": [
            (f"cmd-{i}".encode() if t == LEADER_TERM else f"new-{i}".encode(), i, t) for i, t in entries
        ],
    }


def deliver(obj: Any, nodes: tuple[str, str], message: dict[str, Any]) -> None:
    obj._SyncObj__onMessageReceived(TCPNode(nodes[1]), message)


def test_stock_pysyncobj_shortens_a_follower_log_on_a_delayed_append_entries(nodes: tuple[str, str]) -> None:
    """The defect itself, in the installed PySyncObj: what the follower acknowledged up to 10 is cut to 7."""
    obj, _sent = follower(SyncObj, nodes)
    deliver(obj, nodes, append_entries(5, [(6, 1), (7, 1)]))
    assert log_of(obj)[-1] == (7, 1)
    obj._destroy()


def test_a_delayed_append_entries_truncates_nothing_that_matches(nodes: tuple[str, str]) -> None:
    obj, sent = follower(SafeSyncObj, nodes)
    deliver(obj, nodes, append_entries(5, [(6, 1), (7, 1)], commit=10))
    assert log_of(obj)[-1] == (10, 1)  # still everything it acknowledged
    assert sent[-1] == {
        "type": "next_node_idx",
        "next_node_idx": 8,
        "reset": False,
        "success": True,
        "term": 1,
    }
    # Entries 8..10 were not verified by this message: they must not count as committed because of it.
    assert obj._SyncObj__raftCommitIndex <= 7
    obj._destroy()


def test_a_real_conflict_still_truncates_from_the_first_conflicting_entry(nodes: tuple[str, str]) -> None:
    obj, sent = follower(SafeSyncObj, nodes)
    deliver(obj, nodes, append_entries(5, [(6, 1), (7, 2), (8, 2)]))
    assert log_of(obj)[5:] == [(6, 1), (7, 2), (8, 2)]
    assert sent[-1]["next_node_idx"] == 9 and sent[-1]["success"] is True
    obj._destroy()


def test_entries_past_the_end_are_appended_without_truncating(nodes: tuple[str, str]) -> None:
    obj, sent = follower(SafeSyncObj, nodes)
    deliver(obj, nodes, append_entries(8, [(9, 1), (10, 1), (11, 1), (12, 1)]))
    assert [i for i, _t in log_of(obj)] == list(range(1, 13))
    assert sent[-1]["next_node_idx"] == 13
    obj._destroy()


def test_stock_pysyncobj_takes_a_reply_from_any_term(nodes: tuple[str, str]) -> None:
    """The defect itself: a reply from term 0 raises the matchIndex of a leader of term 1."""
    obj, _sent = follower(SyncObj, nodes)
    obj._SyncObj__onBecomeLeader()
    stale = {"type": "next_node_idx", "next_node_idx": 11, "reset": False, "success": True, "term": 0}
    deliver(obj, nodes, stale)
    assert obj._SyncObj__raftMatchIndex[TCPNode(nodes[1])] == 10
    obj._destroy()


def test_a_leader_ignores_a_reply_from_another_term(nodes: tuple[str, str]) -> None:
    obj, _sent = follower(SafeSyncObj, nodes)
    obj._SyncObj__onBecomeLeader()
    other = TCPNode(nodes[1])
    stale = {"type": "next_node_idx", "next_node_idx": 11, "reset": False, "success": True, "term": 0}
    deliver(obj, nodes, stale)
    assert obj._SyncObj__raftMatchIndex[other] == 0
    deliver(obj, nodes, {**stale, "term": LEADER_TERM})
    assert obj._SyncObj__raftMatchIndex[other] == 10
    obj._destroy()


def snapshot_start(commit: int) -> dict[str, Any]:
    """What a leader sends first when a follower is behind its compacted log: no data yet."""
    return {"type": "append_entries", "term": 2, "commit_index": commit, "serialized": None}


def test_stock_pysyncobj_commits_its_own_tail_on_a_snapshot_message(nodes: tuple[str, str]) -> None:
    """The defect itself: entries 6..10 were never confirmed by the new leader, yet they become committed."""
    obj, _sent = follower(SyncObj, nodes)
    obj._SyncObj__raftCommitIndex = 5
    deliver(obj, nodes, snapshot_start(commit=100))
    assert obj._SyncObj__raftCommitIndex == 10
    obj._destroy()


def test_a_snapshot_message_commits_nothing_of_this_log(nodes: tuple[str, str]) -> None:
    # The 10-minute partition run: an old leader applied and acknowledged its uncommitted entries the moment
    # the partition healed, through the new leader's first snapshot message, then lost them to the snapshot.
    obj, _sent = follower(SafeSyncObj, nodes)
    obj._SyncObj__raftCommitIndex = 5
    deliver(obj, nodes, snapshot_start(commit=100))
    assert obj._SyncObj__raftCommitIndex == 5
    assert obj.raftCurrentTerm == 2  # the message still counts as the new leader's (term, leader, timer)
    obj._destroy()
