"""WuKongIM's official Python EasySDK (`wukong-easy-sdk`: JSON-RPC over WebSocket) on a real 3-node cluster.

The SDK runs as shipped: on asyncio, in a thread of its own (`SdkLoop`), while the test, the binary client
and the cluster's HTTP API stay on trio. Every shape the node sends is parsed by the SDK's own checks (it
drops the connection on any it cannot parse), so each test below also proves the shapes it meets.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
from wukong_easy_sdk import WKIMEvent

from node.client import open_client
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json, wait_for
from tests.easysdk_harness import Sdk, SdkLoop

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path = tmp_path_factory.mktemp("easysdk") / "cluster.toml"
    running = Cluster(write_cluster_toml(path, nodes=3, initial=3))
    try:
        running.start_all()
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def sdk_loop() -> Iterator[SdkLoop]:
    loop = SdkLoop()
    yield loop
    loop.close()


def ws_url(cluster: Cluster, node_id: str) -> str:
    return f"ws://{cluster.config.node(node_id).ws}"


async def until(probe: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not await probe():  # noqa: ASYNC110 - state of other processes, polled over HTTP
            await trio.sleep(0.05)


async def api(cluster: Cluster, node_id: str, method: str, path: str, body: Any = None) -> Any:
    status, answer = await http_json(
        cluster.http(node_id), method, path, body, headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, (node_id, path, body, status, answer)
    return answer


async def test_sdk_talks_with_a_binary_client_on_another_node(cluster: Cluster, sdk_loop: SdkLoop) -> None:
    alice = Sdk(sdk_loop, ws_url(cluster, "n1"), "alice")
    try:
        connected = await alice.connect()
        assert connected["reasonCode"] == 1 and connected["nodeId"] == 1
        async with open_client(*cluster.tcp("n2"), "bob") as bob:
            sent = await alice.send("bob", {"type": 1, "content": "hi bob"})
            assert sent["reasonCode"] == 1 and int(sent["messageId"]) > 0 and sent["messageSeq"] >= 1
            got = await bob.recv(timeout_s=15)
            assert (got.from_uid, json.loads(got.payload)) == ("alice", {"type": 1, "content": "hi bob"})
            assert got.message_id == int(sent["messageId"])

            await bob.send("alice", 1, json.dumps({"type": 1, "content": "hi alice"}).encode())
            await wait_for(lambda: bool(alice.of(WKIMEvent.MESSAGE)), 15, "alice's message event")
            message = alice.of(WKIMEvent.MESSAGE)[0]
            assert message["payload"] == {"type": 1, "content": "hi alice"}
            assert (message["fromUid"], message["channelId"], message["channelType"]) == ("bob", "bob", 1)
            assert message["header"] == {"redDot": True}
            await alice.loop.run(alice.client.ping)  # the SDK insists on `"result": null` in the answer

            # The SDK's recvack reached the node: nothing is left awaiting one (else it would be resent).
            async def all_acked() -> bool:
                rows = (await api(cluster, "n1", "GET", "/connz?uid=alice"))["connections"]
                assert [row["protocol"] for row in rows] == ["jsonrpc"]
                return rows[0]["inflight_recvs"] == 0

            await until(all_acked, "alice's recvack")
        assert not alice.of(WKIMEvent.ERROR), alice.of(WKIMEvent.ERROR)
    finally:
        await alice.destroy()


async def test_sdk_offline_then_catches_up_over_http(cluster: Cluster, sdk_loop: SdkLoop) -> None:
    carol = Sdk(sdk_loop, ws_url(cluster, "n2"), "carol")
    await carol.connect()
    await carol.destroy()

    async def carol_offline() -> bool:
        rows = await api(cluster, "n1", "POST", "/user/onlinestatus", ["carol"])
        return not any(row.get("online") for row in rows)

    await until(carol_offline, "carol offline")
    async with open_client(*cluster.tcp("n1"), "dan") as dan:
        ack = await dan.send("carol", 1, json.dumps({"type": 1, "content": "while you were out"}).encode())
        assert ack.reason_code == 1
    carol = Sdk(sdk_loop, ws_url(cluster, "n3"), "carol")
    try:
        await carol.connect()
        conversations = await api(cluster, "n3", "POST", "/conversation/sync", {"uid": "carol"})
        assert any(c["channel_id"] == "dan" for c in conversations), conversations
        history = await api(
            cluster,
            "n3",
            "POST",
            "/channel/messagesync",
            {"login_uid": "carol", "channel_id": "dan", "channel_type": 1, "limit": 10},
        )
        payloads = [json.loads(base64.b64decode(m["payload"])) for m in history["messages"]]
        assert payloads == [{"type": 1, "content": "while you were out"}]
        assert not carol.of(WKIMEvent.MESSAGE)  # offline messages are synced, not pushed, as in WuKongIM
    finally:
        await carol.destroy()


async def test_kick_reaches_the_sdk_as_a_disconnect(cluster: Cluster, sdk_loop: SdkLoop) -> None:
    erin = Sdk(sdk_loop, ws_url(cluster, "n3"), "erin")
    try:
        await erin.connect()
        rows = (await api(cluster, "n3", "GET", "/connz?uid=erin"))["connections"]
        assert [(row["protocol"], row["proxy_type_format"]) for row in rows] == [("jsonrpc", "ws")]
        # Asked of n1, carried out by n3, which holds the connection.
        await api(
            cluster, "n1", "POST", "/conn/kick", {"uid": "erin", "conn_id": rows[0]["id"], "node_id": 3}
        )
        await wait_for(lambda: bool(erin.of(WKIMEvent.DISCONNECT)), 10, "erin's disconnect event")
        assert erin.of(WKIMEvent.DISCONNECT) == [{"reasonCode": 12}]  # CONNECT_KICK
        assert not erin.client.is_connected
        assert not erin.of(WKIMEvent.RECONNECTING)  # a kick is final: the SDK does not come back
    finally:
        await erin.destroy()


async def test_sdk_reconnects_after_its_node_restarts(cluster: Cluster, sdk_loop: SdkLoop) -> None:
    frank = Sdk(sdk_loop, ws_url(cluster, "n3"), "frank")
    try:
        await frank.connect()
        await trio.to_thread.run_sync(cluster.kill9, "n3")
        await wait_for(lambda: bool(frank.of(WKIMEvent.RECONNECTING)), 10, "frank reconnecting")
        cluster.start("n3")
        await trio.to_thread.run_sync(cluster.wait_serving, "n3")
        await wait_for(lambda: len(frank.of(WKIMEvent.CONNECT)) == 2, 30, "frank connected again")
        async with open_client(*cluster.tcp("n1"), "gina") as gina:
            sent = await frank.send("gina", {"type": 1, "content": "back again"})
            assert sent["reasonCode"] == 1
            got = await gina.recv(timeout_s=15)
            assert json.loads(got.payload) == {"type": 1, "content": "back again"}
    finally:
        await frank.destroy()
