"""`/message/event`, `/message/eventsync` and messagesync's event fields on one real node, with real clients:
a stream's deltas reach a version-5 client as EVENT packets in order, and never a version-2 client (the 1.0.x
JS SDK drops its connection on one); persisted events are idempotent by event_id; a finish ends the stream
with its whole text; bad input gets WuKongIM's error shape."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import trio

from node.client import open_client
from tests.conftest import RunningNode, http_json, running_node, single_node_config

ANSWER = ["Streams ", "grow ", "word ", "by ", "word."]


async def post(node: RunningNode, path: str, body: Any) -> tuple[int, Any]:
    return await http_json(node.http, "POST", path, body)


def event_body(event_id: str, event_type: str, payload: Any = None, **more: Any) -> dict[str, Any]:
    body = {
        "channel_id": "alice",
        "channel_type": 1,
        "from_uid": "bot",
        "client_msg_no": "answer-1",
        "event_id": event_id,
        "event_type": event_type,
        **more,
    }
    if payload is not None:
        body["payload"] = payload
    return body


async def open_stream(node: RunningNode, client_msg_no: str = "answer-1", *, is_stream: int = 1) -> None:
    status, sent = await post(
        node,
        "/message/send",
        {
            "from_uid": "bot",
            "channel_id": "alice",
            "channel_type": 1,
            "client_msg_no": client_msg_no,
            "is_stream": is_stream,
            "payload": base64.b64encode(b'{"type":1,"content":""}').decode(),
        },
    )
    assert status == 200 and sent["client_msg_no"] == client_msg_no, sent


async def test_a_stream_reaches_clients_that_read_events_and_a_late_reader_gets_its_text(
    node: RunningNode,
) -> None:
    host, port = node.tcp
    async with (
        open_client(host, port, "alice", device_flag=0) as app,  # version 5: takes EVENT
        open_client(host, port, "alice", device_flag=1, version=2) as old_web,  # the 1.0.x JS SDK's version
    ):
        await open_stream(node)
        assert (await app.recv()).client_msg_no == "answer-1"
        assert (await old_web.recv()).client_msg_no == "answer-1"
        for i, word in enumerate(ANSWER):
            status, answer = await post(
                node, "/message/event", event_body(f"d{i}", "stream.delta", {"kind": "text", "delta": word})
            )
            assert status == 200 and answer["data"]["stream_status"] == "open", answer
        for i, word in enumerate(ANSWER):
            event = await app.event()
            data = json.loads(event.data)
            assert (event.id, event.type) == (f"d{i}", "stream.delta")
            assert data["payload"]["delta"] == word and data["client_msg_no"] == "answer-1"
            assert data["channel_id"] == "bot"  # a person channel shows the other party
        # A retried delta is not appended twice; a persisted event repeated gets its first answer.
        await post(
            node, "/message/event", event_body("d0", "stream.delta", {"kind": "text", "delta": "again"})
        )
        finish = event_body("f1", "stream.finish", {"reason": "done"})
        status, first = await post(node, "/message/event", finish)
        assert status == 200 and first["data"]["stream_status"] == "closed", first
        status, again = await post(node, "/message/event", finish)
        assert (status, again) == (200, first)
        event = await app.event()
        data = json.loads(event.data)
        assert event.type == "stream.finish" and data["stream_status"] == "closed"
        assert data["payload"]["snapshot"] == {"kind": "text", "text": "".join(ANSWER)}
        assert data["msg_event_seq"] == first["data"]["msg_event_seq"] == 1
        status, refused = await post(
            node, "/message/event", event_body("d9", "stream.delta", {"kind": "text", "delta": "late"})
        )
        assert (status, refused) == (400, {"msg": "stream closed", "status": 400})
        # The version-2 client got none of it: a message sent after the stream is its next packet.
        await open_stream(node, "after", is_stream=0)
        assert (await old_web.recv()).client_msg_no == "after"
        assert old_web.statistics().recvs == 2
        with trio.move_on_after(0.2):
            await old_web.event()
            raise AssertionError("a version-2 client was sent an EVENT")

    status, synced = await post(
        node,
        "/channel/messagesync",
        {"login_uid": "alice", "channel_id": "bot", "channel_type": 1, "limit": 10},
    )
    assert status == 200
    streamed = next(m for m in synced["messages"] if m["client_msg_no"] == "answer-1")
    assert base64.b64decode(streamed["stream_data"]).decode() == "".join(ANSWER)
    assert streamed["end"] == 1 and streamed["event_meta"]["completed"] is True
    assert streamed["event_meta"]["events"][0]["snapshot"]["text"] == "".join(ANSWER)
    assert streamed["event_sync_hint"] == {"client_msg_no": "answer-1", "from_msg_event_seq": 0}
    plain = next(m for m in synced["messages"] if m["client_msg_no"] == "after")
    assert "event_meta" not in plain and "stream_data" not in plain

    status, events = await post(
        node,
        "/message/eventsync",
        {"channel_id": "alice", "channel_type": 1, "from_uid": "bot", "client_msg_no": "answer-1"},
    )
    assert status == 200
    by_key = {e["event_key"]: e for e in events["data"]["events"]}
    assert by_key["main"]["payload"] == {"kind": "text", "text": "".join(ANSWER)}
    assert by_key["__finish__"]["event_type"] == "stream.finish" and events["data"]["more"] == 0


async def test_bad_input_gets_wukongim_error_shapes_and_the_node_keeps_serving(node: RunningNode) -> None:
    await open_stream(node)
    await open_stream(node, "plain", is_stream=0)
    cases: list[tuple[dict[str, Any], str]] = [
        (event_body("e1", "stream.snapshot", client_msg_no="nowhere"), "no message with client_msg_no"),
        (event_body("e1", "stream.snapshot", client_msg_no="plain"), "not sent as a stream"),
        (event_body("e1", "stream.snapshot", from_uid="mallory"), "no message with client_msg_no"),
        ({**event_body("e1", "stream.delta"), "channel_type": 2, "channel_id": "nogroup"}, "does not exist"),
        ({**event_body("e1", "stream.delta"), "event_id": ""}, "event_id"),
        (event_body("e1", "stream.delta", "x" * (1 << 20)), "payload larger than"),
        (event_body("e1", "stream.delta", {"kind": "text", "delta": "\ud800"}), "not valid UTF-8"),
    ]
    for body, why in cases:
        status, answer = await post(node, "/message/event", body)
        assert status == 400 and answer["status"] == 400 and why in answer["msg"], (
            body.get("event_id"),
            answer,
        )
    status, answer = await http_json(node.http, "POST", "/message/event", raw=b"{not json")
    assert status == 400 and answer["status"] == 400
    # Past the stream's snapshot bound a delta is refused; the stream and the node go on.
    big = {"kind": "text", "delta": "y" * 600_000}
    assert (await post(node, "/message/event", event_body("b1", "stream.delta", big)))[0] == 200
    status, answer = await post(node, "/message/event", event_body("b2", "stream.delta", big))
    assert status == 400 and "stream_snapshot_max_bytes" in answer["msg"]
    side = {"kind": "text", "text": "z" * 600_000}  # a snapshot on another key counts toward the same bound
    status, answer = await post(
        node, "/message/event", event_body("b3", "stream.snapshot", side, event_key="side")
    )
    assert status == 400 and "stream_snapshot_max_bytes" in answer["msg"]
    status, answer = await post(node, "/message/event", event_body("s1", "stream.snapshot", {"kind": "text"}))
    assert status == 200 and answer["data"]["msg_event_seq"] == 1
    # The node-to-node path takes only calls signed with the cluster secret.
    status, answer = await post(node, "/peer/stream/events", {"events": []})
    assert status == 403


async def test_an_idle_stream_ends_with_its_text_kept_and_says_why(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", stream_idle_timeout_s=0.5, stream_sessions_max=1)
    async with running_node(config) as node:
        await open_stream(node)
        for i, word in enumerate(ANSWER[:2]):
            delta = {"kind": "text", "delta": word}
            assert (await post(node, "/message/event", event_body(f"d{i}", "stream.delta", delta)))[0] == 200
        # One stream open on this node at most (tuning.stream_sessions_max): a second one is refused.
        await open_stream(node, "answer-2")
        second = event_body("x1", "stream.delta", {"kind": "text", "delta": "x"}, client_msg_no="answer-2")
        status, refused = await post(node, "/message/event", second)
        assert status == 400 and "stream_sessions_max" in refused["msg"]
        sync = {"login_uid": "alice", "channel_id": "bot", "channel_type": 1}
        with trio.fail_after(10):
            while True:
                _, synced = await post(node, "/channel/messagesync", sync)
                [message] = [m for m in synced["messages"] if m["client_msg_no"] == "answer-1"]
                if message.get("end"):
                    break
                await trio.sleep(0.1)
        assert base64.b64decode(message["stream_data"]).decode() == "".join(ANSWER[:2])
        assert message["error"] == "idle timeout" and message["event_meta"]["events"][0]["status"] == "error"
        status, refused = await post(
            node, "/message/event", event_body("d9", "stream.delta", {"kind": "text", "delta": "late"})
        )
        assert (status, refused) == (400, {"msg": "stream closed", "status": 400})
        assert node.node.streams.statistics()["streams_open"] == 0


async def test_a_group_stream_reaches_every_online_subscriber(node: RunningNode) -> None:
    status, _ = await post(
        node, "/channel", {"channel_id": "room", "channel_type": 2, "subscribers": ["alice", "bob", "bot"]}
    )
    assert status == 200
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:
        target = {"channel_id": "room", "channel_type": 2, "from_uid": "bot", "client_msg_no": "g-1"}
        payload = base64.b64encode(b'{"type":1,"content":""}').decode()
        assert (await post(node, "/message/send", {**target, "is_stream": 1, "payload": payload}))[0] == 200
        delta = {"kind": "text", "delta": "hi all"}
        body = {**target, "event_id": "d0", "event_type": "stream.delta", "payload": delta}
        assert (await post(node, "/message/event", body))[0] == 200
        for client in (alice, bob):
            data = json.loads((await client.event()).data)
            assert (data["channel_id"], data["channel_type"], data["payload"]) == ("room", 2, delta)
