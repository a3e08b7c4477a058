"""Memory stays bounded: a recipient that stops reading is disconnected; its messages stay stored."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from node.client import open_client
from node.wire.crypto import generate_keypair
from node.wire.protocol import Connack, Connect, FrameDecoder, Reason, encode
from raft.commands import person_channel_id
from storage.keys import channel_key
from tests.conftest import running_node, single_node_config, wait_for


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
