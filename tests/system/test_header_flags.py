"""Header flags, no_persist, commands (sync_once) and temporary channels on one real node (real PySyncObj,
LMDB, sockets; the webhook receiver is a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node.client import open_client
from node.config import WebhookSettings
from node.wire.protocol import (
    FLAG_NO_PERSIST,
    FLAG_RED_DOT,
    FLAG_SYNC_ONCE,
    SETTING_TOPIC,
    Reason,
)
from raft.commands import CHANNEL_TEMP
from tests.cluster.test_webhooks import Receiver
from tests.conftest import RunningNode, http_json, running_node, single_node_config, wait_for

TEXT = b'{"content":"hi","type":1}'


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def post(node: RunningNode, path: str, body: Any, status: int = 200) -> Any:
    got, answer = await http_json(node.http, "POST", path, body)
    assert got == status, (path, body, got, answer)
    return answer


async def api_send(node: RunningNode, **fields: Any) -> Any:
    body = {"from_uid": "", "payload": b64(TEXT), **fields}
    return await post(node, "/message/send", body)


async def wait_online(node: RunningNode, *uids: str) -> None:
    async def online() -> bool:
        answer = await post(node, "/user/onlinestatus", list(uids))
        return {row["uid"] for row in answer if row.get("online")} == set(uids)

    with trio.fail_after(10):
        while not await online():  # noqa: ASYNC110 - presence commits through Raft
            await trio.sleep(0.02)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with running_node(single_node_config(tmp_path / "n1")) as running:
        yield running


# -- the wire --------------------------------------------------------------------------------------------
async def test_recv_carries_the_send_flags_expire_and_topic(node: RunningNode) -> None:
    async with (
        open_client(*node.tcp, "alice", device_flag=0) as alice_app,
        open_client(*node.tcp, "alice", device_flag=1) as alice_web,
        open_client(*node.tcp, "bob") as bob,
    ):
        ack = await alice_app.send("bob", 1, TEXT, flags=FLAG_RED_DOT, expire=60, topic="news")
        assert ack.reason_code == Reason.SUCCESS
        recv = await bob.recv()
        assert recv.flags == FLAG_RED_DOT and recv.expire == 60 and recv.topic == "news"
        assert recv.setting & SETTING_TOPIC and json.loads(recv.payload) == json.loads(TEXT)
        own = await alice_web.recv()  # the sender's other device: no red dot, same expire and topic
        assert own.message_id == ack.message_id and own.flags == 0
        assert (own.expire, own.topic, own.channel_id) == (60, "news", "bob")

        ack = await alice_app.send("bob", 1, TEXT, flags=FLAG_SYNC_ONCE | FLAG_RED_DOT)
        recv = await bob.recv()
        assert recv.flags == FLAG_SYNC_ONCE | FLAG_RED_DOT and recv.message_id == ack.message_id
        assert (await alice_web.recv()).flags == FLAG_SYNC_ONCE

        ack = await alice_app.send("bob", 1, TEXT, flags=FLAG_NO_PERSIST)
        assert ack.reason_code == Reason.SUCCESS and ack.message_seq == 0
        recv = await bob.recv()
        assert recv.flags == FLAG_NO_PERSIST and recv.message_seq == 0

        ack = await alice_app.send("bob", 1, TEXT, flags=0)  # no flag set, none on the RECV
        assert (await bob.recv()).flags == 0


async def test_a_version_2_client_gets_flags_and_topic_without_expire(node: RunningNode) -> None:
    async with (
        open_client(*node.tcp, "alice") as alice,
        open_client(*node.tcp, "bob", version=2) as bob,
    ):
        await alice.send("bob", 1, TEXT, flags=FLAG_RED_DOT, expire=60, topic="t")
        recv = await bob.recv()
        assert recv.flags == FLAG_RED_DOT and recv.topic == "t" and recv.expire == 0  # v2 has no expire


async def test_a_system_sent_recv_shows_an_empty_from_uid(node: RunningNode) -> None:
    async with open_client(*node.tcp, "bob") as bob:
        await wait_online(node, "bob")
        await api_send(node, channel_id="bob", channel_type=1, header={"red_dot": 1})
        recv = await bob.recv()  # the client checked the msg_key, which signs the from_uid
        assert recv.from_uid == "" and recv.flags == FLAG_RED_DOT


async def test_messagesync_shows_the_stored_header_expire_and_topic(node: RunningNode) -> None:
    async with open_client(*node.tcp, "alice") as alice:
        await alice.send("bob", 1, TEXT, flags=FLAG_RED_DOT, expire=9, topic="x")
        await alice.send("bob", 1, TEXT, flags=0)
    answer = await post(
        node, "/channel/messagesync", {"login_uid": "bob", "channel_id": "alice", "channel_type": 1}
    )
    first, second = answer["messages"]
    assert first["header"] == {"no_persist": 0, "red_dot": 1, "sync_once": 0}
    assert (first["expire"], first["topic"]) == (9, "x")
    assert second["header"]["red_dot"] == 0 and "topic" not in second


# -- no_persist ------------------------------------------------------------------------------------------
async def test_no_persist_reaches_online_devices_and_is_stored_nowhere(node: RunningNode) -> None:
    async with open_client(*node.tcp, "bob") as bob:
        await wait_online(node, "bob")
        answer = await api_send(
            node, from_uid="alice", channel_id="bob", channel_type=1, header={"no_persist": 1, "red_dot": 1}
        )
        assert answer["message_seq"] == 0
        recv = await bob.recv()
        assert recv.flags == FLAG_NO_PERSIST | FLAG_RED_DOT and recv.message_id == answer["message_id"]
    sync = await post(
        node, "/channel/messagesync", {"login_uid": "bob", "channel_id": "alice", "channel_type": 1}
    )
    assert sync["messages"] == []
    assert await post(node, "/conversation/sync", {"uid": "bob"}) == []
    assert await post(node, "/conversation/sync", {"uid": "alice"}) == []


# -- commands --------------------------------------------------------------------------------------------
async def test_a_command_reaches_an_offline_user_once_through_message_sync(node: RunningNode) -> None:
    await post(node, "/channel", {"channel_id": "g", "channel_type": 2, "subscribers": ["alice", "bob"]})
    await api_send(node, from_uid="alice", channel_id="g", channel_type=2, header={"red_dot": 1})
    cmd = await api_send(node, from_uid="alice", channel_id="g", channel_type=2, header={"sync_once": 1})
    [message] = await post(node, "/message/sync", {"uid": "bob", "limit": 10})
    assert message["message_id"] == cmd["message_id"] and message["header"]["sync_once"] == 1
    assert message["channel_id"] == "g" and message["channel_type"] == 2
    # Not acknowledged yet: a second sync answers it again.
    assert [m["message_id"] for m in await post(node, "/message/sync", {"uid": "bob"})] == [cmd["message_id"]]
    assert await post(node, "/message/syncack", {"uid": "bob", "last_message_seq": 1}) == {"status": 200}
    assert await post(node, "/message/sync", {"uid": "bob"}) == []
    # The command is in no conversation and counts as nothing unread.
    [conv] = await post(node, "/conversation/sync", {"uid": "bob", "msg_count": 10})
    assert (conv["channel_id"], conv["last_msg_seq"], conv["unread"]) == ("g", 1, 1)
    assert all(m["header"]["sync_once"] == 0 for m in conv["recents"])


async def test_a_system_conversation_is_left_out_of_conversation_sync(node: RunningNode) -> None:
    await api_send(node, channel_id="bob", channel_type=1, header={"red_dot": 1})  # from the system uid
    await api_send(node, from_uid="alice", channel_id="bob", channel_type=1)
    await api_send(node, from_uid="notices", channel_id="bob", channel_type=1, header={"red_dot": 1})
    rows = await post(node, "/conversation/sync", {"uid": "bob"})
    assert sorted((r["channel_id"], r["unread"]) for r in rows) == [("alice", 1), ("notices", 1)]
    # A uid made a system uid (/user/systemuids_add, as TangSengDaoDao does for its notice accounts): its
    # conversation is left out too, and comes back once it is an ordinary uid again.
    await post(node, "/user/systemuids_add", {"uids": ["notices"]})
    rows = await post(node, "/conversation/sync", {"uid": "bob"})
    assert [(r["channel_id"], r["unread"]) for r in rows] == [("alice", 1)]
    await post(node, "/user/systemuids_remove", {"uids": ["notices"]})
    rows = await post(node, "/conversation/sync", {"uid": "bob"})
    assert sorted(r["channel_id"] for r in rows) == ["alice", "notices"]


async def test_subscribers_send_a_command_to_a_temporary_channel(node: RunningNode) -> None:
    async with open_client(*node.tcp, "bob") as bob:
        await wait_online(node, "bob")
        answer = await api_send(node, from_uid="admin", subscribers=["bob", "carol"], header={"sync_once": 1})
        recv = await bob.recv()
        assert recv.message_id == answer["message_id"] and recv.channel_type == CHANNEL_TEMP
        assert recv.flags == FLAG_SYNC_ONCE
    for uid in ("bob", "carol"):
        [message] = await post(node, "/message/sync", {"uid": uid})
        assert message["message_id"] == answer["message_id"] and message["channel_type"] == CHANNEL_TEMP
    assert await post(node, "/message/sync", {"uid": "admin"}) == []
    assert await post(node, "/conversation/sync", {"uid": "carol"}) == []
    # no_persist: pushed only, queued for nobody.
    await api_send(node, subscribers=["carol"], header={"sync_once": 1, "no_persist": 1})
    await post(node, "/message/syncack", {"uid": "carol", "last_message_seq": 1})
    assert await post(node, "/message/sync", {"uid": "carol"}) == []


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        (
            "/message/send",
            {"channel_id": "bob", "channel_type": 1, "header": {"red_dot": 2}},
            "header.red_dot",
        ),
        (
            "/message/send",
            {"channel_id": "bob", "channel_type": 1, "header": {"sync_once": "1"}},
            "header.sync_once",
        ),
        ("/message/send", {"channel_id": "bob", "channel_type": 1, "header": [1]}, "header"),
        ("/message/send", {"subscribers": ["bob"]}, "sync_once"),
        (
            "/message/send",
            {"subscribers": ["bob"], "channel_id": "g", "header": {"sync_once": 1}},
            "channel_id",
        ),
        ("/message/send", {"subscribers": ["a@b"], "header": {"sync_once": 1}}, "subscribers"),
        ("/message/send", {"channel_id": "t", "channel_type": 8, "header": {"sync_once": 1}}, "not_support"),
        ("/message/sync", {}, "uid"),
        ("/message/sync", {"uid": "bob", "limit": -1}, "limit"),
        ("/message/sync", {"uid": "bob", "limit": "5"}, "limit"),
        ("/message/syncack", {"uid": "bob"}, "last_message_seq"),
        ("/message/syncack", {"uid": "bob", "last_message_seq": 0}, "last_message_seq"),
        ("/message/syncack", {"last_message_seq": 3}, "uid"),
    ],
)
async def test_bad_input_gets_400_naming_the_field(
    node: RunningNode, path: str, body: Any, named: str
) -> None:
    if path == "/message/send":
        body = {"payload": b64(TEXT), **body}
    answer = await post(node, path, body, status=400)
    assert named in answer["msg"], answer


async def test_openapi_describes_the_new_routes_and_the_header(node: RunningNode) -> None:
    status, doc = await http_json(node.http, "GET", "/openapi.json")
    assert status == 200
    # Every route issue 14 added, with its method.
    added = {
        "/message/sync": "post",
        "/message/syncack": "post",
        "/messages": "post",
        "/message": "post",
        "/message/byclientmsgno": "get",
        "/channel/last_message": "get",
        "/conversation/syncMessages": "post",
        "/route/batch": "post",
        "/conn/kick": "post",
        "/conn/remove": "post",
        "/channel/subscriber_remove_all": "post",
        "/channel/blacklist_remove_all": "post",
        "/channel/whitelist_remove_all": "post",
    }
    assert {path: list(doc["paths"].get(path, {})) for path in added} == {
        path: [method] for path, method in added.items()
    }
    route = doc["paths"]["/route"]["get"]
    assert "intranet" in {p["name"] for p in route["parameters"]}
    info = doc["paths"]["/channel/info"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "allow_stranger" in info["properties"]
    send = doc["paths"]["/message/send"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(send["properties"]["header"]["properties"]) == {"no_persist", "red_dot", "sync_once"}
    ack = doc["paths"]["/message/syncack"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(ack["required"]) == {"uid", "last_message_seq"}


# -- webhooks --------------------------------------------------------------------------------------------
async def test_webhooks_carry_the_header_and_follow_wukongims_event_rules(tmp_path: Path) -> None:
    receiver = Receiver()
    hook = WebhookSettings(url=receiver.url, backoff_initial_s=0.05, backoff_max_s=0.2, attempts=1000)
    async with trio.open_nursery() as nursery:
        await receiver.up(nursery)
        async with running_node(single_node_config(tmp_path / "n1", webhook=hook)) as node:
            # Wait until the leader published the webhook settings: a send before would write no event.
            marker = await api_send(node, from_uid="alice", channel_id="bob", channel_type=1)
            await wait_for(
                lambda: any(m["message_id"] == marker["message_id"] for m in receiver.notified()), 20
            )
            plain = await api_send(
                node, from_uid="alice", channel_id="bob", channel_type=1, header={"red_dot": 1}
            )
            volatile = await api_send(
                node, from_uid="alice", channel_id="bob", channel_type=1, header={"no_persist": 1}
            )
            cmd = await api_send(
                node, from_uid="alice", channel_id="bob", channel_type=1, header={"sync_once": 1}
            )

            def offline() -> dict[int, Any]:
                return {b["message_id"]: b for e, b, _ in receiver.posts if e == "msg.offline"}

            await wait_for(
                lambda: {plain["message_id"], volatile["message_id"], cmd["message_id"]} <= set(offline()), 20
            )
            await wait_for(lambda: cmd["message_id"] in {m["message_id"] for m in receiver.notified()}, 20)
        nursery.cancel_scope.cancel()
    notified = {m["message_id"]: m for m in receiver.notified()}
    # msg.notify: stored messages only (WuKongIM's toPersistMessages), commands included.
    assert notified[plain["message_id"]]["header"] == {"no_persist": 0, "red_dot": 1, "sync_once": 0}
    assert notified[cmd["message_id"]]["header"]["sync_once"] == 1
    assert volatile["message_id"] not in notified
    # msg.offline: every message with an offline recipient, no_persist and commands too, with its header.
    events = offline()
    assert events[volatile["message_id"]]["header"]["no_persist"] == 1
    assert events[volatile["message_id"]]["to_uids"] == ["bob"]
    assert events[volatile["message_id"]]["message_seq"] == 0
    assert events[cmd["message_id"]]["header"]["sync_once"] == 1 and events[cmd["message_id"]]["to_uids"] == [
        "bob"
    ]
