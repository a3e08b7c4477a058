"""Commands (sync_once) and no_persist messages on a real 3-node cluster (one process per node)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import trio

from node.client import open_client
from node.wire.protocol import FLAG_NO_PERSIST, FLAG_SYNC_ONCE
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
TEXT = b'{"content":"hi","type":1}'


async def post(cluster: Cluster, node_id: str, path: str, body: Any) -> Any:
    status, answer = await http_json(
        cluster.http(node_id), "POST", path, body, headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, (node_id, path, body, status, answer)
    return answer


async def eventually(probe: Any, ok: Any, what: str, timeout_s: float = 15.0) -> Any:
    value = None
    with trio.move_on_after(timeout_s):
        while True:
            value = await probe()
            if ok(value):
                return value
            await trio.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s}s; last {value!r}")


async def test_commands_sync_once_and_no_persist_stays_out_of_history(tmp_path: Path) -> None:
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml"))
    try:
        leader = await trio.to_thread.run_sync(cluster.start_all)
        first, second = [n for n in ("n1", "n2", "n3") if n != leader]
        await post(
            cluster,
            leader,
            "/channel",
            {"channel_id": "g", "channel_type": 2, "subscribers": ["alice", "bob", "carol"]},
        )
        stored = await post(
            cluster,
            leader,
            "/message/send",
            {
                "from_uid": "alice",
                "channel_id": "g",
                "channel_type": 2,
                "payload": base64.b64encode(TEXT).decode(),
            },
        )
        async with open_client(*cluster.tcp(first), "bob") as bob:

            async def bob_online() -> Any:
                return await post(cluster, leader, "/user/onlinestatus", ["bob"])

            await eventually(bob_online, lambda rows: any(r.get("online") for r in rows), "bob online")

            def send_body(header: dict[str, int]) -> dict[str, Any]:
                payload = base64.b64encode(TEXT).decode()
                return {
                    "from_uid": "alice",
                    "channel_id": "g",
                    "channel_type": 2,
                    "payload": payload,
                    "header": header,
                }

            async def next_recv() -> Any:
                # The stored message may reach bob live too: his node can apply it after he connected.
                while True:
                    recv = await bob.recv(timeout_s=15)
                    if recv.message_id != stored["message_id"]:
                        return recv

            # A command: bob (online on another node) gets it live; carol (offline) through /message/sync.
            cmd = await post(cluster, leader, "/message/send", send_body({"sync_once": 1}))
            recv = await next_recv()
            assert recv.message_id == cmd["message_id"] and recv.flags & FLAG_SYNC_ONCE

            # no_persist: bob gets it live, through Raft, on his node; it is stored nowhere.
            volatile = await post(
                cluster, leader, "/message/send", send_body({"no_persist": 1, "red_dot": 1})
            )
            recv = await next_recv()
            assert recv.message_id == volatile["message_id"] and recv.flags & FLAG_NO_PERSIST
            assert recv.message_seq == 0

        async def carol_sync() -> Any:
            return await post(cluster, second, "/message/sync", {"uid": "carol", "limit": 50})

        synced = await eventually(carol_sync, lambda rows: len(rows) >= 1, "carol's command on " + second)
        assert [m["message_id"] for m in synced] == [cmd["message_id"]]
        assert synced[0]["header"]["sync_once"] == 1
        # Acknowledged on another node than the one that answered the sync: the record is replicated.
        await post(
            cluster, first, "/message/syncack", {"uid": "carol", "last_message_seq": synced[0]["message_seq"]}
        )
        for node_id in (leader, first, second):

            async def again(node_id: str = node_id) -> Any:
                return await post(cluster, node_id, "/message/sync", {"uid": "carol"})

            await eventually(again, lambda rows: rows == [], f"carol's queue empty on {node_id}")

        for node_id in (leader, first, second):
            history = await post(
                cluster,
                node_id,
                "/channel/messagesync",
                {"login_uid": "bob", "channel_id": "g", "channel_type": 2},
            )
            assert [m["message_id"] for m in history["messages"]] == [stored["message_id"]], node_id
            [conv] = await post(cluster, node_id, "/conversation/sync", {"uid": "carol", "msg_count": 10})
            assert conv["last_msg_seq"] == 1 and conv["unread"] == 1, (node_id, conv)
            assert [m["message_id"] for m in conv["recents"]] == [stored["message_id"]]
    finally:
        await trio.to_thread.run_sync(cluster.stop_all)
