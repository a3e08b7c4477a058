"""Webhooks against a real local HTTP receiver: retries, an outage across a leader kill -9, dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from node.client import open_client
from node.wire.protocol import Reason
from tests.api.test_http_api import http_text
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import free_port, http_json

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@dataclass
class Receiver:
    """A webhook receiver: records every POST; can fail the next N, or be down (connection refused)."""

    port: int = field(default_factory=free_port)
    posts: list[tuple[str, Any, str]] = field(default_factory=list)  # (event, body, event id)
    fail_next: int = 0
    failed: int = 0
    _scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def up(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                body += chunk
            event = lines[0].split()[1].split("event=", 1)[1]
            if self.fail_next > 0:
                self.fail_next -= 1
                self.failed += 1
                await stream.send_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                return
            self.posts.append((event, json.loads(body), headers.get("x-imnode-event-id", "")))
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def notified(self) -> list[dict[str, Any]]:
        return [m for event, body, _id in self.posts if event == "msg.notify" for m in body]

    def ranges(self, stream: str) -> list[tuple[int, int]]:
        found = []
        for _event, _body, event_id in self.posts:
            name, _, span = event_id.partition(":")
            if name == stream:
                first, _, last = span.partition("-")
                found.append((int(first), int(last)))
        return found


def webhook_toml(receiver: Receiver, **settings: Any) -> str:
    lines = ["", "[webhook]", f'url = "{receiver.url}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def token_auth_on(path: Path) -> None:
    path.write_text(path.read_text().replace("[cluster]\n", "[cluster]\ntoken_auth = true\n", 1))


async def as_master(cluster: Cluster, node_id: str, *uids: str) -> None:
    """msg.offline leaves out a user only while a *master* device of it is online (WuKongIM), and a device
    is a master only through a `/user/token` with device_level 1 under token auth: give each uid one,
    committed on the node it will log in to. Its token is `<uid>-t`."""
    for uid in uids:
        body = {"uid": uid, "token": f"{uid}-t", "device_flag": 0, "device_level": 1}
        status, answer = await http_json(
            cluster.http(node_id), "POST", "/user/token", body, headers={"token": MANAGER_TOKEN}
        )
        assert (status, answer) == (200, {"status": 200}), answer


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the state changes in other processes
            await trio.sleep(0.05)


async def test_events_survive_failures_a_receiver_outage_and_a_leader_kill_9(tmp_path: Path) -> None:
    receiver = Receiver(fail_next=3)
    config = write_cluster_toml(tmp_path / "cluster.toml")
    token_auth_on(config)
    append(config, webhook_toml(receiver, attempts=1000, backoff_initial_s=0.05, backoff_max_s=0.3))
    cluster = Cluster(config)
    async with trio.open_nursery() as nursery:
        await receiver.up(nursery)
        try:
            leader = await trio.to_thread.run_sync(cluster.start_all)
            entry = next(n for n in ("n1", "n2", "n3") if n != leader)
            status, body = await http_json(
                cluster.http(entry),
                "POST",
                "/channel",
                {"channel_id": "g", "channel_type": 2, "subscribers": ["alice", "bob", "carol"]},
                headers={"token": MANAGER_TOKEN},
            )
            assert status == 200, body
            acked: list[int] = []
            await as_master(cluster, entry, "alice", "bob")
            async with (
                open_client(*cluster.tcp(entry), "alice", token="alice-t") as alice,
                open_client(*cluster.tcp(entry), "bob", token="bob-t"),
            ):

                async def send(count: int) -> None:
                    acks = await alice.send_many(
                        [("g", 2, f"m{len(acked) + i}".encode()) for i in range(count)]
                    )
                    assert all(a.reason_code == Reason.SUCCESS for a in acks)
                    acked.extend(a.message_id for a in acks)

                # msg.offline names who is offline when it is sent: let bob's presence replicate first.
                async def online() -> int:
                    _status, body = await http_json(
                        cluster.http(leader),
                        "POST",
                        "/user/onlinestatus",
                        ["alice", "bob"],
                        headers={"token": MANAGER_TOKEN},
                    )
                    return len(body)

                with trio.fail_after(10):
                    while await online() < 2:  # noqa: ASYNC110 - presence is applied in other processes
                        await trio.sleep(0.02)
                await send(20)
                await wait_until(lambda: len(receiver.notified()) >= 20, 30, "first 20 delivered")
                assert receiver.failed == 3  # the first attempts failed and were retried
                receiver.down()
                await send(20)
                await trio.to_thread.run_sync(cluster.kill9, leader)
                await trio.to_thread.run_sync(lambda: cluster.wait_leader(30, exclude=leader))
                await send(20)
                await receiver.up(nursery)
                delivered = lambda: {m["message_id"] for m in receiver.notified()}  # noqa: E731
                await wait_until(lambda: set(acked) <= delivered(), 60, "all 60 delivered")
            # In order: each event is first delivered after every event before it.
            first_seen: list[int] = []
            for first, last in receiver.ranges("notify"):
                for seq in range(first, last + 1):
                    if seq not in first_seen:
                        first_seen.append(seq)
            assert first_seen == sorted(first_seen) and first_seen[0] == 1
            notified_seqs = [m["message_seq"] for m in receiver.notified()]
            assert sorted(set(notified_seqs)) == list(range(1, 61))
            # msg.offline names the subscribers with no device online anywhere: carol, never alice or bob.
            offline = [body for event, body, _ in receiver.posts if event == "msg.offline"]
            assert offline and all(o["to_uids"] == ["carol"] for o in offline), [
                o["to_uids"] for o in offline
            ]
            statuses = [s for event, body, _ in receiver.posts if event == "user.onlinestatus" for s in body]
            assert any(s.startswith("alice-0-1-") for s in statuses)
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
            nursery.cancel_scope.cancel()


async def test_undeliverable_events_become_dead_letters_and_replay_delivers_them(tmp_path: Path) -> None:
    receiver = Receiver()
    config = write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1)
    append(config, webhook_toml(receiver, attempts=2, backoff_initial_s=0.05, events=["msg.notify"]))
    cluster = Cluster(config)
    try:
        await trio.to_thread.run_sync(cluster.start_all)  # the receiver is down: nothing listens on its port
        async with open_client(*cluster.tcp("n1"), "alice") as alice:
            acks = await alice.send_many([("bob", 1, f"d{i}".encode()) for i in range(5)])
        assert all(a.reason_code == Reason.SUCCESS for a in acks)

        def dead() -> list[dict[str, Any]]:
            listing = cluster.cli("admin", "deadletters", "--json")
            assert listing.returncode == 0, listing.stderr
            return list(json.loads(listing.stdout)["deadletters"])

        with trio.fail_after(30):
            while len(await trio.to_thread.run_sync(dead)) < 5:  # noqa: ASYNC110
                await trio.sleep(0.1)
        letters = await trio.to_thread.run_sync(dead)
        assert {d["event"] for d in letters} == {"msg.notify"} and all(d["attempts"] == 2 for d in letters)
        text = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "deadletters"))
        assert "5 dead letters" in text.stdout

        async with trio.open_nursery() as nursery:
            await receiver.up(nursery)
            replay = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "deadletters", "--replay"))
            assert replay.returncode == 0, replay.stdout + replay.stderr
            assert "replayed 5" in replay.stdout
            assert sorted(m["message_id"] for m in receiver.notified()) == sorted(a.message_id for a in acks)
            assert await trio.to_thread.run_sync(dead) == []
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(cluster.stop_all)


async def test_dead_letters_stay_within_their_cap_on_every_node_and_the_dropped_are_counted(
    tmp_path: Path,
) -> None:
    # Issue 19 item 6: anonymous login/close cycles against a receiver that never answers grew the
    # replicated dead letters without limit (6,000 after 3,000 cycles). Capped per stream in apply.
    receiver = Receiver()  # never started: nothing listens on its port
    cap, cycles = 20, 40
    config = write_cluster_toml(tmp_path / "cluster.toml", nodes=3, initial=3)
    settings = {"attempts": 1, "backoff_initial_s": 0.05, "batch_max": 7, "events": ["user.onlinestatus"]}
    append(config, webhook_toml(receiver, deadletters_max=cap, **settings))
    cluster = Cluster(config)
    try:
        leader = await trio.to_thread.run_sync(cluster.start_all)
        for i in range(cycles):
            async with open_client(*cluster.tcp(f"n{i % 3 + 1}"), f"anon{i}"):
                pass

        async def report(node_id: str) -> dict[str, Any]:
            status, body = await http_json(
                cluster.http(node_id), "GET", "/admin/deadletters", headers={"token": MANAGER_TOKEN}
            )
            assert status == 200, body
            return dict(body)

        # Every login and every close is one user.onlinestatus event; all of them end as dead letters.
        with trio.fail_after(60):
            while (r := await report(leader))["kept"]["online"] + r["dropped"]["online"] < 2 * cycles:  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert r["pending"]["online"] == 0 and r["deadletters_max"] == cap
        assert (r["kept"]["online"], r["dropped"]["online"]) == (cap, 2 * cycles - cap)
        # The newest are kept, the oldest dropped; every node holds the same list and counts.
        seqs = [d["seq"] for d in r["deadletters"]]
        assert seqs == list(range(2 * cycles - cap + 1, 2 * cycles + 1))
        for node_id in ("n1", "n2", "n3"):
            with trio.fail_after(15):
                while (other := await report(node_id))["dropped"] != r["dropped"]:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            assert [d["seq"] for d in other["deadletters"]] == seqs and other["kept"] == r["kept"]

        _, _, text = await http_text(cluster.http(leader), "GET", "/metrics", {"token": MANAGER_TOKEN})
        assert f'imnode_webhook_deadletters{{stream="online"}} {cap}' in text, text[-2000:]
        assert f'imnode_webhook_deadletters_dropped_total{{stream="online"}} {2 * cycles - cap}' in text
        listing = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "deadletters"))
        assert f"{cap} dead letters" in listing.stdout
        assert (
            f"over the cap of {cap} per stream: notify 0, offline 0, online {2 * cycles - cap}"
            in listing.stdout
        )
    finally:
        await trio.to_thread.run_sync(cluster.stop_all)


async def online_uids(cluster: Cluster, node_id: str, uids: list[str]) -> set[str]:
    """The uids among `uids` that `node_id`'s replicated presence shows online."""
    status, body = await http_json(
        cluster.http(node_id), "POST", "/user/onlinestatus", uids, headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, body
    return {row["uid"] for row in body}


async def wait_online(cluster: Cluster, node_id: str, uids: list[str], wanted: set[str]) -> None:
    with trio.fail_after(15):
        while await online_uids(cluster, node_id, uids) != wanted:  # noqa: ASYNC110 - other processes
            await trio.sleep(0.02)


async def test_msg_offline_never_lists_a_recipient_that_was_online_when_the_message_was_sent(
    tmp_path: Path,
) -> None:
    # Issue 13: bob received a message live, yet msg.offline listed him. The POST went out later (a
    # backlog, a receiver outage) and to_uids was computed from who was online then: bob had left.
    receiver = Receiver()
    config = write_cluster_toml(tmp_path / "cluster.toml")
    hook = webhook_toml(receiver, events=["msg.offline"], attempts=1000, backoff_initial_s=0.05)
    token_auth_on(config)
    append(config, hook + "backoff_max_s = 0.2\n")
    cluster = Cluster(config)
    uids = ["alice", "bob", "carol"]
    async with trio.open_nursery() as nursery:
        try:
            leader = await trio.to_thread.run_sync(cluster.start_all)
            follower = next(n for n in ("n1", "n2", "n3") if n != leader)
            status, body = await http_json(
                cluster.http(leader),
                "POST",
                "/channel",
                {"channel_id": "g", "channel_type": 2, "subscribers": uids},
                headers={"token": MANAGER_TOKEN},
            )
            assert status == 200, body
            await as_master(cluster, leader, "alice")
            await as_master(cluster, follower, "bob")
            async with open_client(*cluster.tcp(leader), "alice", token="alice-t") as alice:
                async with open_client(*cluster.tcp(follower), "bob", token="bob-t") as bob:
                    await wait_online(cluster, leader, uids, {"alice", "bob"})
                    ack = await alice.send("g", 2, b"live")
                    assert ack.reason_code == Reason.SUCCESS
                    received = await bob.recv(timeout_s=10)
                    assert received.message_id == ack.message_id  # bob got it live
                await wait_online(cluster, leader, uids, {"alice"})
                await receiver.up(nursery)  # only now can the leader post the event
                with trio.fail_after(30):
                    while not [b for e, b, _ in receiver.posts if e == "msg.offline"]:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            [offline] = [body for event, body, _ in receiver.posts if event == "msg.offline"]
            assert offline["message_id"] == ack.message_id
            assert offline["to_uids"] == ["carol"], offline["to_uids"]
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
            nursery.cancel_scope.cancel()


async def webhook_pending(cluster: Cluster, node_id: str) -> dict[str, int]:
    status, body = await http_json(
        cluster.http(node_id), "GET", "/admin/deadletters", headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, body
    return dict(body["pending"])


async def test_removing_the_webhook_from_the_config_switches_it_off_after_a_restart(tmp_path: Path) -> None:
    receiver = Receiver()
    path = write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1)
    without = path.read_text()
    append(path, webhook_toml(receiver, events=["msg.notify"]))
    async with trio.open_nursery() as nursery:
        await receiver.up(nursery)
        cluster = Cluster(path)
        try:
            await trio.to_thread.run_sync(cluster.start_all)
            async with open_client(*cluster.tcp("n1"), "alice") as alice:
                first = await alice.send("bob", 1, b"hooked")
            await wait_until(lambda: len(receiver.notified()) == 1, 30, "the first message posted")
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
        path.write_text(without)  # [webhook] removed
        cluster = Cluster(path)
        try:
            await trio.to_thread.run_sync(cluster.start_all)
            async with open_client(*cluster.tcp("n1"), "alice") as alice:
                second = await alice.send("bob", 1, b"not hooked")
            assert first.reason_code == second.reason_code == Reason.SUCCESS
            # The send has committed: with the webhook off it wrote no event, so nothing is pending and
            # nothing ever will be (on, the event is either still pending or already posted).
            assert await webhook_pending(cluster, "n1") == {"notify": 0, "offline": 0, "online": 0}
            assert [m["message_id"] for m in receiver.notified()] == [first.message_id]
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
            nursery.cancel_scope.cancel()


async def applied_index(cluster: Cluster, node_id: str) -> int:
    status, body = await http_json(
        cluster.http(node_id), "GET", "/admin/status", headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, body
    return int(body["store_applied_index"])


async def test_msg_offline_backlog_takes_one_raft_commit_per_batch_and_skips_events_with_nobody_offline(
    tmp_path: Path,
) -> None:
    # Issue 13: a 5-second bench left 14,407 msg.offline POSTs, each followed by its own Raft commit.
    receiver = Receiver()
    config = write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1)
    hook = webhook_toml(receiver, events=["msg.offline"], attempts=1000, backoff_initial_s=0.05)
    token_auth_on(config)
    append(config, hook + "backoff_max_s = 0.2\n")
    cluster = Cluster(config)
    async with trio.open_nursery() as nursery:
        try:
            await trio.to_thread.run_sync(cluster.start_all)
            await as_master(cluster, "n1", "alice", "bob")
            status, body = await http_json(
                cluster.http("n1"),
                "POST",
                "/channel",
                {"channel_id": "g", "channel_type": 2, "subscribers": ["alice", "bob", "carol"]},
                headers={"token": MANAGER_TOKEN},
            )
            assert status == 200, body
            async with (
                open_client(*cluster.tcp("n1"), "alice", token="alice-t") as alice,
                open_client(*cluster.tcp("n1"), "bob", token="bob-t"),
            ):
                await wait_online(cluster, "n1", ["alice", "bob"], {"alice", "bob"})
                group = await alice.send_many([("g", 2, f"g{i}".encode()) for i in range(40)])
                person = await alice.send_many([("bob", 1, f"p{i}".encode()) for i in range(20)])
                assert all(a.reason_code == Reason.SUCCESS for a in group + person)
                assert (await webhook_pending(cluster, "n1"))["offline"] == 60
                before = await applied_index(cluster, "n1")
                await receiver.up(nursery)
                with trio.fail_after(30):
                    while (await webhook_pending(cluster, "n1"))["offline"]:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                entries = await applied_index(cluster, "n1") - before
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
            nursery.cancel_scope.cancel()
    # One advance for the batch (batch_max 100), not one per event.
    assert entries <= 2, entries
    offline = [(body, event_id) for event, body, event_id in receiver.posts if event == "msg.offline"]
    # WuKongIM's shape: one message object per POST; only the messages carol missed (bob was online).
    assert [body["message_id"] for body, _id in offline] == [a.message_id for a in group]
    assert all(body["to_uids"] == ["carol"] for body, _id in offline)
    assert all(event_id == f"offline:{seq}-{seq}" for seq, (_b, event_id) in enumerate(offline, start=1))


async def test_msg_offline_as_arrays_posts_a_batch_per_post(tmp_path: Path) -> None:
    receiver = Receiver()
    config = write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1)
    hook = webhook_toml(receiver, events=["msg.offline"], attempts=1000, backoff_initial_s=0.05)
    append(config, hook + "backoff_max_s = 0.2\noffline_array = true\n")
    cluster = Cluster(config)
    async with trio.open_nursery() as nursery:
        try:
            await trio.to_thread.run_sync(cluster.start_all)
            async with open_client(*cluster.tcp("n1"), "alice") as alice:
                acks = await alice.send_many([("carol", 1, f"m{i}".encode()) for i in range(30)])
                assert all(a.reason_code == Reason.SUCCESS for a in acks)
                assert (await webhook_pending(cluster, "n1"))["offline"] == 30
                await receiver.up(nursery)
                await wait_until(lambda: receiver.posts, 30, "the batch posted")
        finally:
            await trio.to_thread.run_sync(cluster.stop_all)
            nursery.cancel_scope.cancel()
    [(event, body, event_id)] = receiver.posts
    assert (event, event_id) == ("msg.offline", "offline:1-30")
    assert [m["message_id"] for m in body] == [a.message_id for a in acks]
    assert all(m["to_uids"] == ["carol"] for m in body)
