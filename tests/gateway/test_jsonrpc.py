"""JSON-RPC light clients on a real node: the binary clients' user-pool rules; bad input answered or closed.

Raw WebSocket messages here (the SDK's own shapes are proven in tests/system/test_easysdk_cluster.py).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from node.client import open_client
from node.config import ConfigError, load
from node.gateway.connection import Connection
from node.wire import jsonrpc
from node.wire.protocol import FLAG_RED_DOT, Event, Reason, Recv
from tests.conftest import RunningNode, http_json, running_node, single_node_config, wait_for
from tests.gateway.test_fuzz_live import websocket_to

TOKEN = "jsonrpc-test-manager-token"
SEND_TO_SURROGATE = '{"id":"s","method":"send","params":{"channelId":"\\ud800","channelType":1,"payload":""}}'
SEND_WITH_HUGE_EXPIRE = (
    '{"id":"s","method":"send","params":{"channelId":"b","channelType":1,"payload":"","expire":1e400}}'
)


class Rpc:
    """One raw JSON-RPC WebSocket connection: text out, parsed JSON in."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.notifications: list[dict[str, Any]] = []

    async def send(self, message: Any) -> None:
        await self.ws.send_message(message if isinstance(message, str | bytes) else json.dumps(message))

    async def next(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The next message (None once the node closed the connection)."""
        with trio.fail_after(timeout_s):
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return None
        assert isinstance(message, str), f"the node answered JSON-RPC in a binary message: {message!r}"
        parsed = json.loads(message)
        assert parsed.get("jsonrpc") == "2.0", parsed
        return parsed  # type: ignore[no-any-return]

    async def answer(self, request_id: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        """The response to `request_id`; notifications met on the way are kept."""
        while True:
            message = await self.next(timeout_s)
            assert message is not None, f"closed before the answer to {request_id!r}"
            if "method" in message:
                self.notifications.append(message)
                continue
            assert message["id"] == request_id, message
            return message

    async def call(self, method: str, params: Any, request_id: Any = "1") -> dict[str, Any]:
        await self.send({"id": request_id, "method": method, "params": params})
        return await self.answer(request_id)

    async def connect(self, uid: str, **more: Any) -> dict[str, Any]:
        answer = await self.call("connect", {"uid": uid, "token": "t", "deviceFlag": 0, **more}, "c")
        return answer["result"]  # type: ignore[no-any-return]

    async def closed(self, timeout_s: float = 5.0) -> bool:
        """Read on until the node closes (True) or `timeout_s` passes (False)."""
        with trio.move_on_after(timeout_s):
            while (message := await self.next(timeout_s + 1)) is not None:
                self.notifications.append(message)
            return True
        return False


@asynccontextmanager
async def rpc_to(node: RunningNode) -> AsyncIterator[Rpc]:
    async with websocket_to(node.ws) as ws:
        yield Rpc(ws)


def error_code(message: dict[str, Any] | None) -> int:
    assert message is not None and "error" in message and "result" not in message, message
    return int(message["error"]["code"])


async def api(node: RunningNode, path: str, body: Any) -> Any:
    status, answer = await http_json(node.http, "POST", path, body, headers={"token": TOKEN})
    assert status == 200, (path, status, answer)
    return answer


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    config = single_node_config(
        tmp_path / "n1", manager_token=TOKEN, connect_timeout_s=1.0, recv_resend_interval_s=0.3
    )
    async with running_node(config) as running:
        yield running


async def test_binary_and_jsonrpc_clients_talk_and_recv_is_resent_until_recvack(node: RunningNode) -> None:
    async with rpc_to(node) as alice, open_client(*node.tcp, "bob") as bob:
        connack = await alice.connect("alice")
        assert connack["reasonCode"] == Reason.SUCCESS and connack["nodeId"] == 1
        assert "serverKey" not in connack  # no key exchange on this path
        payload = base64.b64encode(b'{"type":1,"content":"hi"}').decode()
        params = {"channelId": "bob", "channelType": 1, "payload": payload, "header": {"redDot": True}}
        sent = (await alice.call("send", params, 7))["result"]
        assert sent["reasonCode"] == Reason.SUCCESS and isinstance(sent["messageId"], str)
        got = await bob.recv()
        assert (got.from_uid, got.payload, got.message_id) == (
            "alice",
            b'{"type":1,"content":"hi"}',
            int(sent["messageId"]),
        )

        ack = await bob.send("alice", 1, b'{"type":1,"content":"back"}')
        first = await alice.next()
        assert first is not None and first["method"] == "recv", first
        recv = first["params"]
        assert (recv["fromUid"], recv["channelId"], recv["messageId"]) == ("bob", "bob", str(ack.message_id))
        assert base64.b64decode(recv["payload"]) == b'{"type":1,"content":"back"}'
        assert recv["header"] == {"redDot": True}
        # Not acknowledged: resent with dup, as a binary RECV is.
        again = await alice.next()
        assert again is not None and again["params"]["header"] == {"dup": True, "redDot": True}
        assert again["params"]["messageId"] == recv["messageId"]
        await alice.send(
            {
                "method": "recvack",
                "params": {"messageId": recv["messageId"], "messageSeq": recv["messageSeq"]},
            }
        )
        conn = next(c for c in node.node.registry if c.uid == "alice")
        await wait_for(lambda: not conn.inflight, 5, "the recvack untracks the RECV")
        assert conn.protocol == "jsonrpc" and node.node.gateway.statistics()["jsonrpc_accepted"] == 1
        assert (await alice.call("ping", {}, "p"))["result"] is None
        assert (await alice.call("ping", None, 9))["result"] is None  # an integer id is echoed as given

        # Several objects in one message, answered one by one.
        await alice.send('{"id":"a","method":"ping"} {"id":"b","method":"ping"}')
        assert (await alice.answer("a"))["result"] is None
        assert (await alice.answer("b"))["result"] is None
        assert not alice.notifications  # nothing resent after the recvack

        # `disconnect`: answered, then closed (without a disconnect notification: that means a kick).
        assert (await alice.call("disconnect", {"reasonCode": 0}, "bye"))["result"] is None
        assert await alice.closed() and not alice.notifications
        await bob.ping()


async def test_bad_input_gets_an_error_or_a_close_and_nobody_else_notices(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_client(*node.tcp, "witness") as witness, rpc_to(node) as light:
        assert (await light.connect("light"))["reasonCode"] == Reason.SUCCESS

        # Before connect: answered, then closed.
        for first, code in [
            ("hello there", jsonrpc.PARSE_ERROR),
            ("{" * 100_000, jsonrpc.PARSE_ERROR),
            ("[" * 100_000, jsonrpc.PARSE_ERROR),  # deeper than the JSON parser goes: no RecursionError
            ({"id": "1", "method": "send", "params": {}}, jsonrpc.INVALID_REQUEST),
            ({"id": "1", "method": "connect"}, jsonrpc.INVALID_PARAMS),  # no uid
            ({"id": "1", "method": "connect", "params": {"uid": 5}}, jsonrpc.INVALID_PARAMS),
            ({"id": "1", "method": "connect", "params": []}, jsonrpc.INVALID_PARAMS),
            ({"method": "connect", "params": {"uid": "x"}}, jsonrpc.INVALID_REQUEST),  # no id
            ({"id": "1", "method": "subscribe", "params": {}}, jsonrpc.INVALID_REQUEST),
            ([1, 2], jsonrpc.INVALID_REQUEST),
        ]:
            async with rpc_to(node) as bad:
                await bad.send(first)
                assert error_code(await bad.next()) == code, first
                assert await bad.closed(), first

        # After connect: answered, and the connection goes on.
        async with rpc_to(node) as rpc:
            await rpc.connect("mallory")
            good = base64.b64encode(b"{}").decode()
            for message, code in [
                ("not json", jsonrpc.PARSE_ERROR),
                (b"\xff\xfe binary junk", jsonrpc.PARSE_ERROR),
                ({"id": "u", "method": "teleport", "params": {}}, jsonrpc.METHOD_NOT_FOUND),
                (
                    {"id": "s", "method": "send", "params": {"channelType": 1, "payload": good}},
                    jsonrpc.INVALID_PARAMS,
                ),
                (
                    {
                        "id": "s",
                        "method": "send",
                        "params": {"channelId": "bob", "channelType": "1", "payload": good},
                    },
                    jsonrpc.INVALID_PARAMS,
                ),
                (
                    {
                        "id": "s",
                        "method": "send",
                        "params": {"channelId": "bob", "channelType": 1, "payload": "%%"},
                    },
                    jsonrpc.INVALID_PARAMS,
                ),
                (
                    {
                        "id": "s",
                        "method": "send",
                        "params": {
                            "channelId": "bob",
                            "channelType": 1,
                            "payload": good,
                            "header": {"redDot": 1},
                        },
                    },
                    jsonrpc.INVALID_PARAMS,
                ),
                (
                    {
                        "id": "s",
                        "method": "send",
                        "params": {"channelId": "b" * 200, "channelType": 1, "payload": good},
                    },
                    jsonrpc.INVALID_PARAMS,
                ),
                ({"id": "c", "method": "connect", "params": {"uid": "again"}}, jsonrpc.INVALID_REQUEST),
                ({"id": 1.5, "method": "ping"}, jsonrpc.INVALID_REQUEST),
                ({"id": "v", "jsonrpc": "1.0", "method": "ping"}, jsonrpc.INVALID_REQUEST),
                (
                    {"method": "recvack", "params": {"messageId": "x1", "messageSeq": 1}},
                    jsonrpc.INVALID_PARAMS,
                ),
                # A lone surrogate has no UTF-8: refused in a field, echoed \u-escaped in an id.
                (SEND_TO_SURROGATE, jsonrpc.INVALID_PARAMS),
                ('{"id":"\\ud800","method":"teleport"}', jsonrpc.METHOD_NOT_FOUND),
                (SEND_WITH_HUGE_EXPIRE, jsonrpc.INVALID_PARAMS),
                (
                    {"method": "recvack", "params": {"messageId": "\u00b2", "messageSeq": 1}},
                    jsonrpc.INVALID_PARAMS,
                ),
            ]:
                await rpc.send(message)
                answer = await rpc.next()
                assert error_code(answer) == code, message
                assert (await rpc.call("ping", {}, "alive"))["result"] is None, message
            # A send the channel pool refuses is a result with its reason, as a binary SENDACK.
            params = {"channelId": "", "channelType": 1, "payload": good}
            assert (await rpc.call("send", params, "e"))["result"]["reasonCode"] != Reason.SUCCESS

        # A message over max_frame_bytes: closed by the WebSocket layer (1009), nothing else.
        async with rpc_to(node) as big:
            await big.connect("big")
            await big.send(
                json.dumps(
                    {"id": "x", "method": "ping", "pad": "x" * (node.node.config.tuning.max_frame_bytes + 64)}
                )
            )
            assert await big.closed()

        # Nothing sent within connect_timeout_s (1 s here): closed.
        async with rpc_to(node) as silent:
            assert await silent.closed(timeout_s=5)

        await witness.ping()
        assert (await light.call("ping", {}, "still"))["result"] is None
        assert not witness.disconnected.is_set()
    tracebacks = [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def test_connect_goes_through_the_user_pool_rules(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, token_auth=True)
    async with running_node(config) as node:
        await api(node, "/user/token", {"uid": "ann", "token": "app-1", "device_flag": 0, "device_level": 1})
        async with rpc_to(node) as wrong:
            result = await wrong.call("connect", {"uid": "ann", "token": "nope", "deviceFlag": 0}, "c")
            assert result["result"]["reasonCode"] == Reason.AUTH_FAIL  # a refusal is a result, then a close
            assert await wrong.closed()
        async with rpc_to(node) as first:
            assert (await first.connect("ann", token="app-1", deviceId="phone"))[
                "reasonCode"
            ] == Reason.SUCCESS
            # A master-level login of the device flag from another device kicks it: a disconnect notification.
            async with rpc_to(node) as second:
                assert (await second.connect("ann", token="app-1", deviceId="tablet"))[
                    "reasonCode"
                ] == Reason.SUCCESS
                assert await first.closed()
                kicks = [n for n in first.notifications if n["method"] == "disconnect"]
                assert [k["params"]["reasonCode"] for k in kicks] == [Reason.CONNECT_KICK]
                # A binary login of the same device kicks the JSON-RPC one just the same.
                async with open_client(
                    *node.tcp, "ann", token="app-1", device_flag=0, device_id="desk"
                ) as desk:
                    assert await second.closed()
                    assert [n["params"]["reasonCode"] for n in second.notifications] == [Reason.CONNECT_KICK]
                    await desk.ping()
        await api(node, "/channel/info", {"channel_id": "ann", "channel_type": 1, "ban": 1})
        async with rpc_to(node) as banned:
            result = await banned.call("connect", {"uid": "ann", "token": "app-1", "deviceFlag": 0}, "c")
            assert result["result"]["reasonCode"] == Reason.BAN


async def test_the_switch_turns_jsonrpc_off(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", jsonrpc=False)
    async with running_node(config) as node, rpc_to(node) as rpc:
        await rpc.send({"id": "c", "method": "connect", "params": {"uid": "x"}})
        assert await rpc.closed()
        assert not rpc.notifications  # not even an error: the node speaks only binary here
        assert node.node.gateway.statistics()["jsonrpc_accepted"] == 0
        async with open_client(*node.ws, "y", websocket=True) as binary:
            await binary.ping()


def test_the_switch_is_a_checked_boolean(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    body = (
        '[nodes.n1]\nnumeric_id = 1\nraft = "127.0.0.1:1"\ntcp = "127.0.0.1:2"\nws = "127.0.0.1:3"\n'
        'http = "127.0.0.1:4"\ndata_dir = "d"\n'
    )
    path.write_text("[cluster]\njsonrpc = false\n" + body)
    assert load(str(path)).jsonrpc is False
    path.write_text(body)
    assert load(str(path)).jsonrpc is True
    path.write_text('[cluster]\njsonrpc = "no"\n' + body)
    with pytest.raises(ConfigError, match=r"cluster\.jsonrpc"):
        load(str(path))


def test_dup_marks_a_recv_resend() -> None:
    recv = Recv(0, "", "bob", "bob", 1, "n", 5, 6, 7, b"x", flags=FLAG_RED_DOT)
    frame = jsonrpc.recv_notification(recv)
    assert json.loads(jsonrpc.dup(frame))["params"]["header"] == {"dup": True, "redDot": True}
    bare = jsonrpc.recv_notification(Recv(0, "", "bob", "bob", 1, "n", 5, 6, 7, b"x"))
    assert json.loads(jsonrpc.dup(bare))["params"]["header"] == {"dup": True}


def test_a_message_event_is_an_event_notification_whatever_version_the_client_named() -> None:
    event = Event("e1", "stream.delta", 1_700_000_000, b'{"client_msg_no":"m1","payload":{"delta":"hi"}}')
    frame = jsonrpc.JsonRpcCodec(lambda _answer: None).encode(event)
    assert json.loads(frame) == {
        "jsonrpc": "2.0",
        "method": "event",
        "params": {
            "id": "e1",
            "type": "stream.delta",
            "timestamp": 1_700_000_000,
            "data": event.data.decode(),
        },
    }

    async def queued() -> tuple[bool, list[bytes]]:
        conn = Connection(
            1, "ws", "127.0.0.1:1", outbound_frames=8, outbound_bytes=1 << 20, inflight_bytes=1 << 20
        )
        conn.jsonrpc, conn.version = (
            jsonrpc.JsonRpcCodec(lambda _answer: None),
            2,
        )  # a light client that named an old version
        sent = conn.send_event(event, delta=True, deltas_max=10)
        return sent, conn.take_frames()[0]

    sent, frames = trio.run(queued)
    assert sent and frames == [frame]  # the EVENT packet's version gate is the binary SDKs', not JSON-RPC's
