"""Streamed messages on a real 3-node cluster: an AI backend posts a stream to n1; clients on n2 and n3 see
every delta in order and the finish (EVENT packets over the signed node-to-node path), a client that cannot
read EVENT gets none and stays connected, a late reader gets the whole text from messagesync and the events
from eventsync, and a node killed mid-stream loses no persisted event."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from wukong_easy_sdk import WKIMEvent

from node.client import Client, open_client
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json
from tests.easysdk_harness import Sdk, SdkLoop

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in child processes

DELTAS = 200
SNAPSHOT_EVERY = 50
RETRY_FOR_S = 20.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(write_cluster_toml(tmp_path / "cluster.toml", nodes=3))
    try:
        yield running
    finally:
        running.stop_all()


async def call(cluster: Cluster, node_id: str, path: str, body: Any) -> tuple[int, Any]:
    return await http_json(cluster.http(node_id), "POST", path, body, headers={"token": MANAGER_TOKEN})


async def post_event(cluster: Cluster, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """As a backend would: a POST not answered 200 (a node down, a leader change) is retried with the same
    event_id, which makes the retry safe."""
    with trio.fail_after(RETRY_FOR_S):
        while True:
            try:
                status, answer = await call(cluster, node_id, "/message/event", body)
            except (OSError, trio.TooSlowError):
                status, answer = 0, None
            if status == 200:
                return dict(answer["data"])
            assert status in (0, 400) and (answer is None or "not committed" in answer["msg"]), answer
            await trio.sleep(0.2)


def event(client_msg_no: str, event_id: str, event_type: str, payload: Any = None) -> dict[str, Any]:
    body = {
        "channel_id": "alice",
        "channel_type": 1,
        "from_uid": "bot",
        "client_msg_no": client_msg_no,
        "event_id": event_id,
        "event_type": event_type,
    }
    if payload is not None:
        body["payload"] = payload
    return body


async def stream_answer(cluster: Cluster, client_msg_no: str, *, kill_midway: str | None = None) -> list[str]:
    """Open a stream on n1 and post DELTAS deltas, a snapshot every SNAPSHOT_EVERY, and a finish; the ids of
    the events posted, in order."""
    status, sent = await call(
        cluster,
        "n1",
        "/message/send",
        {
            "from_uid": "bot",
            "channel_id": "alice",
            "channel_type": 1,
            "client_msg_no": client_msg_no,
            "is_stream": 1,
            "payload": base64.b64encode(b'{"type":1,"content":""}').decode(),
        },
    )
    assert status == 200, sent
    posted, text = [], ""
    for i in range(DELTAS):
        text += f"w{i} "
        answer = await post_event(
            cluster, "n1", event(client_msg_no, f"d{i}", "stream.delta", {"kind": "text", "delta": f"w{i} "})
        )
        assert answer["stream_status"] == "open"
        posted.append(f"d{i}")
        if (i + 1) % SNAPSHOT_EVERY == 0:
            snapshot = {"kind": "text", "text": text}
            await post_event(cluster, "n1", event(client_msg_no, f"s{i}", "stream.snapshot", snapshot))
            posted.append(f"s{i}")
        if kill_midway is not None and i == DELTAS // 2:
            await trio.to_thread.run_sync(cluster.kill9, kill_midway)
    done = await post_event(cluster, "n1", event(client_msg_no, "finish", "stream.finish", {"ok": True}))
    assert done["stream_status"] == "closed"
    posted.append("finish")
    return posted


def full_text() -> str:
    return "".join(f"w{i} " for i in range(DELTAS))


async def events_of(client: Client, count: int) -> list[tuple[str, dict[str, Any]]]:
    got = []
    for _ in range(count):
        packet = await client.event(timeout_s=10)
        got.append((packet.id, json.loads(packet.data)))
    return got


async def test_a_stream_posted_to_one_node_reaches_clients_on_the_others_in_order(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    sdk_loop = SdkLoop()
    # The bot's own other device, a light client: the official EasySDK over JSON-RPC on n3.
    light = Sdk(sdk_loop, f"ws://{cluster.config.node('n3').ws}", "bot")
    try:
        assert (await light.connect())["reasonCode"] == 1
        await stream_to_binary_and_light_clients(cluster, light)
    finally:
        await light.destroy()
        sdk_loop.close()


async def stream_to_binary_and_light_clients(cluster: Cluster, light: Sdk) -> None:
    async with (
        open_client(*cluster.tcp("n2"), "alice", device_flag=0) as app,
        open_client(*cluster.tcp("n3"), "alice", device_flag=2) as desktop,
        open_client(*cluster.tcp("n3"), "alice", device_flag=1, version=2) as old_web,
    ):
        with trio.fail_after(10):  # the backend's node knows where alice and the bot are online
            while True:
                status, online = await call(cluster, "n1", "/user/onlinestatus", ["alice", "bot"])
                if status == 200 and len(online) == 4:
                    break
                await trio.sleep(0.05)
        posted = await stream_answer(cluster, "answer-1")
        with trio.fail_after(10):  # the SDK's `customevent`s, parsed by its own checks
            while len(light.of(WKIMEvent.CUSTOM_EVENT)) < len(posted):  # noqa: ASYNC110 - another thread's list
                await trio.sleep(0.05)
        seen = light.of(WKIMEvent.CUSTOM_EVENT)
        assert [e["id"] for e in seen] == posted
        assert (
            "".join(e["data"]["payload"]["delta"] for e in seen if e["type"] == "stream.delta") == full_text()
        )
        assert seen[-1]["data"]["stream_status"] == "closed" and seen[-1]["data"]["channel_id"] == "alice"
        for client in (app, desktop):
            got = await events_of(client, len(posted))
            assert [event_id for event_id, _ in got] == posted  # every delta, in order, and the finish
            deltas = [data["payload"]["delta"] for event_id, data in got if event_id.startswith("d")]
            assert "".join(deltas) == full_text()
            last = got[-1][1]
            assert last["stream_status"] == "closed" and last["payload"]["snapshot"]["text"] == full_text()
        assert (await old_web.recv()).client_msg_no == "answer-1"
        with trio.move_on_after(0.3):
            await old_web.event()
            raise AssertionError("a client at protocol version 2 was sent an EVENT")
        assert not old_web.disconnected.is_set()

    # A reader that comes later: the whole text from messagesync on any node, the events from eventsync.
    status, synced = await call(
        cluster, "n2", "/channel/messagesync", {"login_uid": "alice", "channel_id": "bot", "channel_type": 1}
    )
    assert status == 200
    [message] = [m for m in synced["messages"] if m["client_msg_no"] == "answer-1"]
    assert base64.b64decode(message["stream_data"]).decode() == full_text()
    assert message["end"] == 1 and message["event_meta"]["completed"] is True
    status, events = await call(
        cluster,
        "n3",
        "/message/eventsync",
        {"channel_id": "alice", "channel_type": 1, "from_uid": "bot", "client_msg_no": "answer-1"},
    )
    assert status == 200
    by_key = {e["event_key"]: e for e in events["data"]["events"]}
    snapshots = DELTAS // SNAPSHOT_EVERY
    assert by_key["__finish__"]["msg_event_seq"] == snapshots + 1  # no delta took a seq
    assert by_key["main"]["payload"] == {"kind": "text", "text": full_text()}

    # Repeated event_id: the first answer. A delta after the finish: refused, WuKongIM's shape.
    again = await post_event(cluster, "n1", event("answer-1", "finish", "stream.finish", {"ok": True}))
    assert again["msg_event_seq"] == snapshots + 1
    status, refused = await call(
        cluster,
        "n1",
        "/message/event",
        event("answer-1", "late", "stream.delta", {"kind": "text", "delta": "x"}),
    )
    assert (status, refused) == (400, {"msg": "stream closed", "status": 400})


async def test_a_node_killed_mid_stream_loses_no_persisted_event(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    posted = await stream_answer(cluster, "answer-2", kill_midway="n3")
    await trio.to_thread.run_sync(cluster.start, "n3")
    await trio.to_thread.run_sync(cluster.wait_serving, "n3")
    await trio.to_thread.run_sync(cluster.wait_caught_up, "n3")
    persisted = [event_id for event_id in posted if not event_id.startswith("d")]
    for node_id in ("n1", "n2", "n3"):
        status, events = await call(
            cluster,
            node_id,
            "/message/eventsync",
            {"channel_id": "alice", "channel_type": 1, "from_uid": "bot", "client_msg_no": "answer-2"},
        )
        assert status == 200
        by_key = {e["event_key"]: e for e in events["data"]["events"]}
        assert by_key["__finish__"]["msg_event_seq"] == len(persisted), node_id
        assert by_key["main"]["payload"] == {"kind": "text", "text": full_text()}, node_id
