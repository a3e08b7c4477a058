"""The business HTTP API against WuKongIM's documented behaviour (v2), on a real node and a real cluster.

Every node here runs with a manager token, as production does, so every call also exercises the `token`
header. Where imnode deliberately differs from WuKongIM the test says so. A failing check of a real bug is
kept as a strict xfail whose reason names the bug.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from node.api.app import MAX_BODY_BYTES, F
from node.client import ClientError, ConnectRefused, open_client
from node.wire.protocol import Reason
from raft.commands import MAX_UIDS_PER_OP, person_channel_id
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import RunningNode, http_json, running_node, single_node_config, wait_for

TOKEN = "http-api-test-token"
TEXT = b'{"content":"hello","type":1}'
T = TypeVar("T")


# -- helpers ---------------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Api:
    """The business server's view of one node: JSON calls carrying the manager token."""

    def __init__(self, base: str, token: str = TOKEN) -> None:
        self.base = base
        self.token = token

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        return await http_json(self.base, method, path, body, raw=raw, headers={"token": self.token})

    async def post(self, path: str, body: Any) -> Any:
        status, answer = await self.call("POST", path, body)
        assert status == 200, (path, body, status, answer)
        return answer

    async def get(self, path: str) -> Any:
        status, answer = await self.call("GET", path)
        assert status == 200, (path, status, answer)
        return answer

    async def refused(self, method: str, path: str, body: Any = None, status: int = 400) -> str:
        """Asserts WuKongIM's error shape and returns the message."""
        got, answer = await self.call(method, path, body)
        assert got == status, (path, body, got, answer)
        assert set(answer) == {"msg", "status"} and answer["status"] == status, answer
        assert isinstance(answer["msg"], str) and answer["msg"]
        return str(answer["msg"])

    async def send(
        self, from_uid: str, channel_id: str, channel_type: int, payload: bytes = TEXT, cmn: str = ""
    ) -> dict[str, Any]:
        body = {
            "header": {"no_persist": 0, "red_dot": 1, "sync_once": 0},
            "from_uid": from_uid,
            "channel_id": channel_id,
            "channel_type": channel_type,
            "payload": b64(payload),
        }
        if cmn:
            body["client_msg_no"] = cmn
        answer: dict[str, Any] = await self.post("/message/send", body)
        return answer

    async def conversations(self, uid: str, **options: Any) -> list[dict[str, Any]]:
        answer = await self.post("/conversation/sync", {"uid": uid, "msg_count": 20, **options})
        assert isinstance(answer, list), answer
        return answer

    async def conversation(self, uid: str, channel_id: str, channel_type: int) -> dict[str, Any] | None:
        for row in await self.conversations(uid):
            if (row["channel_id"], row["channel_type"]) == (channel_id, channel_type):
                return row
        return None

    async def messagesync(self, login_uid: str, channel_id: str, channel_type: int, **window: Any) -> Any:
        body = {"login_uid": login_uid, "channel_id": channel_id, "channel_type": channel_type, **window}
        return await self.post("/channel/messagesync", body)

    async def last_seq(self, login_uid: str, channel_id: str, channel_type: int) -> int:
        """The newest stored seq, read through messagesync (see the GET query-parameter bug below)."""
        newest = await self.messagesync(login_uid, channel_id, channel_type, limit=1)
        return int(newest["messages"][0]["message_seq"]) if newest["messages"] else 0


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, timeout_s: float = 10.0
) -> T:
    """Poll `probe` until `ok` holds on its value (read-after-write across nodes, presence)."""
    value: T | None = None
    with trio.move_on_after(timeout_s):
        while True:
            value = await probe()
            if ok(value):
                return value
            await trio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s}s; last value {value!r}")


