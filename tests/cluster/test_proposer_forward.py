"""The leader's side of one proposal stream, on a real single-node Raft (it leads): a member's forwarded
batch is proposed and answered with its results and the entry's index; a node that does not lead answers
at once that it does not, so the member asks whoever leads instead of waiting."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from node.cluster.proposer import ANSWER, FORWARD, Proposer
from raft.bridge import RaftNode
from storage.store import Store
from tests.conftest import free_port
from tests.raft.test_machine import COMMIT_TIMEOUT_S, fast_settings, group_setup, running_node, send

MEMBER = "127.0.0.1:9"  # a follower's Raft address (not connected: what is sent to it is recorded here)


def recording(raft: RaftNode) -> list[tuple[str, Any]]:
    """What the proposer sends to members, recorded instead of queued for a member that is not there."""
    sent: list[tuple[str, Any]] = []
    raft.send_to_member = lambda address, body: sent.append((address, body))  # type: ignore[method-assign]
    return sent


def proposer(raft: RaftNode) -> Proposer:
    return Proposer(raft, batch_window_ms=1.0, batch_max_bytes=1 << 20, commit_timeout_s=COMMIT_TIMEOUT_S)


@pytest.mark.filterwarnings(
    r"ignore:Exception ignored in.*raft\.journal\.meta:pytest.PytestUnraisableExceptionWarning"
)
async def test_the_leader_proposes_a_members_batch_and_answers_with_results_and_index(
    tmp_path: os.PathLike[str],
) -> None:
    store = Store(os.path.join(tmp_path, "store"), map_size=64 << 20)
    try:
        async with running_node(fast_settings(tmp_path, free_port()), store) as running:
            await running.propose([group_setup("g", ["u1"])])
            leader = proposer(running.node)
            sent = recording(running.node)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leader.run)
                ops = [send("g", "u1", "m1", 11), send("g", "u1", "m2", 12)]
                leader.on_member_message(MEMBER, {"k": FORWARD, "id": 7, "ops": ops})
                leader.on_member_message(MEMBER, {"k": FORWARD, "id": 8, "ops": "not a list"})  # dropped
                with trio.fail_after(COMMIT_TIMEOUT_S):
                    while not sent:  # noqa: ASYNC110 - the answer goes out from the proposer's task
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        [(address, answer)] = sent
        assert address == MEMBER and answer["k"] == ANSWER and answer["id"] == 7
        assert answer["i"] >= 2 and [r["seq"] for r in answer["r"]] == [1, 2]
        assert leader.statistics()["forwarded_in"] == 2
    finally:
        store.close()


async def test_a_node_that_does_not_lead_answers_so_at_once(tmp_path: os.PathLike[str]) -> None:
    store = Store(os.path.join(tmp_path, "store"), map_size=64 << 20)
    try:
        raft = RaftNode(fast_settings(tmp_path, free_port()), store)  # not started: leads nothing
        follower = proposer(raft)
        sent = recording(raft)
        follower.on_member_message(MEMBER, {"k": FORWARD, "id": 3, "ops": [send("g", "u1", "m", 1)]})
        assert sent == [(MEMBER, {"k": ANSWER, "id": 3, "err": "not_leader"})]
        assert follower.statistics()["queued"] == 0
        # An answer for a forward nobody is waiting for, or from another member than the one asked, is no
        # completion of anything (and no error).
        follower.on_member_message("127.0.0.1:10", {"k": ANSWER, "id": 3, "i": 5, "r": []})
    finally:
        store.close()
