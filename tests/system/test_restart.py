"""A node as a real process: acknowledged messages survive `kill -9`, and SIGTERM stops it cleanly."""

from __future__ import annotations

from pathlib import Path

import trio

from node.client import open_client
from node.wire.protocol import Reason
from tests.conftest import NodeProcess, http_json


async def _sync_all(http: str, login_uid: str, peer: str) -> list[dict[str, object]]:
    status, body = await http_json(
        http,
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
    )
    assert status == 200, body
    return list(body["messages"])


async def test_acked_messages_survive_kill_9_with_the_same_seq(
    node_process: tuple[NodeProcess, dict[str, int]],
) -> None:
    proc, ports = node_process
    http = f"http://127.0.0.1:{ports['http']}"
    await trio.to_thread.run_sync(proc.start)
    acked: dict[str, tuple[int, int]] = {}
    async with open_client("127.0.0.1", ports["tcp"], "alice") as alice:
        acks = await alice.send_many([("bob", 1, f"before-{i}".encode()) for i in range(500)])
        for i, ack in enumerate(acks):
            assert ack.reason_code == Reason.SUCCESS
            acked[f"before-{i}"] = (ack.message_id, ack.message_seq)
        # Kill while more sends are in flight: whatever was acknowledged must survive.
        for i in range(200):
            await alice.submit("bob", 1, f"during-{i}".encode())
        await trio.to_thread.run_sync(proc.kill9)

    await trio.to_thread.run_sync(proc.start)
    stored = await _sync_all(http, "alice", "bob")
    by_payload = {m["payload"]: (m["message_id"], m["message_seq"]) for m in stored}
    import base64

    for text, ids in acked.items():
        assert by_payload[base64.b64encode(text.encode()).decode()] == ids, text
    seqs = [m["message_seq"] for m in stored]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate

    # The restarted node keeps going where it stopped.
    async with open_client("127.0.0.1", ports["tcp"], "alice") as alice:
        ack = await alice.send("bob", 1, b"after")
        assert ack.reason_code == Reason.SUCCESS and ack.message_seq == len(seqs) + 1


def test_sigterm_stops_the_node_cleanly(
    node_process: tuple[NodeProcess, dict[str, int]], tmp_path: Path
) -> None:
    proc, _ports = node_process
    proc.start()
    assert proc.terminate() == 0
    log = proc.log_path.read_text()
    assert "stopped cleanly" in log
    assert "Traceback" not in log
