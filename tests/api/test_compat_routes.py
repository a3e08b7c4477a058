"""The WuKongIM routes business servers call besides the basics (issue 14, item 5), on a real node.

Each route with good input and with bad input (a 400 naming the field), and the answers WuKongIM gives for
what is not there (HTTP 200 `{"status": 404}`).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node.client import open_client
from node.config import NodeSpec
from node.wire.protocol import Reason
from raft.commands import person_channel_id
from tests.api.test_http_api import TOKEN, Api
from tests.conftest import RunningNode, running_node, single_node_config, wait_for

TEXT = b'{"content":"hello","type":1}'


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with running_node(single_node_config(tmp_path / "n1", manager_token=TOKEN)) as running:
        yield running


@pytest.fixture
def api(node: RunningNode) -> Api:
    return Api(node.http)


async def group_with_messages(api: Api, channel_id: str, count: int) -> list[dict[str, Any]]:
    await api.post("/channel", {"channel_id": channel_id, "channel_type": 2, "subscribers": ["alice", "bob"]})
    sent = []
    for i in range(count):
        sent.append(await api.send("alice", channel_id, 2, f"m{i}".encode(), cmn=f"{channel_id}-cmn-{i}"))
    return sent


def payload(message: dict[str, Any]) -> bytes:
    return base64.b64decode(message["payload"])


# -- lookups ----------------------------------------------------------------------------------------------
async def test_messages_by_seqs_ids_and_client_msg_nos(api: Api) -> None:
    sent = await group_with_messages(api, "g1", 5)
    answer = await api.post(
        "/messages",
        {
            "channel_id": "g1",
            "channel_type": 2,
            "message_seqs": [2, 4, 99],
            "message_ids": [sent[0]["message_id"], 12345],
            "client_msg_nos": ["g1-cmn-4", "nope"],
        },
    )
    assert [m["message_seq"] for m in answer["messages"]] == [2, 4, 1, 5]  # what is not stored is left out
    assert [payload(m) for m in answer["messages"]] == [b"m1", b"m3", b"m0", b"m4"]
    assert answer["more"] == 0
    # A person channel is named by the other party, as seen by login_uid.
    ack = await api.send("alice", "bob", 1, b"hi bob", cmn="p-1")
    mine = await api.post(
        "/messages", {"login_uid": "bob", "channel_id": "alice", "channel_type": 1, "message_seqs": [1]}
    )
    assert [m["message_id"] for m in mine["messages"]] == [ack["message_id"]]
    assert "login_uid" in await api.refused("POST", "/messages", {"channel_id": "alice", "channel_type": 1})
    assert "channel_id" in await api.refused("POST", "/messages", {"channel_type": 2, "message_seqs": [1]})
    assert "message_seqs" in await api.refused(
        "POST", "/messages", {"channel_id": "g1", "channel_type": 2, "message_seqs": [-1]}
    )
    assert "message_ids" in await api.refused(
        "POST", "/messages", {"channel_id": "g1", "channel_type": 2, "message_ids": "1"}
    )
    assert "client_msg_nos" in await api.refused(
        "POST", "/messages", {"channel_id": "g1", "channel_type": 2, "client_msg_nos": [1]}
    )


async def test_one_message_by_id_or_client_msg_no(api: Api) -> None:
    sent = await group_with_messages(api, "g2", 3)
    by_id = await api.post(
        "/message", {"channel_id": "g2", "channel_type": 2, "message_id": sent[1]["message_id"]}
    )
    assert (by_id["message_seq"], payload(by_id)) == (2, b"m1")
    by_cmn = await api.post("/message", {"channel_id": "g2", "channel_type": 2, "client_msg_no": "g2-cmn-2"})
    assert by_cmn["message_id"] == sent[2]["message_id"]
    missing = await api.post("/message", {"channel_id": "g2", "channel_type": 2, "message_id": 7})
    assert missing["status"] == 404  # WuKongIM: HTTP 200 with status 404
    assert "message_id or client_msg_no" in await api.refused(
        "POST", "/message", {"channel_id": "g2", "channel_type": 2}
    )
    assert "channel_type" in await api.refused("POST", "/message", {"channel_id": "g2", "message_id": 1})
    assert "login_uid" in await api.refused(
        "POST", "/message", {"channel_id": "bob", "channel_type": 1, "message_id": 1}
    )


async def test_message_by_client_msg_no_and_last_message(api: Api) -> None:
    await group_with_messages(api, "g3", 2)
    found = await api.get("/message/byclientmsgno?channel_id=g3&channel_type=2&client_msg_no=g3-cmn-1")
    assert found["message_seq"] == 2
    ack = await api.send("alice", "bob", 1, b"to bob", cmn="p-9")
    stored = person_channel_id("alice", "bob")  # a person channel by its stored id, as WuKongIM
    found = await api.get(f"/message/byclientmsgno?channel_id={stored}&channel_type=1&client_msg_no=p-9")
    assert found["message_id"] == ack["message_id"]
    missing = await api.get("/message/byclientmsgno?channel_id=g3&channel_type=2&client_msg_no=zzz")
    assert missing["status"] == 404
    assert "client_msg_no" in await api.refused("GET", "/message/byclientmsgno?channel_id=g3&channel_type=2")
    assert "channel_type" in await api.refused(
        "GET", "/message/byclientmsgno?channel_id=g3&channel_type=x&client_msg_no=a"
    )

    last = await api.get("/channel/last_message?channel_id=g3&channel_type=2")
    assert (last["message_seq"], payload(last)) == (2, b"m1")
    last = await api.get("/channel/last_message?channel_id=alice&channel_type=1&login_uid=bob")
    assert last["message_id"] == ack["message_id"]
    assert (await api.get("/channel/last_message?channel_id=empty&channel_type=2"))["status"] == 404
    assert "login_uid" in await api.refused("GET", "/channel/last_message?channel_id=alice&channel_type=1")
    assert "channel_id" in await api.refused("GET", "/channel/last_message?channel_type=2")


async def test_conversation_sync_messages(api: Api) -> None:
    await group_with_messages(api, "g4", 6)
    await api.send("bob", "g4", 2, b"bob's", cmn="b-1")  # seq 7: bob's last sent seq
    await api.send("alice", "bob", 1, b"p1", cmn="p-1")
    channels = [
        {"channel_id": "g4", "channel_type": 2, "last_msg_seq": 0},
        {"channel_id": "alice", "channel_type": 1, "last_msg_seq": 0},
        {"channel_id": "nothing", "channel_type": 2, "last_msg_seq": 0},
    ]
    answer = await api.post(
        "/conversation/syncMessages", {"uid": "bob", "channels": channels, "msg_count": 3, "order_by_last": 1}
    )
    by_id = {a["channel_id"]: a for a in answer}
    assert [m["message_seq"] for m in by_id["g4"]["messages"]] == [7, 6, 5]  # the newest, newest first
    assert by_id["g4"]["user_last_msg_seq"] == 7
    assert [payload(m) for m in by_id["alice"]["messages"]] == [b"p1"]
    assert by_id["alice"]["user_last_msg_seq"] == 0
    assert by_id["nothing"]["messages"] == []
    # order_by_last 1 from last_msg_seq 5: (4, last], the newest msg_count; 0: msg_count up from 5.
    channels = [{"channel_id": "g4", "channel_type": 2, "last_msg_seq": 5}]
    [newest] = await api.post(
        "/conversation/syncMessages",
        {"uid": "bob", "channels": channels, "msg_count": 10, "order_by_last": 1},
    )
    assert [m["message_seq"] for m in newest["messages"]] == [7, 6, 5]
    [oldest] = await api.post(
        "/conversation/syncMessages", {"uid": "bob", "channels": channels, "msg_count": 2}
    )
    assert [m["message_seq"] for m in oldest["messages"]] == [5, 6]
    assert "channels" in await api.refused(
        "POST", "/conversation/syncMessages", {"uid": "bob", "channels": {}}
    )
    assert "channel_type" in await api.refused(
        "POST", "/conversation/syncMessages", {"uid": "bob", "channels": [{"channel_id": "g4"}]}
    )
    assert "uid" in await api.refused("POST", "/conversation/syncMessages", {"channels": []})


# -- lists ------------------------------------------------------------------------------------------------
async def test_remove_all_empties_a_list(node: RunningNode, api: Api) -> None:
    await api.post(
        "/channel", {"channel_id": "g5", "channel_type": 2, "subscribers": ["alice", "bob", "carol"]}
    )
    await api.post("/channel/blacklist_add", {"channel_id": "g5", "channel_type": 2, "uids": ["dave"]})
    await api.post("/channel/whitelist_add", {"channel_id": "g5", "channel_type": 2, "uids": ["alice"]})
    for name in ("subscriber", "blacklist", "whitelist"):
        assert await api.post(f"/channel/{name}_remove_all", {"channel_id": "g5", "channel_type": 2}) == {
            "status": 200
        }
    assert await api.get("/channel/whitelist?channel_id=g5&channel_type=2") == []
    async with open_client(*node.tcp, "alice") as alice:
        ack = await alice.send("g5", 2, TEXT)
        assert ack.reason_code == Reason.SUBSCRIBER_NOT_EXIST  # alice is no subscriber any more
    # A user's own lists (person channel named by the user) can be emptied too.
    await api.post("/channel/blacklist_add", {"channel_id": "bob", "channel_type": 1, "uids": ["alice"]})
    await api.post("/channel/blacklist_remove_all", {"channel_id": "bob", "channel_type": 1})
    async with open_client(*node.tcp, "alice") as alice:
        assert (await alice.send("bob", 1, TEXT)).reason_code == Reason.SUCCESS
    assert "channel does not exist" in await api.refused(
        "POST", "/channel/subscriber_remove_all", {"channel_id": "never", "channel_type": 2}
    )
    assert "subscribers" in await api.refused(
        "POST", "/channel/subscriber_remove_all", {"channel_id": "bob", "channel_type": 1}
    )
    assert "channel_type" in await api.refused("POST", "/channel/whitelist_remove_all", {"channel_id": "g5"})


async def test_allow_stranger_lets_a_sender_outside_the_whitelist_write(node: RunningNode, api: Api) -> None:
    await api.post("/channel/whitelist_add", {"channel_id": "bob", "channel_type": 1, "uids": ["alice"]})
    async with open_client(*node.tcp, "carol") as carol, open_client(*node.tcp, "alice") as alice:
        assert (await carol.send("bob", 1, TEXT)).reason_code == Reason.NOT_IN_WHITELIST
        await api.post("/channel/info", {"channel_id": "bob", "channel_type": 1, "allow_stranger": 1})
        assert (await carol.send("bob", 1, TEXT)).reason_code == Reason.SUCCESS
        assert (await alice.send("bob", 1, TEXT)).reason_code == Reason.SUCCESS
        await api.post("/channel/blacklist_add", {"channel_id": "bob", "channel_type": 1, "uids": ["carol"]})
        assert (
            await carol.send("bob", 1, TEXT)
        ).reason_code == Reason.IN_BLACKLIST  # the blacklist still holds
        await api.post("/channel/info", {"channel_id": "bob", "channel_type": 1, "allow_stranger": 0})
        await api.post("/channel/blacklist_remove_all", {"channel_id": "bob", "channel_type": 1})
        assert (await carol.send("bob", 1, TEXT)).reason_code == Reason.NOT_IN_WHITELIST
    assert "allow_stranger" in await api.refused(
        "POST", "/channel", {"channel_id": "g", "channel_type": 2, "allow_stranger": 2}
    )


# -- routes and connections -------------------------------------------------------------------------------
async def test_route_and_route_batch_answer_this_nodes_addresses(node: RunningNode, api: Api) -> None:
    tcp = f"{node.tcp[0]}:{node.tcp[1]}"
    ws = f"ws://{node.ws[0]}:{node.ws[1]}"
    assert await api.get("/route?uid=alice") == {"tcp_addr": tcp, "ws_addr": ws, "wss_addr": ""}
    assert await api.get("/route?intranet=1") == {"tcp_addr": tcp, "ws_addr": "", "wss_addr": ""}
    answer = await api.post("/route/batch", ["alice", "bob"])
    assert answer == [{"tcp_addr": tcp, "ws_addr": ws, "wss_addr": "", "uids": ["alice", "bob"]}]
    assert "uids" in await api.refused("POST", "/route/batch", {"uids": ["a"]})
    assert "intranet" in await api.refused("GET", "/route?intranet=2")


async def test_route_answers_the_configured_external_addresses(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN)
    spec = config.nodes["n1"]
    external = NodeSpec(
        **{
            **spec.__dict__,
            "external_tcp": "im.example.com:15100",
            "external_ws": "ws://im.example.com:15200",
            "external_wss": "wss://im.example.com/ws",
        }
    )
    config = type(config)(**{**config.__dict__, "nodes": {"n1": external}})
    async with running_node(config) as node:
        api = Api(node.http)
        assert await api.get("/route") == {
            "tcp_addr": "im.example.com:15100",
            "ws_addr": "ws://im.example.com:15200",
            "wss_addr": "wss://im.example.com/ws",
        }
        # The bound address stays the intranet one.
        assert (await api.get("/route?intranet=1"))["tcp_addr"] == f"{node.tcp[0]}:{node.tcp[1]}"
        [batch] = await api.post("/route/batch?intranet=0", ["carol"])
        assert batch["tcp_addr"] == "im.example.com:15100" and batch["uids"] == ["carol"]


async def test_conn_kick_sends_disconnect_and_conn_remove_only_closes(node: RunningNode, api: Api) -> None:
    async with (
        open_client(*node.tcp, "alice", device_id="a1") as kicked,
        open_client(*node.tcp, "alice", device_flag=1, device_id="a2") as removed,
    ):
        by_flag = {c.device_flag: c.id for c in node.node.registry.of_uid("alice")}
        assert await api.post("/conn/kick", {"uid": "alice", "conn_id": by_flag[0]}) == {"status": 200}
        with trio.fail_after(5):
            await kicked.disconnected.wait()
        assert kicked.disconnect_reason == Reason.CONNECT_KICK
        await removed.ping()
        assert await api.post("/conn/remove", {"uid": "alice", "conn_id": by_flag[1], "node_id": 1}) == {
            "status": 200
        }
        with trio.fail_after(5):
            await removed.disconnected.wait()
        assert removed.disconnect_reason is None  # closed without DISCONNECT: an SDK reconnects
        await wait_for(lambda: not node.node.registry.of_uid("alice"), 5, "both gone")
    # A connection that is not there (any more), or of another uid: nothing happens, as in WuKongIM.
    assert await api.post("/conn/kick", {"uid": "alice", "conn_id": 999}) == {"status": 200}
    assert "conn_id is 0" in await api.refused("POST", "/conn/kick", {"uid": "alice"})
    assert "no node with numeric id 7" in await api.refused(
        "POST", "/conn/kick", {"conn_id": 1, "node_id": 7}
    )
    assert "node_id" in await api.refused("POST", "/conn/kick", {"conn_id": 1, "node_id": 5000})
