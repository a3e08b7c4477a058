"""Memory stays bounded: a recipient that stops reading is disconnected (by frames and by bytes queued),
its messages stay stored, and the node gives the memory back."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio

from node.client import open_client
from node.wire.crypto import generate_keypair
from node.wire.protocol import PING_FRAME, Connack, Connect, FrameDecoder, Reason, encode
from raft.commands import person_channel_id
from storage.keys import channel_key
from tests.conftest import NodeProcess, http_json, running_node, single_node_config, wait_for


async def test_a_recipient_that_never_reads_is_disconnected_and_loses_nothing(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", outbound_queue_frames=16, send_rate_per_s=100_000.0)
    async with running_node(config) as node:
        stream = await trio.open_tcp_stream(*node.tcp)
        try:
            _private, public = generate_keypair()
            await stream.send_all(
                encode(Connect(5, 0, "dev-bob", "bob", "", int(time.time() * 1000), public), 5)
            )
            decoder = FrameDecoder()
            with trio.fail_after(5):
                while (connack := decoder.next_packet()) is None:
                    decoder.feed(await stream.receive_some(65536))
            assert isinstance(connack, Connack) and connack.reason_code == Reason.SUCCESS
            bob = node.node.registry.of_uid("bob")[0]
            # bob reads nothing more. Large messages fill the socket buffers, then his bounded queue.
            payload = b"x" * 60_000
            async with open_client(*node.tcp, "alice") as alice:
                acks = []
                for _ in range(10):
                    acks += await alice.send_many([("bob", 1, payload)] * 40, timeout_s=60)
                    if bob.closed.is_set():
                        break
                await wait_for(lambda: bob.closed.is_set(), 20, "bob disconnected")
                assert "not reading" in bob.close_reason
                assert bob not in node.node.registry.of_uid("bob")
                assert all(a.reason_code == Reason.SUCCESS for a in acks)
                # Everything acknowledged is stored for bob to sync, and alice is still served.
                with node.node.store.read() as txn:
                    stored = txn.messages(channel_key(person_channel_id("alice", "bob"), 1), 1, 0, 10_000)
                assert [m["seq"] for m in stored] == list(range(1, len(acks) + 1))
                assert (await alice.send("carol", 1, b"still here")).reason_code == Reason.SUCCESS
        finally:
            await stream.aclose()


def rss_anon_bytes(pid: int) -> int:
    """The process's anonymous resident memory (its heap, not LMDB's or the Raft journal's file pages)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


