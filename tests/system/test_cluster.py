"""A real 3-node cluster (processes on 127.0.0.1): cross-node delivery, join/remove, failover, catch-up."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.client import Client, ClientError, open_client
from node.tools import operator as op
from node.wire.protocol import Reason, Sendack
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in child processes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(write_cluster_toml(tmp_path / "cluster.toml"))
    try:
        yield running
    finally:
        running.stop_all()


async def sync_person(cluster: Cluster, node_id: str, login_uid: str, peer: str) -> list[dict[str, object]]:
    status, body = await http_json(
        cluster.http(node_id),
        "POST",
        "/channel/messagesync",
        {
            "login_uid": login_uid,
            "channel_id": peer,
            "channel_type": 1,
            "start_message_seq": 1,
            "limit": 10_000,
            "pull_mode": 1,
        },
        headers={"token": MANAGER_TOKEN},
    )
    assert status == 200, body
    return list(body["messages"])


async def test_any_node_serves_any_client_with_cluster_wide_seqs(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    status, body = await http_json(
        cluster.http("n2"),
        "POST",
        "/channel",
        {"channel_id": "g1", "channel_type": 2, "subscribers": ["alice", "bob", "carol", "dave"]},
        headers={"token": MANAGER_TOKEN},
    )
    assert status == 200, body
    async with (
        open_client(*cluster.tcp("n1"), "alice") as alice,
        open_client(*cluster.tcp("n3"), "bob") as bob,
        open_client(*cluster.tcp("n2"), "carol") as carol,
    ):
        ack = await alice.send("bob", 1, b'{"content":"from n1","type":1}')
        assert ack.reason_code == Reason.SUCCESS and ack.message_seq == 1
        got = await bob.recv()
        assert (got.from_uid, got.message_id, got.message_seq) == ("alice", ack.message_id, 1)
        reply = await bob.send("alice", 1, b"from n3")
        assert reply.message_seq == 2  # one sequence for the channel, whichever node took the send
        assert (await alice.recv()).message_seq == 2

        async def offline_notices(node_id: str) -> int:
            status, body = await http_json(
                cluster.http(node_id), "GET", "/admin/status", headers={"token": MANAGER_TOKEN}
            )
            assert status == 200, body
            return int(body["messages"]["offline_notices"])

        notices_before = await offline_notices("n2")
        group = await carol.send("g1", 2, b"to the group")
        assert group.reason_code == Reason.SUCCESS
        for member in (alice, bob):
            message = await member.recv()
            assert (message.channel_id, message.message_id) == ("g1", group.message_id)
        # n2 took the send: of the members with no device on n2, alice and bob are online on other nodes
        # (presence), dave nowhere: one offline notice, counted once n2 has pushed the message.
        with trio.fail_after(10):
            while True:
                notices = await offline_notices("n2") - notices_before
                if notices:
                    break
                await trio.sleep(0.05)
        assert notices == 1

        # A node does no push work for recipients with no device on it: n2 (carol only) pushes nothing of
        # alice's messages to bob; n3 (bob) one push each. The marker to carol comes after them in the log,
        # so once carol has it, n2 has distributed all of them.
        async def pushes(node_id: str) -> int:
            status, pools = await http_json(
                cluster.http(node_id), "GET", "/admin/pools", headers={"token": MANAGER_TOKEN}
            )
            assert status == 200, pools
            return int(pools["pusher"]["processed"])

        before = {node_id: await pushes(node_id) for node_id in ("n2", "n3")}
        acks = await alice.send_many([("bob", 1, b"m%d" % i) for i in range(20)])
        assert all(a.reason_code == Reason.SUCCESS for a in acks)
        assert [(await bob.recv()).message_id for _ in acks] == [a.message_id for a in acks]
        marker = await alice.send("carol", 1, b"marker")
        assert (await carol.recv()).message_id == marker.message_id
        assert await pushes("n2") - before["n2"] == 1
        assert await pushes("n3") - before["n3"] == 20
    verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify"))
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def wait_logged(cluster: Cluster, node_id: str, *words: str, timeout_s: float = 15.0) -> str:
    """The first line of the node's node.log holding every word, tagged with the node's name."""
    with trio.fail_after(timeout_s):
        while True:
            for line in cluster.log(node_id).splitlines():
                if f"[{node_id}]" in line and all(word in line for word in words):
                    return line
            await trio.sleep(0.1)


async def test_join_catches_up_and_serves_then_remove(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    async with open_client(*cluster.tcp("n1"), "alice") as alice:
        acks = await alice.send_many([("bob", 1, f"m{i}".encode()) for i in range(500)])
        assert all(a.reason_code == Reason.SUCCESS for a in acks)

    joined = await trio.to_thread.run_sync(lambda: cluster.cli("cluster", "join", "--node", "n4"))
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert "caught up" in joined.stdout
    again = await trio.to_thread.run_sync(lambda: cluster.cli("cluster", "join", "--node", "n4"))
    assert again.returncode == 1 and "already a member" in again.stderr
    await wait_logged(cluster, "n1", "members now:", "(added n4)")

    stored = await sync_person(cluster, "n4", "alice", "bob")
    assert [m["message_seq"] for m in stored] == list(range(1, 501))
    async with (
        open_client(*cluster.tcp("n4"), "bob") as bob,
        open_client(*cluster.tcp("n2"), "alice") as alice,
    ):
        ack = await alice.send("bob", 1, b"to n4")
        assert (await bob.recv()).message_id == ack.message_id and ack.message_seq == 501
    verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify"))
    assert verify.returncode == 0 and "4 nodes agree" in verify.stdout, verify.stdout + verify.stderr

    removed = await trio.to_thread.run_sync(lambda: cluster.cli("cluster", "remove", "--node", "n4"))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    status = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "status", "--json"))
    report = json.loads(status.stdout)
    leader = next(n for n in report["nodes"] if n["id"] == report["leader"])
    assert sorted(leader["members"]) == ["n1", "n2", "n3"]
    # Configured but no longer a member: shown as such, not as down, and not counted against health.
    assert next(n for n in report["nodes"] if n["id"] == "n4")["role"] == "not a member"
    assert status.returncode == 0 and report["down"] == []
    gone = await trio.to_thread.run_sync(lambda: cluster.cli("cluster", "remove", "--node", "n4"))
    assert gone.returncode == 1 and "not a member" in gone.stderr
    await wait_logged(cluster, "n1", "members now:", "(removed n4)")


async def test_leader_kill_9_under_pipelined_load_loses_and_duplicates_nothing(cluster: Cluster) -> None:
    leader = await trio.to_thread.run_sync(cluster.start_all)
    followers = [n for n in ("n1", "n2", "n3") if n != leader]
    acked: dict[str, tuple[int, int]] = {}  # client_msg_no -> (message_id, message_seq)
    total = 1500
    failover_s: float | None = None

    async def send_all() -> None:
        nonlocal failover_s
        pending = [f"w-{i}" for i in range(total)]
        killed_at: float | None = None
        node_index = 0
        deadline = trio.current_time() + 90
        while pending and trio.current_time() < deadline:
            node_id = followers[node_index % len(followers)]
            try:
                async with open_client(*cluster.tcp(node_id), "writer") as writer:
                    while pending:
                        window = pending[:100]
                        seqs = [
                            await writer.submit("reader", 1, cmn.encode(), client_msg_no=cmn)
                            for cmn in window
                        ]
                        retry: list[str] = []
                        for cmn, seq in zip(window, seqs, strict=True):
                            try:
                                ack = await writer.wait_ack(seq, timeout_s=15)
                            except ClientError:
                                retry.append(cmn)
                                continue
                            if ack.reason_code == Reason.SUCCESS:
                                if killed_at is not None and failover_s is None and cmn not in acked:
                                    failover_s = time.monotonic() - killed_at
                                assert acked.setdefault(cmn, (ack.message_id, ack.message_seq)) == (
                                    ack.message_id,
                                    ack.message_seq,
                                ), f"{cmn} acknowledged twice with different ids"
                            else:
                                retry.append(cmn)  # reason 15 after the commit timeout: safe to resend
                        pending = retry + pending[len(window) :]
                        if killed_at is None and len(acked) >= total // 3:
                            await trio.to_thread.run_sync(cluster.kill9, leader)
                            killed_at = time.monotonic()
            except ClientError:
                await trio.sleep(0.2)
            node_index += 1
        assert not pending, f"{len(pending)} sends never acknowledged"

    await send_all()
    assert len(acked) == total and failover_s is not None
    # Bring the old leader back: it must catch up and agree.
    await trio.to_thread.run_sync(cluster.start, leader)
    await trio.to_thread.run_sync(cluster.wait_serving, leader)
    await trio.to_thread.run_sync(cluster.wait_caught_up, leader)
    for node_id in ("n1", "n2", "n3"):
        stored = await sync_person(cluster, node_id, "writer", "reader")
        seqs = [m["message_seq"] for m in stored]
        assert seqs == list(range(1, len(seqs) + 1)), f"{node_id}: gaps or reordering"
        by_cmn: dict[str, list[tuple[int, int]]] = {}
        for m in stored:
            by_cmn.setdefault(str(m["client_msg_no"]), []).append(
                (int(str(m["message_id"])), int(str(m["message_seq"])))
            )
        duplicates = {cmn: rows for cmn, rows in by_cmn.items() if len(rows) > 1}
        assert not duplicates, f"{node_id}: duplicated sends {list(duplicates)[:5]}"
        for cmn, ids in acked.items():
            assert by_cmn.get(cmn) == [ids], (
                f"{node_id}: acknowledged {cmn} {ids} stored as {by_cmn.get(cmn)}"
            )
        assert all(base64.b64decode(str(m["payload"])).decode() == m["client_msg_no"] for m in stored)
    verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"failover (leader kill -9 -> first new ack): {failover_s:.2f}s")


async def test_follower_restarted_after_a_snapshot_catches_up_identical(tmp_path: Path) -> None:
    config = write_cluster_toml(
        tmp_path / "cluster.toml", tuning={"log_compaction_min_entries": 20, "log_compaction_min_time_s": 1.0}
    )
    cluster = Cluster(config)
    try:
        await trio.to_thread.run_sync(cluster.start_all)
        behind = "n3" if op.cluster_status(cluster.config)["leader"] != "n3" else "n2"
        await trio.to_thread.run_sync(cluster.kill9, behind)
        entry = next(n for n in ("n1", "n2", "n3") if n != behind)
        async with open_client(*cluster.tcp(entry), "alice") as alice:
            for batch in range(30):  # many entries, so the others compact their logs past the follower
                acks = await alice.send_many([("bob", 1, f"b{batch}-{i}".encode()) for i in range(50)])
                assert all(a.reason_code == Reason.SUCCESS for a in acks)
        live = [n for n in ("n1", "n2", "n3") if n != behind]

        def compacted() -> bool:  # every live node has cut its log below what the follower missed
            statuses = [op.node_status(cluster.config, n) for n in live]
            return all(s is not None and s["log_len"] < 25 for s in statuses)

        with trio.fail_after(30):
            while not await trio.to_thread.run_sync(compacted):  # noqa: ASYNC110 - state in other processes
                await trio.sleep(0.2)
        await trio.to_thread.run_sync(cluster.start, behind)
        await trio.to_thread.run_sync(cluster.wait_serving, behind)
        verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify", "--timeout", "60"))
        assert verify.returncode == 0, verify.stdout + verify.stderr + cluster.log(behind)[-2000:]
        assert "1500 messages" in verify.stdout
        installed = "installed snapshot" in cluster.log(behind)
        assert installed, "the restarted follower caught up without a snapshot: the test did not test that"
        await wait_logged(cluster, behind, "installed snapshot at applied index")
        await wait_logged(cluster, behind, "store replaced by a snapshot", "clients asked to resync")
    finally:
        cluster.stop_all()


async def online_on(cluster: Cluster, node_id: str, uids: list[str]) -> list[dict[str, object]]:
    status, body = await http_json(
        cluster.http(node_id), "POST", "/user/onlinestatus", uids, headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, body
    return list(body)


async def test_presence_is_replicated_and_a_login_elsewhere_kicks_the_older_one(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)

    async def wait_online(node_id: str, expected: list[dict[str, object]]) -> None:
        with trio.fail_after(10):
            while await online_on(cluster, node_id, ["alice", "bob"]) != expected:  # noqa: ASYNC110
                await trio.sleep(0.05)

    # Without token auth every device is a slave: a login replaces the same device id only, and closes it
    # without DISCONNECT (tests/system/test_compat.py has the master rule across nodes).
    async with open_client(*cluster.tcp("n1"), "alice", device_flag=1, device_id="d1") as first:
        await wait_online("n3", [{"uid": "alice", "device_flag": 1, "online": 1}])
        async with open_client(*cluster.tcp("n2"), "alice", device_flag=1, device_id="d1") as second:
            with trio.fail_after(10):
                await first.disconnected.wait()
            assert first.disconnect_reason is None
            await second.ping()
            await wait_online("n1", [{"uid": "alice", "device_flag": 1, "online": 1}])
        await wait_online("n3", [])


async def test_a_lost_node_is_declared_down_and_a_restart_clears_its_old_presence(tmp_path: Path) -> None:
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml", tuning={"node_down_after_s": 1.0}))
    try:
        leader = await trio.to_thread.run_sync(cluster.start_all)
        lost = next(n for n in ("n1", "n2", "n3") if n != leader)
        watcher = next(n for n in ("n1", "n2", "n3") if n not in (leader, lost))

        async def wait_online(expected: list[dict[str, object]]) -> None:
            with trio.move_on_after(40):  # node_down_after_s is 1 s; CI runs this beside the whole suite
                while await online_on(cluster, watcher, ["carol"]) != expected:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                return
            logs = "\n".join(f"--- {n} ---\n{cluster.log(n)[-3000:]}" for n in ("n1", "n2", "n3"))
            raise AssertionError(
                f"carol is not {expected} on {watcher} (leader {leader}, lost {lost})\n{logs}"
            )

        async with open_client(*cluster.tcp(lost), "carol"):
            await wait_online([{"uid": "carol", "device_flag": 0, "online": 1}])
            await trio.to_thread.run_sync(cluster.kill9, lost)  # no offline event ever leaves it
            await wait_online([])  # the leader declared the node down
        await trio.to_thread.run_sync(cluster.start, lost)
        await trio.to_thread.run_sync(cluster.wait_serving, lost)
        async with open_client(*cluster.tcp(lost), "carol"):
            await wait_online([{"uid": "carol", "device_flag": 0, "online": 1}])
    finally:
        cluster.stop_all()


def test_cluster_up_starts_every_member_and_ctrl_c_stops_them_cleanly(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    config = write_cluster_toml(tmp_path / "cluster.toml")
    up = subprocess.Popen(
        [sys.executable, "-m", "node.tools.cli", "cluster", "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    assert up.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            lines.append(line)
            if "is up" in line or not line:
                break
        assert any("is up" in line for line in lines), "".join(lines)
        assert sum(" tcp 127.0.0.1:" in line for line in lines) == 3
        status = Cluster(config).cli("admin", "status", "--json")
        report = json.loads(status.stdout)
        assert report["leader"] in ("n1", "n2", "n3")
        assert sorted(n["role"] for n in report["nodes"] if n["id"] != "n4") in (
            ["follower", "follower", "leader"],
        )
        clash = Cluster(config).cli("node", "start", "--node", "n1")
        assert clash.returncode == 1 and "cannot listen" in clash.stderr
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            # SIGTERM first: `cluster up` stops its nodes; a bare kill would orphan them.
            up.send_signal(signal.SIGTERM)
            try:
                up.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.communicate(timeout=10)
            Cluster(config).stop_all()
    assert up.returncode == 0, "".join(lines) + rest
    assert rest.count("stopped (exit code 0)") == 3 and "cluster stopped" in rest


async def test_followers_forward_their_sends_into_the_leaders_entries(cluster: Cluster) -> None:
    """One proposal stream: sends taken by followers reach the leader's proposer and share its entries;
    a SENDACK from a follower still means the message is readable on that follower."""
    leader = await trio.to_thread.run_sync(cluster.start_all)
    followers = [n for n in cluster.config.initial_members if n != leader]

    async def proposer(node_id: str) -> dict[str, int]:
        status, body = await http_json(
            cluster.http(node_id), "GET", "/admin/status", headers={"token": MANAGER_TOKEN}
        )
        assert status == 200, body
        return dict(body["proposer"])

    before = {n: await proposer(n) for n in cluster.config.initial_members}
    async with (
        open_client(*cluster.tcp(followers[0]), "fa") as fa,
        open_client(*cluster.tcp(followers[1]), "fb") as fb,
        open_client(*cluster.tcp(leader), "ld") as ld,
    ):
        sends = 60
        acks: dict[str, list[Sendack]] = {}

        async def burst(client: Client, name: str, peer: str) -> None:
            acks[name] = await client.send_many(
                [(peer, 1, b"%s-%d" % (name.encode(), i)) for i in range(sends)]
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(burst, fa, "fa", "fb")
            nursery.start_soon(burst, fb, "fb", "ld")
            nursery.start_soon(burst, ld, "ld", "fa")
        for name in ("fa", "fb", "ld"):
            assert all(a.reason_code == Reason.SUCCESS for a in acks[name]), name
        # Read on the follower that acknowledged, at once: the SENDACK waited for its own apply.
        stored = await sync_person(cluster, followers[0], "fa", "fb")
        assert len(stored) == sends
    after = {n: await proposer(n) for n in cluster.config.initial_members}
    for follower in followers:
        assert after[follower]["forwarded"] - before[follower]["forwarded"] >= sends
    assert after[leader]["forwarded_in"] - before[leader]["forwarded_in"] >= 2 * sends
    # The leader made the entries: far fewer of them than sends.
    leader_entries = after[leader]["entries"] - before[leader]["entries"]
    assert leader_entries < 3 * sends / 2, after[leader]
    verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
