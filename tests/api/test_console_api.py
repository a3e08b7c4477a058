"""The console's endpoints on a real node (in-process, with a manager token): good input and bad.

The page itself is tested in a browser (tests/console); here are the JSON endpoints it reads and the static
files, with the answers a script would get.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from node.client import ClientError, open_client
from node.wire.protocol import Reason
from tests.api.test_http_api import TOKEN, Api
from tests.conftest import RunningNode, running_node, single_node_config, wait_for

CONSOLE_PATHS = (
    "/admin/stats",
    "/admin/cluster",
    "/admin/cluster/replay",
    "/admin/kick",
    "/admin/channel",
    "/admin/user",
)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    # Every send traced, so the stats' latency columns have data at once.
    config = single_node_config(tmp_path / "n1", manager_token=TOKEN, trace_sample_every=1)
    async with running_node(config) as running:
        yield running


@pytest.fixture
def api(node: RunningNode) -> Api:
    return Api(node.http)


async def raw_get(base: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET without a token; the status, the headers and the body as bytes (the console is not JSON)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def test_the_static_files_are_served_without_the_token(node: RunningNode) -> None:
    for path in ("/console", "/console/"):
        status, headers, body = await raw_get(node.http, path)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert b'<script src="/console/console.js">' in body
    status, headers, body = await raw_get(node.http, "/console/console.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"class ImClient" in body
    status, headers, _ = await raw_get(node.http, "/console/console.css")
    assert status == 200 and headers["content-type"].startswith("text/css")
    # Nothing else under /console/, and no data without the token.
    assert (await raw_get(node.http, "/console/../admin/status"))[0] == 404
    assert (await raw_get(node.http, "/console/secret.txt"))[0] == 404
    for path in CONSOLE_PATHS:
        assert (await raw_get(node.http, path))[0] in (401, 405), path


async def test_the_console_endpoints_are_in_openapi(api: Api) -> None:
    doc = await api.get("/openapi.json")
    for path in CONSOLE_PATHS:
        operation = next(iter(doc["paths"][path].values()))
        assert operation["security"] == [{"managerToken": []}], path
    assert "security" not in doc["paths"]["/console/"]["get"]
    params = {p["name"]: p for p in doc["paths"]["/admin/cluster"]["get"]["parameters"]}
    assert params["path"]["required"] and "/admin/status" in params["path"]["schema"]["description"]


async def test_stats_sample_each_second_and_page_by_time(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:
        for _ in range(5):
            assert (await alice.send("bob", 1, b"hi")).reason_code == Reason.SUCCESS
            await bob.recv()
        await wait_for(lambda: any(row["sends_per_s"] > 0 for row in node.node.stats.samples), 10)
    answer = await api.get("/admin/stats")
    assert answer["node"] == "n1" and answer["status"]["role"] == "leader"
    rows = answer["samples"]
    assert rows and set(rows[-1]) >= {
        "t",
        "sends_per_s",
        "deliveries_per_s",
        "ack_p50_ms",
        "ack_p99_ms",
        "lag",
    }
    busy = [row for row in rows if row["sends_per_s"] > 0]
    assert busy and any(row["ack_p99_ms"] for row in busy)  # the sampled send → SENDACK times
    assert any(row["deliveries_per_s"] > 0 for row in rows)
    newest = int(rows[-1]["t"]) + 1
    assert (await api.get(f"/admin/stats?since={newest}"))["samples"] == []
    for bad in ("since=x", "since=1.5", "since=-"):
        status, answer = await api.call("GET", f"/admin/stats?{bad}")
        assert (status, answer["msg"]) == (400, "since must be an integer"), bad


async def test_the_cluster_fan_out_asks_every_node_read_only_paths_only(api: Api) -> None:
    answer = await api.get("/admin/cluster?path=/admin/status")
    assert answer["asked_by"] == "n1"
    [node] = answer["nodes"]
    assert node["id"] == "n1" and node["ok"] and node["body"]["role"] == "leader"
    answer = await api.get("/admin/cluster?path=/connz&limit=5&uid=nobody")
    assert answer["nodes"][0]["body"]["connections"] == [] and answer["nodes"][0]["body"]["limit"] == 5
    for query, msg in (
        ("path=/admin/members", "path must be one of"),  # a write: never relayed
        ("path=/admin/status/../members", "path must be one of"),
        ("", "path is required"),
        ("path=/connz&uid=a@b", "uid must not contain"),
        ("path=/connz&limit=0", "limit must be an integer in [1, 1000]"),
    ):
        status, refused = await api.call("GET", f"/admin/cluster?{query}")
        assert status == 400 and refused["msg"].startswith(msg), (query, refused)


async def test_kick_closes_one_connection_with_reason_12(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    async with open_client(host, port, "carol") as carol, open_client(host, port, "dave") as dave:
        [conn] = (await api.get("/connz?uid=carol"))["connections"]
        answer = await api.post("/admin/kick", {"id": conn["id"]})
        assert answer == {"node": "n1", "id": conn["id"], "uid": "carol", "kicked": True}
        with pytest.raises(ClientError, match="kicked by an operator"):
            await carol.recv(timeout_s=5)
        assert carol.disconnect_reason == Reason.CONNECT_KICK
        await wait_for(lambda: not node.node.registry.of_uid("carol"), 5)
        assert (await dave.send("carol", 1, b"still here")).reason_code == Reason.SUCCESS
    for body, status, msg in (
        ({"id": conn["id"]}, 404, f"no connection {conn['id']} on n1"),
        ({"id": 123456}, 404, "no connection 123456 on n1"),
        ({"id": 0}, 400, "id must be an integer in [1, "),
        ({"id": "1"}, 400, "id must be an integer"),
        ({}, 400, "id is required"),
        ({"id": 1, "node": "n9"}, 400, "no node named 'n9' (configured: n1)"),
    ):
        got, answer = await api.call("POST", "/admin/kick", body)
        assert got == status and answer["msg"].startswith(msg), (body, answer)


async def test_channel_lookup_shows_the_record_and_lists_or_404(api: Api) -> None:
    group = {"channel_id": "g1", "channel_type": 2}
    await api.post("/channel", {**group, "subscribers": ["alice", "bob"]})
    await api.post("/channel/whitelist_add", {**group, "uids": ["alice"]})
    answer = await api.get("/admin/channel?channel_id=g1&channel_type=2")
    assert answer["channel_id"] == "g1" and answer["last_message_seq"] == 0
    assert sorted(answer["subscribers"]) == ["alice", "bob"] and answer["whitelist"] == ["alice"]
    assert answer["blacklist"] == [] and answer["truncated"] == {
        "subscribers": False,
        "blacklist": False,
        "whitelist": False,
    }
    assert answer["info"]["ban"] == 0
    # A person channel, by the other party with login_uid or by its stored id.
    await api.post(
        "/message/send", {"from_uid": "alice", "channel_id": "bob", "channel_type": 1, "payload": "aGk="}
    )
    by_peer = await api.get("/admin/channel?channel_id=bob&channel_type=1&login_uid=alice")
    by_id = await api.get(f"/admin/channel?channel_id={by_peer['channel_id']}&channel_type=1")
    assert by_peer == by_id and by_id["last_message_seq"] == 1 and "@" in by_id["channel_id"]
    for query, status, msg in (
        ("channel_id=nope&channel_type=2", 404, "no channel 'nope' of type 2"),
        ("channel_id=g1&channel_type=3", 404, "no channel 'g1' of type 3"),
        ("channel_id=bob&channel_type=1", 400, "a person channel is named a@b"),
        ("channel_id=g1&channel_type=0", 400, "channel_type must be an integer in [1, 255]"),
        ("channel_id=g1", 400, "channel_type is required"),
        ("channel_type=2", 400, "channel_id is required"),
        ("channel_id=g1&channel_type=2&login_uid=a@b", 400, "login_uid must not contain"),
    ):
        got, answer = await api.call("GET", f"/admin/channel?{query}")
        assert got == status and answer["msg"].startswith(msg), (query, answer)


async def test_user_lookup_shows_devices_per_node(node: RunningNode, api: Api) -> None:
    host, port = node.tcp
    assert await api.get("/admin/user?uid=erin") == {
        "uid": "erin",
        "online": False,
        "devices": [],
        "token_device_flags": [],
    }
    async with open_client(host, port, "erin", device_flag=1):

        def online() -> bool:
            with node.node.store.read() as txn:
                return bool(txn.presence_of("erin"))

        await wait_for(online, 10, "erin's presence committed")
        answer = await api.get("/admin/user?uid=erin")
        assert answer["online"] and [(d["node"], d["device_flag"]) for d in answer["devices"]] == [("n1", 1)]
    for query, msg in (("", "uid is required"), ("uid=a@b", "uid must not contain")):
        status, answer = await api.call("GET", f"/admin/user?{query}")
        assert status == 400 and answer["msg"].startswith(msg), (query, answer)


async def test_replay_is_asked_of_the_leader(api: Api) -> None:
    answer = await api.post("/admin/cluster/replay", {})
    assert answer == {"leader": "n1", "replayed": 0, "failed": 0, "error": "no webhook configured"}
    status, refused = await api.call("POST", "/admin/cluster/replay", raw=b"[]")
    assert (status, refused["msg"]) == (400, "body must be a JSON object")
    assert json.dumps(answer)  # plain JSON, as the page reads it