async def connect_non_reader(address: tuple[str, int], uid: str) -> trio.SocketStream:
    """A client that logs in, then only pings: it never reads again, with a small receive buffer."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    await sock.connect(address)
    stream = trio.SocketStream(sock)
    _private, public = generate_keypair()
    await stream.send_all(encode(Connect(5, 0, f"dev-{uid}", uid, "", int(time.time() * 1000), public), 5))
    decoder = FrameDecoder()
    with trio.fail_after(10):
        while (connack := decoder.next_packet()) is None:
            decoder.feed(await stream.receive_some(4096))
    assert isinstance(connack, Connack) and connack.reason_code == Reason.SUCCESS
    return stream


async def test_readers_that_stop_reading_are_cut_by_bytes_and_node_memory_comes_back(
    node_process: tuple[NodeProcess, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, ports = node_process
    queue_bytes = inflight_bytes = 2 << 20
    with proc.config_path.open("a") as config:
        config.write(
            f"\n[tuning]\noutbound_queue_bytes = {queue_bytes}\nrecv_inflight_bytes = {inflight_bytes}\n"
        )
    # glibc raises its mmap threshold at the first large free and then keeps freed heap for reuse, so RSS
    # would show what the allocator keeps rather than what the node holds. With a fixed threshold every
    # large buffer (a RECV, a payload) is mapped on its own and unmapped when freed: RSS follows the node.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 << 10))
    await trio.to_thread.run_sync(proc.start)
    assert proc.proc is not None
    pid, tcp, http = proc.proc.pid, ("127.0.0.1", ports["tcp"]), f"http://127.0.0.1:{ports['http']}"
    readers = [f"reader-{i}" for i in range(10)]
    status, _ = await http_json(
        http,
        "POST",
        "/channel",
        {"channel_id": "wall", "channel_type": 2, "subscribers": ["alice", *readers]},
    )
    assert status == 200
    payload = b"x" * 200_000
    async with open_client(*tcp, "alice", timeout_s=30) as alice, open_client(*tcp, "warm") as warm:
        # Warm up every path a large message takes, so the baseline already holds what stays allocated.
        for ack in await alice.send_many([("warm", 1, payload)] * 10, timeout_s=60):
            assert ack.reason_code == Reason.SUCCESS
        for _ in range(10):
            await warm.recv()
        baseline = rss_anon_bytes(pid)
        peak = baseline
        streams = [await connect_non_reader(tcp, uid) for uid in readers]
        try:
            async with trio.open_nursery() as nursery:

                async def keep_pinging(stream: trio.SocketStream) -> None:
                    while True:
                        try:
                            await stream.send_all(PING_FRAME)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return  # cut by the node
                        await trio.sleep(0.5)

                async def sample_rss() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, rss_anon_bytes(pid))
                        await trio.sleep(0.02)

                for stream in streams:
                    nursery.start_soon(keep_pinging, stream)
                nursery.start_soon(sample_rss)
                # 40 messages of 200 KB to ten readers: 80 MB of RECVs, more than twice that with the
                # copies kept for resending, if nothing cut them off.
                for _ in range(4):
                    acks = await alice.send_many([("wall", 2, payload)] * 10, timeout_s=60)
                    assert all(a.reason_code == Reason.SUCCESS for a in acks)

                async def readers_online() -> int:
                    status, answer = await http_json(http, "GET", "/connz?limit=100")
                    assert status == 200
                    for conn in answer["connections"]:
                        assert conn["pending_bytes"] <= queue_bytes, conn
                    return sum(1 for conn in answer["connections"] if conn["uid"] in readers)

                with trio.fail_after(30):
                    while await readers_online():  # noqa: ASYNC110 - state of another process
                        await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        finally:
            for stream in streams:
                await stream.aclose()
        # The readers' messages stay stored for sync.
        status, answer = await http_json(
            http,
            "POST",
            "/channel/messagesync",
            {"login_uid": readers[0], "channel_id": "wall", "channel_type": 2, "limit": 100},
        )
        assert status == 200 and len(answer["messages"]) == 40
        assert (await alice.send("warm", 1, b"still served")).reason_code == Reason.SUCCESS
        # Bounded while they were connected (unbounded, the ten held over 200 MB), and given back once they
        # are gone, but for the 8 MB of messages that the Raft log keeps in memory.
        assert peak - baseline < len(readers) * (queue_bytes + inflight_bytes) + (30 << 20), (baseline, peak)
        with trio.fail_after(10):
            while rss_anon_bytes(pid) - baseline > 20 << 20:  # noqa: ASYNC110 - another process
                await trio.sleep(0.1)


async def test_recvs_kept_for_resending_are_bounded_in_bytes(tmp_path: Path) -> None:
    inflight_bytes = 2 << 20
    config = single_node_config(tmp_path / "n1", recv_inflight_bytes=inflight_bytes)
    async with (
        running_node(config) as node,
        open_client(*node.tcp, "alice") as alice,
        open_client(*node.tcp, "bob", auto_ack=False) as bob,
    ):
        # bob reads every RECV but acknowledges none: each is kept for resending, up to the bound.
        acks = await alice.send_many([("bob", 1, b"x" * 200_000)] * 20, timeout_s=60)
        assert all(a.reason_code == Reason.SUCCESS for a in acks)
        recvs = [await bob.recv() for _ in acks]
        [conn] = node.node.registry.of_uid("bob")
        assert conn.inflight_bytes == sum(len(item.frame) for item in conn.inflight.values())
        assert 0 < conn.inflight_bytes <= inflight_bytes
        assert conn.dropped_recvs == len(acks) - len(conn.inflight) > 0
        # The newest are the ones kept; a RECVACK gives its bytes back.
        assert set(conn.inflight) == {r.message_id for r in recvs[-len(conn.inflight) :]}
        await bob.ack(recvs[-1])
        await wait_for(lambda: recvs[-1].message_id not in conn.inflight, 5, "the RECVACK applied")
        assert conn.inflight_bytes == sum(len(item.frame) for item in conn.inflight.values())