async def http_text(base: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, str]:
    """(status, content-type, body text) for a non-JSON answer such as /metrics."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", "Content-Length: 0"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    header, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields.get("content-type", ""), payload.decode()


def proposed(node: RunningNode) -> int:
    return int(node.node.raft.proposed)


async def settled(node: RunningNode) -> int:
    """Raft proposals so far, once the start-up proposal (the node's epoch) has committed."""
    await wait_for(lambda: bool(node.node.presence.epoch), 10, "the node's epoch committed")
    return proposed(node)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    """One real node with a manager token configured (every path but /health needs it)."""
    async with running_node(single_node_config(tmp_path / "n1", manager_token=TOKEN)) as running:
        yield running


@pytest.fixture
def api(node: RunningNode) -> Api:
    return Api(node.http)


async def make_group(api: Api, channel_id: str, members: list[str], **flags: int) -> None:
    body = {"channel_id": channel_id, "channel_type": 2, "subscribers": members, **flags}
    assert await api.post("/channel", body) == {"status": 200}


# -- the manager token -----------------------------------------------------------------------------------
async def test_every_path_but_the_public_ones_needs_the_manager_token(node: RunningNode, api: Api) -> None:
    before = await settled(node)
    public = {path for path, route in node.node.http.routes.items() if route.public}
    # Liveness, and the console's static files (no data in them; tests/api/test_console_api.py reads them).
    assert public == {"/health", "/console", "/console/", "/console/console.js", "/console/console.css"}
    for path, route in node.node.http.routes.items():
        if path.startswith("/console"):
            continue
        body = {"uid": "alice", "token": "t", "channel_id": "g", "channel_type": 2, "uids": ["a"]}
        for headers in ({}, {"token": "wrong"}, {"token": TOKEN + "x"}):
            status, answer = await http_json(node.http, route.method, path, body, headers=headers)
            if path == "/health":
                assert (status, answer) == (200, {"status": "ok"})
                continue
            assert status == 401, (path, headers, status, answer)
            assert set(answer) == {"msg", "status"} and answer["status"] == 401
    assert proposed(node) == before  # a request without the token never reaches Raft
    assert await api.get("/user/systemuids") == []


# -- users -----------------------------------------------------------------------------------------------
async def test_user_token_logs_in_and_device_level_1_kicks_the_same_device_flag(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, token_auth=True)
    async with running_node(config) as node:
        api, (host, port) = Api(node.http), node.tcp
        body = {"uid": "alice", "token": "app-1", "device_flag": 0, "device_level": 0}
        assert await api.post("/user/token", body) == {"status": 200}
        await api.post("/user/token", {"uid": "alice", "token": "web-1", "device_flag": 1})
        with pytest.raises(ConnectRefused) as refused:
            async with open_client(host, port, "alice", token="wrong", device_flag=0):
                pass
        assert refused.value.reason_code == Reason.AUTH_FAIL
        with pytest.raises(ConnectRefused) as refused:
            async with open_client(host, port, "alice", token="web-1", device_flag=0):
                pass  # a token belongs to its device flag
        assert refused.value.reason_code == Reason.AUTH_FAIL
        async with (
            open_client(host, port, "alice", token="app-1", device_flag=0) as app,
            open_client(host, port, "alice", token="web-1", device_flag=1) as web,
        ):
            # device_level 0 replaces the token but leaves the logged-in device alone
            await api.post("/user/token", {"uid": "alice", "token": "app-2", "device_flag": 0})
            await app.ping()
            body = {"uid": "alice", "token": "app-3", "device_flag": 0, "device_level": 1}
            await api.post("/user/token", body)
            with trio.fail_after(5):
                await app.disconnected.wait()
            assert app.disconnect_reason == Reason.CONNECT_KICK
            await web.ping()  # another device flag is not kicked
            assert not web.disconnected.is_set()
        with pytest.raises(ConnectRefused):
            async with open_client(host, port, "alice", token="app-2", device_flag=0):
                pass
        async with open_client(host, port, "alice", token="app-3", device_flag=0) as again:
            await again.ping()


async def test_device_quit_kicks_with_reason_12_and_clears_the_token(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, token_auth=True)
    async with running_node(config) as node:
        api, (host, port) = Api(node.http), node.tcp
        await api.post("/user/token", {"uid": "bob", "token": "app", "device_flag": 0})
        await api.post("/user/token", {"uid": "bob", "token": "web", "device_flag": 1})
        async with (
            open_client(host, port, "bob", token="app", device_flag=0) as app,
            open_client(host, port, "bob", token="web", device_flag=1) as web,
        ):
            assert await api.post("/user/device_quit", {"uid": "bob", "device_flag": 0}) == {"status": 200}
            with trio.fail_after(5):
                await app.disconnected.wait()
            assert app.disconnect_reason == Reason.CONNECT_KICK
            await web.ping()
            with pytest.raises(ConnectRefused) as refused:
                async with open_client(host, port, "bob", token="app", device_flag=0):
                    pass
            assert refused.value.reason_code == Reason.AUTH_FAIL
            await api.post("/user/device_quit", {"uid": "bob", "device_flag": -1})
            with trio.fail_after(5):
                await web.disconnected.wait()
            assert web.disconnect_reason == Reason.CONNECT_KICK
        with pytest.raises(ConnectRefused):
            async with open_client(host, port, "bob", token="web", device_flag=1):
                pass
        await api.refused("POST", "/user/device_quit", {"uid": "bob", "device_flag": -2})


async def test_onlinestatus_takes_and_answers_bare_arrays_of_online_devices(
    node: RunningNode, api: Api
) -> None:
    host, port = node.tcp

    async def online(uids: list[str]) -> list[tuple[str, int, int]]:
        answer = await api.post("/user/onlinestatus", uids)
        assert isinstance(answer, list)
        return sorted((row["uid"], row["device_flag"], row["online"]) for row in answer)

    assert await online(["alice", "bob", "carol"]) == []
    async with (
        open_client(host, port, "alice", device_flag=0),
        open_client(host, port, "alice", device_flag=1),
    ):
        async with open_client(host, port, "bob", device_flag=0):
            expected = [("alice", 0, 1), ("alice", 1, 1), ("bob", 0, 1)]
            await eventually(
                lambda: online(["alice", "bob", "carol"]), lambda got: got == expected, "three devices"
            )
        await eventually(
            lambda: online(["alice", "bob"]), lambda got: got == expected[:2], "bob gone offline"
        )
    await eventually(lambda: online(["alice"]), lambda got: got == [], "everyone offline")
    await api.refused("POST", "/user/onlinestatus", {"uids": ["alice"]})  # a bare array, not an object


async def test_system_uids_are_listed_and_bypass_permission_checks(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    await make_group(api, "g1", ["alice"])
    assert await api.post("/user/systemuids_add", {"uids": ["ops", "bot"]}) == {"status": 200}
    assert sorted(await api.get("/user/systemuids")) == ["bot", "ops"]
    async with open_client(host, port, "ops") as ops, open_client(host, port, "alice") as alice:
        assert (await ops.send("g1", 2, TEXT)).reason_code == Reason.SUCCESS  # not a subscriber
        assert (await alice.recv()).from_uid == "ops"
        await api.post("/channel/blacklist_add", {"channel_id": "g1", "channel_type": 2, "uids": ["ops"]})
        assert (await ops.send("g1", 2, TEXT)).reason_code == Reason.SUCCESS  # even blacklisted
        await api.post("/user/systemuids_remove", {"uids": ["ops"]})
        assert await api.get("/user/systemuids") == ["bot"]
        assert (await ops.send("g1", 2, TEXT)).reason_code == Reason.IN_BLACKLIST
    await api.refused("POST", "/user/systemuids_add", {"uids": []})


# -- channels --------------------------------------------------------------------------------------------
async def test_channel_writes_every_flag_and_channel_info_only_flags(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    await make_group(api, "g1", ["alice", "bob"], ban=1)
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:

        async def reason() -> int:
            return int((await alice.send("g1", 2, TEXT)).reason_code)

        assert await reason() == Reason.BAN
        # A later /channel without `ban` un-bans: omitted flags are written as 0.
        await api.post("/channel", {"channel_id": "g1", "channel_type": 2})
        assert await reason() == Reason.SUCCESS
        assert (await bob.recv()).channel_id == "g1"  # the subscribers were kept
        await api.post("/channel", {"channel_id": "g1", "channel_type": 2, "send_ban": 1})
        assert await reason() == Reason.SEND_BAN
        await api.post("/channel/info", {"channel_id": "g1", "channel_type": 2, "disband": 1})
        assert await reason() == Reason.DISBAND
        await api.post("/channel/info", {"channel_id": "g1", "channel_type": 2, "ban": 1})
        assert await reason() == Reason.BAN
        await api.post("/channel/info", {"channel_id": "g1", "channel_type": 2})
        assert await reason() == Reason.SUCCESS
        assert (await bob.recv()).channel_id == "g1"  # /channel/info left the subscribers alone
        assert (await alice.send("nowhere", 2, TEXT)).reason_code == Reason.CHANNEL_NOT_EXIST
        # reset replaces the subscriber set
        body = {"channel_id": "g1", "channel_type": 2, "subscribers": ["carol"], "reset": 1}
        await api.post("/channel", body)
        assert await reason() == Reason.SUBSCRIBER_NOT_EXIST
    await api.refused("POST", "/channel", {"channel_id": "bob", "channel_type": 1, "subscribers": ["x"]})


async def test_channel_delete_drops_the_messages_and_refuses_person_channels(
    node: RunningNode, api: Api
) -> None:
    await make_group(api, "g1", ["alice", "bob"])
    for _ in range(3):
        await api.send("alice", "g1", 2)
    assert await api.last_seq("alice", "g1", 2) == 3
    assert await api.post("/channel/delete", {"channel_id": "g1", "channel_type": 2}) == {"status": 200}
    synced = await api.messagesync("alice", "g1", 2, limit=100)
    assert synced["messages"] == [] and synced["more"] == 0
    assert await api.conversation("alice", "g1", 2) is None
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice:
        assert (await alice.send("g1", 2, TEXT)).reason_code == Reason.CHANNEL_NOT_EXIST
    await api.refused("POST", "/channel/delete", {"channel_id": "alice", "channel_type": 1})


async def test_get_endpoints_take_integer_query_parameters(node: RunningNode, api: Api) -> None:
    await make_group(api, "g1", ["alice"])
    for _ in range(3):
        await api.send("alice", "g1", 2)
    await api.send("alice", "bob", 1)
    assert await api.get("/channel/max_message_seq?channel_id=g1&channel_type=2") == {"message_seq": 3}
    seq = "/channel/max_message_seq?channel_id=alice&channel_type=1&login_uid=bob"
    assert await api.get(seq) == {"message_seq": 1}
    stored = person_channel_id("alice", "bob")
    assert await api.get(f"/channel/max_message_seq?channel_id={stored}&channel_type=1") == {"message_seq": 1}
    assert await api.get("/channel/max_message_seq?channel_id=nowhere&channel_type=2") == {"message_seq": 0}
    await api.refused("GET", "/channel/max_message_seq?channel_id=alice&channel_type=1")  # login_uid
    await api.refused("GET", "/channel/max_message_seq?channel_id=g1&channel_type=two")
    await api.post("/channel/delete", {"channel_id": "g1", "channel_type": 2})
    assert await api.get("/channel/max_message_seq?channel_id=g1&channel_type=2") == {"message_seq": 0}

    await make_group(api, "g2", ["alice", "bob"])
    assert await api.get("/channel/whitelist?channel_id=g2&channel_type=2") == []
    await api.post(
        "/channel/whitelist_add", {"channel_id": "g2", "channel_type": 2, "uids": ["bob", "alice"]}
    )
    # imnode answers uid strings (WuKongIM's openapi does; its code answers member objects)
    assert sorted(await api.get("/channel/whitelist?channel_id=g2&channel_type=2")) == ["alice", "bob"]

    host, port = node.tcp
    async with open_client(host, port, "alice"), open_client(host, port, "bob"):
        page = await api.get("/connz?offset=1&limit=1")
        assert (page["total"], len(page["connections"]), page["offset"], page["limit"]) == (2, 1, 1, 1)
    await api.refused("GET", "/connz?limit=0")


async def test_a_recreated_channel_does_not_answer_sends_with_deleted_messages(api: Api) -> None:
    await make_group(api, "g1", ["alice"])
    await api.send("alice", "g1", 2, cmn="order-42")
    await api.post("/channel/delete", {"channel_id": "g1", "channel_type": 2})
    await make_group(api, "g1", ["alice"])
    again = await api.send("alice", "g1", 2, b"after the delete", cmn="order-42")
    synced = await api.messagesync("alice", "g1", 2, limit=10)
    assert [m["message_seq"] for m in synced["messages"]] == [again["message_seq"]]


async def test_subscribers_new_members_start_read_and_reset_replaces(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    await make_group(api, "g1", ["alice"])
    for _ in range(3):
        await api.send("alice", "g1", 2)
    body = {"channel_id": "g1", "channel_type": 2, "subscribers": ["bob"]}
    assert await api.post("/channel/subscriber_add", body) == {"status": 200}
    joined = await api.conversation("bob", "g1", 2)
    assert joined is not None and joined["unread"] == 0 and joined["readed_to_msg_seq"] == 3
    await api.send("alice", "g1", 2)
    joined = await api.conversation("bob", "g1", 2)
    assert joined is not None and joined["unread"] == 1
    async with open_client(host, port, "bob") as bob, open_client(host, port, "carol") as carol:
        assert (await bob.send("g1", 2, TEXT)).reason_code == Reason.SUCCESS
        body = {"channel_id": "g1", "channel_type": 2, "subscribers": ["carol"], "reset": 1}
        await api.post("/channel/subscriber_add", body)
        assert (await bob.send("g1", 2, TEXT)).reason_code == Reason.SUBSCRIBER_NOT_EXIST
        assert (await carol.send("g1", 2, TEXT)).reason_code == Reason.SUCCESS
        body = {"channel_id": "g1", "channel_type": 2, "subscribers": ["carol"]}
        await api.post("/channel/subscriber_remove", body)
        assert (await carol.send("g1", 2, TEXT)).reason_code == Reason.SUBSCRIBER_NOT_EXIST
    assert await api.conversation("carol", "g1", 2) is None  # removal drops the conversation
    person = {"channel_id": "alice", "channel_type": 1, "subscribers": ["bob"]}
    await api.refused("POST", "/channel/subscriber_add", person)
    temp = {"channel_id": "g1", "channel_type": 2, "subscribers": ["x"], "temp_subscriber": 1}
    await api.refused("POST", "/channel/subscriber_add", temp)  # WuKongIM: no longer supported


async def test_subscriber_remove_refuses_person_channels(api: Api) -> None:
    sent = await api.send("alice", "bob", 1)
    stored = (await api.messagesync("bob", "alice", 1, limit=1))["messages"][0]
    assert stored["message_id"] == sent["message_id"]
    for channel_id in ("alice", person_channel_id("alice", "bob")):
        body = {"channel_id": channel_id, "channel_type": 1, "subscribers": ["bob"]}
        await api.refused("POST", "/channel/subscriber_remove", body)
    assert await api.conversation("bob", "alice", 1) is not None


async def test_permission_reason_codes_for_group_and_person_channels(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    await make_group(api, "g1", ["alice", "bob", "carol"])
    g1 = {"channel_id": "g1", "channel_type": 2}
    async with (
        open_client(host, port, "alice") as alice,
        open_client(host, port, "bob") as bob,
        open_client(host, port, "carol") as carol,
        open_client(host, port, "mallory") as mallory,
    ):

        async def reason(client: Any, channel_id: str = "g1", channel_type: int = 2) -> int:
            return int((await client.send(channel_id, channel_type, TEXT)).reason_code)

        assert await reason(mallory) == Reason.SUBSCRIBER_NOT_EXIST
        assert await api.post("/channel/blacklist_add", {**g1, "uids": ["bob"]}) == {"status": 200}
        assert await reason(bob) == Reason.IN_BLACKLIST
        assert await reason(alice) == Reason.SUCCESS
        await api.post("/channel/blacklist_set", {**g1, "uids": ["carol"]})
        assert (await reason(bob), await reason(carol)) == (Reason.SUCCESS, Reason.IN_BLACKLIST)
        await api.post("/channel/blacklist_remove", {**g1, "uids": ["carol"]})
        assert await reason(carol) == Reason.SUCCESS

        await api.post("/channel/whitelist_add", {**g1, "uids": ["alice"]})
        assert (await reason(alice), await reason(bob)) == (Reason.SUCCESS, Reason.NOT_IN_WHITELIST)
        await api.post("/channel/whitelist_set", {**g1, "uids": ["carol", "bob"]})
        assert (await reason(alice), await reason(bob)) == (Reason.NOT_IN_WHITELIST, Reason.SUCCESS)
        await api.post("/channel/whitelist_remove", {**g1, "uids": ["bob", "carol"]})
        assert await reason(alice) == Reason.SUCCESS
        await api.post("/channel/whitelist_set", {**g1, "uids": ["bob"]})
        assert await reason(alice) == Reason.NOT_IN_WHITELIST
        await api.post("/channel/whitelist_set", g1)  # set with no uids empties the list
        assert await reason(alice) == Reason.SUCCESS

        # Person channels honour the receiver's lists, kept on the channel named after the receiver.
        bobs = {"channel_id": "bob", "channel_type": 1}
        assert await reason(mallory, "bob", 1) == Reason.SUCCESS
        await api.post("/channel/blacklist_add", {**bobs, "uids": ["mallory"]})
        assert await reason(mallory, "bob", 1) == Reason.IN_BLACKLIST
        assert await reason(bob, "mallory", 1) == Reason.SUCCESS  # mallory did not block bob
        assert await reason(alice, "bob", 1) == Reason.SUCCESS
        await api.post("/channel/whitelist_add", {**bobs, "uids": ["alice"]})
        assert await reason(carol, "bob", 1) == Reason.NOT_IN_WHITELIST
        assert await reason(alice, "bob", 1) == Reason.SUCCESS
        await api.post("/channel/blacklist_remove", {**bobs, "uids": ["mallory"]})
        await api.post("/channel/whitelist_remove", {**bobs, "uids": ["alice"]})
        assert await reason(mallory, "bob", 1) == Reason.SUCCESS
        # An HTTP send (the business server) is checked at channel level only.
        await api.post("/channel/blacklist_add", {**bobs, "uids": ["mallory"]})
        await api.send("mallory", "bob", 1)

    await api.refused("GET", "/channel/whitelist?channel_id=g1")  # channel_type is required
    await api.refused("POST", "/channel/whitelist_add", {**g1, "uids": ["u" * 65]})
    await api.refused("POST", "/channel/blacklist_add", {**g1, "uids": []})


# -- messages --------------------------------------------------------------------------------------------
async def test_message_send_waits_for_the_commit_and_dedups_the_client_msg_no(
    node: RunningNode, api: Api
) -> None:
    host, port = node.tcp
    await make_group(api, "g1", ["alice", "bob"])
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:
        sent = await api.send("outsider", "g1", 2, b"from the server", cmn="cmn-g-1")
        assert sent["status"] == 200 and sent["message_seq"] == 1 and sent["message_id"] > 0
        assert sent["client_msg_no"] == "cmn-g-1"
        data = {k: sent[k] for k in ("message_id", "message_seq", "client_msg_no")}
        assert sent["data"] == data
        # The commit has happened by the time the answer comes: the message is readable at once.
        assert await api.last_seq("bob", "g1", 2) == 1
        for member in (alice, bob):
            got = await member.recv()
            assert (got.message_id, got.message_seq, got.channel_id, got.from_uid) == (
                sent["message_id"],
                1,
                "g1",
                "outsider",
            )
            assert got.payload == b"from the server"
        again = await api.send("outsider", "g1", 2, b"retry", cmn="cmn-g-1")
        assert (again["message_id"], again["message_seq"]) == (sent["message_id"], 1)

        person = await api.send("alice", "bob", 1, b"hi bob", cmn="cmn-p-1")
        got = await bob.recv()
        assert (got.message_id, got.from_uid, got.channel_id, got.channel_type) == (
            person["message_id"],
            "alice",
            "alice",
            1,
        )
        assert person["message_seq"] == 1  # the person channel alice/bob has a sequence of its own
        assert await api.last_seq("bob", "alice", 1) == 1
        with pytest.raises(ClientError):
            await bob.recv(timeout_s=0.3)  # the resend was not delivered again

    await api.post("/channel/info", {"channel_id": "g1", "channel_type": 2, "ban": 1})
    assert "reason 19" in await api.refused("POST", "/message/send", _send_body("alice", "g1", 2))
    await api.post("/channel/info", {"channel_id": "g1", "channel_type": 2, "disband": 1})
    assert "reason 24" in await api.refused("POST", "/message/send", _send_body("alice", "g1", 2))
    assert "reason 5" in await api.refused("POST", "/message/send", _send_body("alice", "nowhere", 2))
    temp = {**_send_body("alice", "", 2), "subscribers": ["bob", "carol"]}
    await api.refused("POST", "/message/send", temp)  # imnode: no temporary channels
    await api.refused("POST", "/message/send", {**_send_body("alice", "g1", 2), "payload": "%%%"})
    assert await api.last_seq("alice", "g1", 2) == 1


def _send_body(from_uid: str, channel_id: str, channel_type: int) -> dict[str, Any]:
    return {
        "from_uid": from_uid,
        "channel_id": channel_id,
        "channel_type": channel_type,
        "payload": b64(TEXT),
    }


async def test_sendbatch_sends_one_person_message_per_subscriber(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    async with open_client(host, port, "bob") as bob, open_client(host, port, "carol") as carol:
        body = {
            "header": {"red_dot": 1},
            "from_uid": "notice",
            "subscribers": ["bob", "carol", "notice"],
            "payload": b64(b"batch"),
        }
        answer = await api.post("/message/sendbatch", body)
        # Sending to oneself is refused (channel id error); everyone else gets the message.
        assert answer == {"fail_uids": ["notice"], "reason": [Reason.CHANNEL_ID_ERROR]}
        for client in (bob, carol):
            got = await client.recv()
            assert (got.from_uid, got.channel_id, got.channel_type, got.payload) == (
                "notice",
                "notice",
                1,
                b"batch",
            )
    for uid in ("bob", "carol"):
        synced = await api.messagesync(uid, "notice", 1, limit=10)
        assert [m["from_uid"] for m in synced["messages"]] == ["notice"]


def wukongim_window(last: int, start: int, end: int, limit: int, pull_mode: int) -> list[int]:
    """The seqs WuKongIM v2 answers (LoadLastMsgs / LoadNextRangeMsgs / LoadPrevRangeMsgs)."""
    if start == 0 and end == 0:
        return list(range(max(1, last - limit + 1), last + 1))
    if pull_mode == 1:
        high = min(end, last + 1) if end else last + 1
        return list(range(max(start, 1), high))[:limit]
    if end > start:
        return []
    low = max(end + 1, start - limit + 1, 1)
    return list(range(low, min(start, last) + 1))


async def test_messagesync_windows_follow_wukongim(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    last = 12
    await make_group(api, "g1", ["alice", "bob"])
    async with open_client(host, port, "alice") as alice:
        acks = await alice.send_many([("g1", 2, f"m{i}".encode()) for i in range(1, last + 1)])
    assert [a.message_seq for a in acks] == list(range(1, last + 1))
    cases = [(0, 0, limit, mode) for limit in (1, 5, 12, 50) for mode in (0, 1)]
    cases += [(s, e, n, 1) for s in (0, 1, 5, 12, 13) for e in (0, 1, 6, 12, 13, 20) for n in (1, 3, 100)]
    cases += [(s, e, n, 0) for s in (1, 5, 12) for e in (0, 1, 4, 11, 12, 13) for n in (1, 3, 100)]

    async def check(start: int, end: int, limit: int, mode: int) -> None:
        window = {"start_message_seq": start, "end_message_seq": end, "limit": limit, "pull_mode": mode}
        answer = await api.messagesync("bob", "g1", 2, **window)
        expected = wukongim_window(last, start, end, limit, mode)
        seqs = [m["message_seq"] for m in answer["messages"]]
        assert seqs == expected, (window, seqs)
        assert answer["more"] == int(len(expected) >= limit), (window, answer["more"])
        assert (answer["start_message_seq"], answer["end_message_seq"]) == (start, end)

    async with trio.open_nursery() as nursery:
        for case in cases:
            nursery.start_soon(check, *case)

    newest = await api.messagesync("bob", "g1", 2, limit=1)
    message = newest["messages"][0]
    assert set(message) >= {
        "header",
        "setting",
        "message_id",
        "message_idstr",
        "client_msg_no",
        "message_seq",
        "from_uid",
        "channel_id",
        "channel_type",
        "expire",
        "timestamp",
        "payload",
    }
    assert set(message["header"]) == {"no_persist", "red_dot", "sync_once"}
    assert (message["message_id"], message["message_idstr"]) == (
        acks[-1].message_id,
        str(acks[-1].message_id),
    )
    assert (message["from_uid"], message["channel_id"], message["channel_type"]) == ("alice", "g1", 2)
    assert base64.b64decode(message["payload"]) == f"m{last}".encode()
    assert abs(message["timestamp"] - time.time()) < 60
    await api.refused("POST", "/channel/messagesync", {"channel_id": "g1", "channel_type": 2})


async def test_messagesync_down_from_beyond_the_last_seq(api: Api) -> None:
    await make_group(api, "g1", ["alice"])
    for _ in range(10):
        await api.send("alice", "g1", 2)
    window = {"start_message_seq": 12, "end_message_seq": 0, "limit": 5, "pull_mode": 0}
    answer = await api.messagesync("alice", "g1", 2, **window)
    assert [m["message_seq"] for m in answer["messages"]] == [8, 9, 10] and answer["more"] == 0


async def test_messagesync_down_with_start_0_and_an_end_is_empty(api: Api) -> None:
    await make_group(api, "g1", ["alice"])
    for _ in range(5):
        await api.send("alice", "g1", 2)
    window = {"start_message_seq": 0, "end_message_seq": 2, "limit": 10, "pull_mode": 0}
    assert (await api.messagesync("alice", "g1", 2, **window))["messages"] == []


async def test_person_messages_read_from_either_side(api: Api) -> None:
    first = await api.send("alice", "bob", 1, b"a->b")
    second = await api.send("bob", "alice", 1, b"b->a")
    assert (first["message_seq"], second["message_seq"]) == (1, 2)
    for viewer, peer in (("alice", "bob"), ("bob", "alice")):
        answer = await api.messagesync(viewer, peer, 1, limit=10)
        rows = [(m["from_uid"], m["channel_id"], m["message_seq"]) for m in answer["messages"]]
        # channel_id is the half of the stored "a@b" id that is not the sender
        assert rows == [("alice", "bob", 1), ("bob", "alice", 2)], viewer
    status, _ = await api.call("POST", "/message/send", _send_body("alice", "alice", 1))
    assert status == 400  # a person channel with oneself


# -- conversations ---------------------------------------------------------------------------------------
async def test_conversation_unread_counts_recents_and_their_edits(api: Api) -> None:
    await make_group(api, "g1", ["alice", "bob", "carol"])
    sent = [await api.send("bob", "alice", 1, f"p{i}".encode()) for i in range(1, 4)]
    await api.send("carol", "g1", 2)
    await api.send("carol", "g1", 2)
    await api.send("alice", "g1", 2)

    alices = {(c["channel_id"], c["channel_type"]): c for c in await api.conversations("alice")}
    assert set(alices) == {("bob", 1), ("g1", 2)}
    person = alices[("bob", 1)]
    assert (person["unread"], person["last_msg_seq"], person["readed_to_msg_seq"]) == (3, 3, 0)
    assert person["last_client_msg_no"] == sent[-1]["client_msg_no"]
    assert [m["message_seq"] for m in person["recents"]] == [3, 2, 1]  # newest first
    assert [m["message_id"] for m in person["recents"]] == [s["message_id"] for s in reversed(sent)]
    assert {"timestamp", "offset_msg_seq", "version"} <= set(person)
    assert alices[("g1", 2)]["unread"] == 0  # alice's own message read everything before it
    bobs = await api.conversation("bob", "alice", 1)
    assert bobs is not None and bobs["unread"] == 0  # one's own messages are never unread
    carols = await api.conversation("carol", "g1", 2)
    assert carols is not None and carols["unread"] == 1

    two = await api.conversations("alice", msg_count=2)
    assert [len(c["recents"]) for c in two] == [2, 2]
    # imnode difference: msg_count 0 still lists the conversations (WuKongIM answers []).
    bare = await api.conversations("alice", msg_count=0)
    assert len(bare) == 2 and all(c["recents"] == [] for c in bare)
    known = await api.conversations("alice", last_msg_seqs="bob:1:2")
    assert [m["message_seq"] for m in next(c for c in known if c["channel_type"] == 1)["recents"]] == [3]

    clear = {"uid": "alice", "channel_id": "bob", "channel_type": 1}
    assert await api.post("/conversations/clearUnread", clear) == {"status": 200}
    for _ in range(2):  # clearUnread sticks
        cleared = await api.conversation("alice", "bob", 1)
        assert cleared is not None and (cleared["unread"], cleared["readed_to_msg_seq"]) == (0, 3)
    await api.send("bob", "alice", 1)
    cleared = await api.conversation("alice", "bob", 1)
    assert cleared is not None and cleared["unread"] == 1

    assert await api.post("/conversations/setUnread", {**clear, "unread": 3}) == {"status": 200}
    await api.send("carol", "g1", 2)  # activity elsewhere does not undo it
    marked = await api.conversation("alice", "bob", 1)
    assert marked is not None and marked["unread"] == 3

    assert await api.post("/conversations/delete", clear) == {"status": 200}
    for _ in range(2):  # a deleted conversation stays deleted ...
        assert await api.conversation("alice", "bob", 1) is None
    await api.send("alice", "g1", 2)
    assert await api.conversation("alice", "bob", 1) is None
    await api.send("bob", "alice", 1, b"back")  # ... until a new message arrives
    back = await api.conversation("alice", "bob", 1)
    assert back is not None and back["unread"] == 1 and back["last_msg_seq"] == 5
    assert [base64.b64decode(m["payload"]) for m in back["recents"]] == [b"back"]


async def test_conversation_sync_filters_versions_and_pages(api: Api) -> None:
    for peer in ("bob", "carol", "dave"):
        await api.send(peer, "alice", 1)
    await make_group(api, "g1", ["alice", "bob"])
    await make_group(api, "g2", ["alice", "bob"])
    await api.send("bob", "g1", 2)
    await api.send("bob", "g2", 2)
    await api.post("/conversations/clearUnread", {"uid": "alice", "channel_id": "carol", "channel_type": 1})

    full = await api.conversations("alice")
    keys = [(c["channel_id"], c["channel_type"]) for c in full]
    assert sorted(keys) == [("bob", 1), ("carol", 1), ("dave", 1), ("g1", 2), ("g2", 2)]
    stamps = [(c["timestamp"], c["version"]) for c in full]
    assert stamps == sorted(stamps, reverse=True)  # newest first

    paged = []
    for page in (1, 2, 3):
        rows = await api.conversations("alice", page=page, page_size=2)
        assert len(rows) == (2 if page < 3 else 1)
        paged += [(c["channel_id"], c["channel_type"]) for c in rows]
    assert paged == keys
    assert await api.conversations("alice", page=4, page_size=2) == []

    unread = await api.conversations("alice", only_unread=1)
    assert sorted(c["channel_id"] for c in unread) == ["bob", "dave", "g1", "g2"]
    assert all(c["unread"] > 0 for c in unread)
    groups_only = await api.conversations("alice", exclude_channel_types=[1])
    assert sorted(c["channel_id"] for c in groups_only) == ["g1", "g2"]
    people_only = await api.conversations("alice", exclude_channel_types=[2])
    assert sorted(c["channel_id"] for c in people_only) == ["bob", "carol", "dave"]

    version = max(c["version"] for c in full)
    assert await api.conversations("alice", version=version) == []
    await api.send("bob", "g2", 2)
    await api.post(
        "/conversations/setUnread", {"uid": "alice", "channel_id": "dave", "channel_type": 1, "unread": 0}
    )
    changed = await api.conversations("alice", version=version)
    assert sorted((c["channel_id"], c["unread"]) for c in changed) == [("dave", 0), ("g2", 2)]
    assert all(c["version"] > version for c in changed)
    await api.refused("POST", "/conversation/sync", {"uid": "alice", "page_size": 0})


# -- operations ------------------------------------------------------------------------------------------
async def test_route_health_connz_varz_and_metrics(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    route = await api.get("/route")
    assert route == {
        "tcp_addr": f"{host}:{port}",
        "ws_addr": f"ws://{node.ws[0]}:{node.ws[1]}",
        "wss_addr": "",
    }
    status, answer = await http_json(node.http, "GET", "/health")
    assert (status, answer) == (200, {"status": "ok"})
    async with (
        open_client(host, port, "alice", device_flag=1, device_id="phone-1") as alice,
        open_client(host, port, "bob"),
    ):
        connz = await api.get("/connz")
        assert connz["total"] == 2 and (connz["offset"], connz["limit"]) == (0, 20)
        assert abs(connz["now"] - time.time()) < 60
        assert sorted(c["uid"] for c in connz["connections"]) == ["alice", "bob"]
        mine = (await api.get("/connz?uid=alice"))["connections"]
        assert len(mine) == 1
        assert (mine[0]["ip"], mine[0]["device"], mine[0]["device_id"]) == ("127.0.0.1", 1, "phone-1")
        assert isinstance(mine[0]["port"], int) and mine[0]["port"] > 0
        assert mine[0]["version"] == alice.version and isinstance(mine[0]["id"], int)
        varz = await api.get("/varz")
        assert varz["connections"] == 2 and varz["manager_token_on"] == 1
        await alice.send("bob", 1, TEXT)
        status, content_type, text = await http_text(node.http, "GET", "/metrics", {"token": TOKEN})
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        samples = {
            line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert samples["imnode_connections"] == 2
        assert samples["imnode_messages_committed_total"] >= 1
        assert samples["imnode_raft_is_leader"] == 1
        assert samples["imnode_http_requests_total"] >= 5
        assert samples['imnode_pool_queue_depth{pool="channel"}'] >= 0
        assert "# TYPE imnode_http_requests_total counter" in text
    status, _, _ = await http_text(node.http, "GET", "/metrics", {})
    assert status == 401


async def test_metrics_include_webhook_delivery(node: RunningNode) -> None:
    _, _, text = await http_text(node.http, "GET", "/metrics", {"token": TOKEN})
    assert any(line.startswith("imnode_webhook") for line in text.splitlines())


# -- the OpenAPI document and malformed input ------------------------------------------------------------
KIND_TYPES = {"str": "string", "uid": "string", "b64": "string", "int": "integer", "flag": "integer"}
KIND_TYPES["uids"] = "array"
KIND_TYPES |= {"ints": "array", "obj": "object", "ints32": "array", "ints63": "array", "objs": "array"}
KIND_TYPES["strs"] = "array"
KIND_TYPES["header"] = "object"


def _check_field_schema(where: str, f: F, schema: dict[str, Any]) -> None:
    if f.kind == "json":  # any JSON value (a message event's payload): no type
        assert "type" not in schema and schema["x-max-utf8-bytes"] == f.max_bytes, where
        return
    assert schema["type"] == KIND_TYPES[f.kind], where
    if f.kind in ("int", "flag"):
        assert (schema["minimum"], schema["maximum"]) == (f.low, 1 if f.kind == "flag" else f.high), where
    if f.kind in ("str", "uid", "b64"):
        assert schema["maxLength"] == f.max_bytes, where
    if f.kind == "uid":
        assert schema["pattern"] == "^[^@]*$", where
    if f.kind == "b64":
        assert schema["format"] == "byte", where
    if f.kind == "uids":
        assert schema["maxItems"] == MAX_UIDS_PER_OP and schema["items"]["type"] == "string", where
        assert schema["items"]["pattern"] == "^[^@]*$", where
    if f.kind == "header":
        assert set(schema["properties"]) == {"no_persist", "red_dot", "sync_once"}, where


async def test_openapi_lists_every_route_with_its_fields(node: RunningNode, api: Api) -> None:
    doc = await api.get("/openapi.json")
    assert doc["openapi"].startswith("3.")
    routes = node.node.http.routes
    assert set(doc["paths"]) == {path for path, route in routes.items() if not route.peer}
    checked = 0
    for path, route in routes.items():
        if route.peer:
            continue
        operations = doc["paths"][path]
        assert list(operations) == [route.method.lower()], path
        operation = operations[route.method.lower()]
        assert ("security" in operation) == (not route.public), path
        params = {p["name"]: p for p in operation.get("parameters", [])}
        assert set(params) == {f.name for f in route.query}, path
        for f in route.query:
            assert params[f.name]["in"] == "query" and params[f.name]["required"] == f.required
            _check_field_schema(f"{path}?{f.name}", f, params[f.name]["schema"])
        if route.method != "POST":
            assert "requestBody" not in operation, path
            continue
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        if route.body == "uid_array":
            assert schema["type"] == "array" and schema["items"]["type"] == "string", path
            continue
        assert schema["type"] == "object", path
        assert set(schema["properties"]) == {f.name for f in route.fields}, path
        assert sorted(schema["required"]) == sorted(f.name for f in route.fields if f.required), path
        for f in route.fields:
            _check_field_schema(f"{path}.{f.name}", f, schema["properties"][f.name])
            checked += 1
    assert checked > 60


def schema_accepts(schema: dict[str, Any], value: Any) -> bool:
    """A small validator for the JSON Schema subset the document uses (OpenAPI 3.0: null is no type)."""
    if "type" not in schema:  # any JSON value, bounded in size only (a message event's payload)
        return len(json.dumps(value).encode()) <= schema["x-max-utf8-bytes"]
    kind = schema["type"]
    if kind == "string":
        if not isinstance(value, str):
            return False
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            return False
        if schema.get("format") == "byte":
            try:
                base64.b64decode(value, validate=True)
            except ValueError:
                return False
        return "pattern" not in schema or re.search(schema["pattern"], value) is not None
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return bool(schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "array":
        if not isinstance(value, list):
            return False
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(schema_accepts(schema["items"], item) for item in value)
    if not isinstance(value, dict):
        return False
    if any(name not in value for name in schema.get("required", [])):
        return False
    properties = schema.get("properties", {})
    return all(schema_accepts(properties[name], v) for name, v in value.items() if name in properties)


def _valid(schema: dict[str, Any]) -> Any:
    kind = schema["type"]
    if kind == "string":
        return "eA==" if schema.get("format") == "byte" else "x"
    if kind == "integer":
        return schema.get("minimum", 0)
    if kind == "array":
        return [_valid(schema["items"])]
    return {}


_WRONG_TYPE: dict[str, list[Any]] = {
    "string": [123, True, ["x"], {"x": 1}],
    "integer": ["1", 1.5, True, [1], {}],
    "array": ["x", 1, {"x": 1}],
    "object": ["x", 1, [1]],
}


def _bad_values(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Values that violate `schema`, each with what it violates."""
    if "type" not in schema:  # any JSON value: only its size is bounded
        yield "x-max-utf8-bytes", "x" * schema["x-max-utf8-bytes"]
        return
    for value in _WRONG_TYPE[schema["type"]]:
        yield f"type {type(value).__name__}", value
    if "maxLength" in schema:
        yield "maxLength", "x" * (schema["maxLength"] + 1)
    if "maximum" in schema:
        yield "maximum", schema["maximum"] + 1
    if "minimum" in schema:
        yield "minimum", schema["minimum"] - 1
    if "maxItems" in schema:
        yield "maxItems", [_valid(schema["items"])] * (schema["maxItems"] + 1)
    if "items" in schema:
        for what, item in _bad_values(schema["items"]):
            if not isinstance(item, str) or len(item) < 1000:
                yield f"items {what}", [item]
    if schema.get("minLength", 0) > 0:
        yield "minLength", ""
    if schema.get("format") == "byte":
        yield "format byte", "%%%"
    if schema.get("pattern") == "^[^@]*$":
        yield "pattern", "eve@mail.com"


def schema_violations(doc: dict[str, Any]) -> Iterator[tuple[str, str, bytes]]:
    """(path, what, body) for every POST endpoint: bodies that break its published request schema."""
    for path, operations in sorted(doc["paths"].items()):
        operation = operations.get("post")
        if operation is None:
            continue
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        for what, top in (("array", []), ("string", "x"), ("number", 1), ("null", None), ("bool", True)):
            # A bare null where a uid array is due is taken as no uids, as Go's JSON binding in
            # WuKongIM does: not counted here.
            if schema["type"] != "array" or what not in ("array", "null"):
                yield path, f"top-level {what}", json.dumps(top).encode()
        if schema["type"] == "array":
            for what, value in _bad_values(schema):
                yield path, what, json.dumps(value).encode()
            yield path, "top-level object", b"{}"
            continue
        base = {
            name: _valid(prop) for name, prop in schema["properties"].items() if name in schema["required"]
        }
        for name in schema["required"]:
            yield path, f"{name} missing", json.dumps({k: v for k, v in base.items() if k != name}).encode()
            yield path, f"{name} null", json.dumps({**base, name: None}).encode()
        for name, prop in schema["properties"].items():
            for what, value in _bad_values(prop):
                yield path, f"{name} {what}", json.dumps({**base, name: value}).encode()


async def test_bodies_breaking_the_published_schema_get_400_and_never_reach_raft(
    node: RunningNode, api: Api
) -> None:
    doc = await api.get("/openapi.json")
    violations = list(schema_violations(doc))
    for path, what, body in violations:  # the generator makes real violations of the document
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert not schema_accepts(schema, json.loads(body)), (path, what)
    post_paths = {path for path, _, _ in violations}
    assert post_paths == {p for p, r in node.node.http.routes.items() if r.method == "POST" and not r.peer}
    assert len(violations) > 500
    before = await settled(node)
    wrong: list[tuple[str, str, int, Any]] = []
    limiter = trio.CapacityLimiter(16)

    async def one(path: str, what: str, body: bytes) -> None:
        async with limiter:
            status, answer = await api.call("POST", path, raw=body)
        expected = 413 if len(body) > MAX_BODY_BYTES else 400
        if status != expected or answer != {"msg": answer.get("msg"), "status": expected}:
            wrong.append((path, what, status, answer))

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for violation in violations:
                nursery.start_soon(one, *violation)
    assert not wrong, wrong[:10]
    assert proposed(node) == before
    assert await api.post("/user/systemuids_add", {"uids": ["still-serving"]}) == {"status": 200}


async def test_what_the_server_refuses_as_malformed_the_schema_refuses_too(api: Api) -> None:
    doc = await api.get("/openapi.json")
    boundary = [
        # Limits are UTF-8 bytes (published as x-max-utf8-bytes; maxLength equals them for ASCII), so a
        # string of 64 "é" (128 bytes) is outside what JSON Schema's character count can say.
        ("/user/systemuids_add", {"uids": ["u" * 65]}),  # items carry no maxLength
        ("/user/token", {"uid": "", "token": "t"}),  # no minLength on a required string
        ("/user/systemuids_add", {"uids": []}),  # no minItems on a required list
        ("/conversation/sync", {"uid": "a", "exclude_channel_types": [1] * 257}),  # no maxItems
    ]
    mismatches = []
    for path, body in boundary:
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        status, answer = await api.call("POST", path, body)
        if status == 400 and schema_accepts(schema, body):
            mismatches.append((path, body if len(json.dumps(body)) < 200 else "...", answer["msg"]))
    assert not mismatches


async def test_malformed_requests_on_every_endpoint_get_clear_errors(node: RunningNode, api: Api) -> None:
    before = await settled(node)
    routes = node.node.http.routes
    oversized = b"[" + b" " * MAX_BODY_BYTES + b"]"
    for path, route in routes.items():
        for method in {"GET", "POST", "PUT", "DELETE"} - {route.method}:
            await api.refused(method, path, status=405)
        status, answer = await api.call(route.method, path, raw=oversized)
        assert (status, answer["status"]) == (413, 413), path
        if route.method != "POST":
            continue
        for raw in (b"{not json", b"\xff\xfe{}", b'{"a": 1', b"[]" if route.body == "object" else b"{}"):
            status, answer = await api.call("POST", path, raw=raw)
            # A node-to-node path refuses whatever is not signed with the cluster secret, first.
            expected = 403 if route.peer else 400
            assert status == expected and answer["status"] == expected, (path, raw, answer)
    for path in ("/nope", "/channel/", "/user/token/x", "/CHANNEL", "/"):
        await api.refused("POST", path, {"uid": "x"}, status=404)
    assert proposed(node) == before
    status, answer = await http_json(node.http, "GET", "/health")
    assert (status, answer) == (200, {"status": "ok"})
    assert (await api.send("alice", "bob", 1))["message_seq"] == 1


# -- the cluster -----------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(write_cluster_toml(tmp_path / "cluster.toml", nodes=3, initial=3))
    try:
        yield running
    finally:
        running.stop_all()


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in child processes
async def test_cluster_http_send_and_conversation_state_are_the_same_on_every_node(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    n1, n2, n3 = (Api(cluster.http(n), MANAGER_TOKEN) for n in ("n1", "n2", "n3"))
    async with open_client(*cluster.tcp("n3"), "bob") as bob:
        sent = await n1.send("alice", "bob", 1, b"over the cluster", cmn="cluster-1")
        got = await bob.recv()
        assert (got.message_id, got.message_seq, got.from_uid) == (sent["message_id"], 1, "alice")
        again = await n2.send("alice", "bob", 1, b"retry elsewhere", cmn="cluster-1")
        assert (again["message_id"], again["message_seq"]) == (sent["message_id"], 1)
        for _ in range(2):
            await n2.send("alice", "bob", 1)

    def unread_is(expected: int | None) -> Callable[[dict[str, Any] | None], bool]:
        return lambda row: (
            (row is None) if expected is None else (row is not None and row["unread"] == expected)
        )

    async def seen_by_bob(api: Api, expected: int | None, what: str) -> None:
        await eventually(lambda: api.conversation("bob", "alice", 1), unread_is(expected), what)

    await seen_by_bob(n3, 3, "three unread on n3")
    clear = {"uid": "bob", "channel_id": "alice", "channel_type": 1}
    await n1.post("/conversations/clearUnread", clear)
    # The answer comes once the write is applied on the node that took it: read-your-write there.
    cleared = await n1.conversation("bob", "alice", 1)
    assert cleared is not None and cleared["unread"] == 0
    await seen_by_bob(n3, 0, "clearUnread through n1 seen on n3")
    await n2.post("/conversations/setUnread", {**clear, "unread": 2})
    await seen_by_bob(n3, 2, "setUnread through n2 seen on n3")
    await n3.post("/conversations/delete", clear)
    await seen_by_bob(n1, None, "delete through n3 seen on n1")
    await n2.send("alice", "bob", 1)
    await seen_by_bob(n1, 1, "a new message brings the conversation back")
    expected = await n1.conversations("bob")
    assert len(expected) == 1 and expected[0]["last_msg_seq"] == 4
    for api in (n2, n3):  # the same state, byte for byte, on every node
        await eventually(functools.partial(api.conversations, "bob"), lambda rows: rows == expected, "same")


# -- hostile bodies ---------------------------------------------------------------------------------------
async def test_a_body_the_json_parser_cannot_take_gets_400_and_logs_no_traceback(
    node: RunningNode, api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    before = await settled(node)
    deep = [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000, b"[" * (MAX_BODY_BYTES - 1)]
    for path in ("/user/token", "/user/onlinestatus", "/channel/messagesync"):
        for raw in deep:
            status, answer = await api.call("POST", path, raw=raw)
            assert (status, answer["status"]) == (400, 400), (path, len(raw), answer)
            assert "nested too deeply" in answer["msg"], answer
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert proposed(node) == before
    assert await api.post("/user/systemuids_add", {"uids": ["still-serving"]}) == {"status": 200}


async def test_a_body_dribbled_past_the_time_limit_gets_408_and_a_close(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, http_body_timeout_s=1.0)
    async with running_node(config) as node:
        host, port = node.http.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"uids": ["dribbler"]}).encode()
        head = (
            f"POST /user/systemuids_add HTTP/1.1\r\nHost: {host}\r\ntoken: {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        stream = await trio.open_tcp_stream(host, int(port))
        started = trio.current_time()
        response = b""
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(head.encode())

            async def dribble() -> None:
                # One byte at a time, the last one never: the body stays incomplete as long as it likes.
                for byte in body[:-1]:
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(bytes((byte,)))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            nursery.start_soon(dribble)
            with trio.fail_after(10):  # the dribbler alone would take over 4 s, and then wait forever
                while chunk := await stream.receive_some(65536):
                    response += chunk
            nursery.cancel_scope.cancel()
        assert response.startswith(b"HTTP/1.1 408 "), response
        assert b"request body" in response, response
        assert trio.current_time() - started < 4
        status, _ = await http_json(node.http, "GET", "/health")
        assert status == 200
        with node.node.store.read() as txn:
            assert "dribbler" not in (txn.meta("system_uids") or [])


@pytest.mark.parametrize("value", ["--1", "²", "1_0", "12345678901234567890", " 1"])
async def test_a_query_integer_int_would_refuse_gets_400(node: RunningNode, value: str) -> None:
    from urllib.parse import quote

    path = f"/channel/max_message_seq?channel_id=g1&channel_type={quote(value)}"
    status, body = await http_json(node.http, "GET", path, headers={"token": TOKEN})
    assert status == 400 and "channel_type must be an integer" in body["msg"]
