"""Network partitions between real node processes, through the Raft-link proxy (tests/raft_links.py)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from node import operator as op
from node.client import ClientError, open_client
from node.protocol import Reason
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json
from tests.test_cluster import sync_person

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

TUNING = {"commit_timeout_s": 3.0, "node_down_after_s": 1.0}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml", tuning=TUNING, proxied=True))
    try:
        yield cluster
    finally:
        await trio.to_thread.run_sync(cluster.stop_all)


async def leader_seen_by(cluster: Cluster, node_id: str, not_: str, timeout_s: float = 30) -> str:
    """The leader as `node_id` reports it, once it is someone other than `not_`."""
    with trio.fail_after(timeout_s):
        while True:
            status = await trio.to_thread.run_sync(op.node_status, cluster.config, node_id)
            leader = status and status.get("leader")
            if leader and leader != not_:
                return str(leader)
            await trio.sleep(0.1)


async def channel_payloads(cluster: Cluster, node_id: str) -> list[bytes]:
    return [base64.b64decode(str(m["payload"])) for m in await sync_person(cluster, node_id, "alice", "bob")]


async def test_the_proxy_carries_every_raft_link_and_knows_who_dialled(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    async with open_client(*cluster.tcp("n2"), "alice") as alice:
        ack = await alice.send("bob", 1, b"through the proxy")
        assert ack.reason_code == Reason.SUCCESS
    assert cluster.links is not None
    assert cluster.links.unidentified == 0  # every Raft connection was traced to its node process
    assert cluster.links.errors == []
    verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify", "--timeout", "30"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_a_partitioned_leader_acks_nothing_and_the_majority_goes_on(cluster: Cluster) -> None:
    old = await trio.to_thread.run_sync(cluster.start_all)
    follower = next(n for n in ("n1", "n2", "n3") if n != old)
    assert cluster.links is not None
    async with (
        open_client(*cluster.tcp(old), "alice", device_flag=1) as cut_off,
        open_client(*cluster.tcp(follower), "alice", device_flag=2) as majority,
    ):
        cluster.links.cut({old})
        # The old leader still believes it leads for a while; nothing it takes can commit.
        try:
            ack = await cut_off.send("bob", 1, b"during the cut", client_msg_no="cut-1", timeout_s=10)
            assert ack.reason_code != Reason.SUCCESS, "a SENDACK from a leader without a quorum"
        except ClientError:
            pass  # no answer at all is as good: nothing was promised
        new = await leader_seen_by(cluster, follower, not_=old)
        ack = await majority.send("bob", 1, b"majority", client_msg_no="maj-1")
        assert ack.reason_code == Reason.SUCCESS
        cluster.links.heal()
    await trio.to_thread.run_sync(lambda: cluster.wait_caught_up(old, 30))
    # The client retries its unanswered send with the same client_msg_no: stored exactly once.
    async with open_client(*cluster.tcp(new), "alice", device_flag=1) as retry:
        ack = await retry.send("bob", 1, b"during the cut", client_msg_no="cut-1")
        assert ack.reason_code == Reason.SUCCESS
    for node_id in ("n1", "n2", "n3"):
        await trio.to_thread.run_sync(lambda n=node_id: cluster.wait_caught_up(n, 30))
        payloads = await channel_payloads(cluster, node_id)
        assert sorted(payloads) == [b"during the cut", b"majority"], (node_id, payloads)
    verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify", "--timeout", "30"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_a_partitioned_follower_is_declared_down_and_announces_its_users_again_on_heal(
    cluster: Cluster,
) -> None:
    leader = await trio.to_thread.run_sync(cluster.start_all)
    cut_off = next(n for n in ("n1", "n2", "n3") if n != leader)
    assert cluster.links is not None

    async def wait_online(expected: list[dict[str, object]]) -> None:
        with trio.fail_after(40):
            while True:
                status, body = await http_json(
                    cluster.http(leader),
                    "POST",
                    "/user/onlinestatus",
                    ["carol"],
                    headers={"token": MANAGER_TOKEN},
                )
                assert status == 200, body
                if body == expected:
                    return
                await trio.sleep(0.05)

    carol_online = [{"uid": "carol", "device_flag": 0, "online": 1}]
    async with open_client(*cluster.tcp(cut_off), "carol") as carol:
        await wait_online(carol_online)
        cluster.links.cut({cut_off})
        await wait_online([])  # the leader lost the node and cleared its users
        cluster.links.heal()
        # Same process, same connection: the node learns it was declared down and announces carol again.
        await wait_online(carol_online)
        await carol.ping()
        assert "declared down while alive" in cluster.log(cut_off)
