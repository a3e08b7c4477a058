"""Other web pages must not write to a node (issue 19, items 4, 8, 9): a real node with the default setup (no
manager token, token_auth off), probed as a browser on another origin would: forms and no-cors fetches
(`text/plain` bodies), a foreign `Origin`, a foreign `Host` (DNS rebinding), a WebSocket upgrade from another
page; and the security headers and the one HTTP version every answer comes with.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from node.client import open_client
from node.config import ConfigError, load
from node.wire.protocol import Reason
from tests.conftest import RunningNode, running_node, single_node_config

FOREIGN = "http://evil.example"


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


async def exchange(address: str, request: bytes, timeout_s: float = 10) -> bytes:
    """The raw bytes a node answers to `request` on `address` (host:port), until it closes."""
    host, port = address.rsplit(":", 1)
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request)
            received = b""
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return received


async def request(
    node: RunningNode,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    host: str | None = None,
) -> Answer:
    """One HTTP/1.1 request with exactly the headers given (no Content-Type unless asked for)."""
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host if host is not None else node.listening.http}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = await exchange(node.listening.http, ("\r\n".join(head) + "\r\n\r\n").encode() + body)
    header, _, payload = raw.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    is_json = fields.get("content-type") == "application/json"
    return Answer(int(lines[0].split()[1]), fields, json.loads(payload) if is_json else payload.decode())


async def first_bytes(address: str, request: bytes, enough: bytes, timeout_s: float = 5) -> bytes:
    """What arrives for `request` until `enough` is in it, the node closes, or `timeout_s` passes (a
    connection kept open, as HTTP/2 does, is not an error here: the test judges what came)."""
    host, port = address.rsplit(":", 1)
    received = b""
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        with trio.move_on_after(timeout_s):
            while enough not in received and (chunk := await stream.receive_some(65536)):
                received += chunk
    return received


def json_body(value: Any) -> bytes:
    return json.dumps(value).encode()


JSON = {"Content-Type": "application/json"}
SEND = {
    "from_uid": "mallory",
    "channel_id": "bob",
    "channel_type": 1,
    "payload": base64.b64encode(b'{"content":"hi","type":1}').decode(),
}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    """The default setup the issue attacked: no manager token, token_auth off."""
    async with running_node(single_node_config(tmp_path / "n1")) as running:
        yield running


async def stored_messages(node: RunningNode) -> list[Any]:
    body = {"login_uid": "bob", "channel_id": "mallory", "channel_type": 1, "limit": 10}
    answer = await request(node, "POST", "/channel/messagesync", json_body(body), headers=JSON)
    assert answer.status == 200, answer
    return list(answer.body["messages"])


# -- item 4: JSON only ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; b=x",
    ],
)
async def test_a_post_that_is_not_declared_json_is_refused_and_changes_nothing(
    node: RunningNode, content_type: str
) -> None:
    """What a form or a no-cors fetch on another page sends: refused before anything is proposed."""
    proposed = node.node.raft.proposed
    for path, body in (
        ("/message/send", SEND),
        ("/user/token", {"uid": "alice", "token": "chosen-by-the-attacker", "device_flag": 1}),
        ("/channel", {"channel_id": "g1", "channel_type": 2, "subscribers": ["mallory"]}),
    ):
        answer = await request(node, "POST", path, json_body(body), headers={"Content-Type": content_type})
        assert answer.status == 415, (path, answer)
        assert "application/json" in answer.body["msg"] and answer.body["status"] == 415
    # A body without any Content-Type is refused too.
    answer = await request(node, "POST", "/message/send", json_body(SEND))
    assert answer.status == 415, answer
    assert node.node.raft.proposed == proposed
    assert await stored_messages(node) == []


async def test_json_with_a_charset_and_an_empty_body_without_a_type_are_served(node: RunningNode) -> None:
    headers = {"Content-Type": "Application/JSON; charset=utf-8"}
    answer = await request(node, "POST", "/message/send", json_body(SEND), headers=headers)
    assert answer.status == 200, answer
    assert len(await stored_messages(node)) == 1
    # Nothing to mislabel: a bodiless POST without a type (curl -X POST) is served.
    answer = await request(node, "POST", "/admin/deadletters/replay")
    assert answer.status == 200, answer


# -- item 4: Origin ------------------------------------------------------------------------------------------
ISSUE_ROUTES = [
    ("/admin/kick", {"id": 1}),
    ("/admin/members", {"action": "add", "node": "n9"}),
    ("/admin/handlers/state", {"name": "nope", "enabled": 0}),
    ("/admin/deadletters/replay", {}),
    ("/admin/transfer", {"node": "n1"}),
    ("/conn/remove", {"conn_id": 1}),
    ("/user/device_quit", {"uid": "alice", "device_flag": 1}),
    ("/message/send", SEND),
    ("/user/token", {"uid": "alice", "token": "t", "device_flag": 1}),
    ("/channel", {"channel_id": "g1", "channel_type": 2, "subscribers": ["mallory"]}),
]


@pytest.mark.parametrize("origin", [FOREIGN, "null", "http://127.0.0.1.evil.example", "https://localhost"])
async def test_a_foreign_origin_is_refused_on_every_route(node: RunningNode, origin: str) -> None:
    proposed = node.node.raft.proposed
    for path, body in ISSUE_ROUTES:
        answer = await request(node, "POST", path, json_body(body), headers={**JSON, "Origin": origin})
        assert answer.status == 403, (path, answer)
        assert "origin" in answer.body["msg"] and "allowed_origins" in answer.body["msg"], answer
    for path in ("/admin/status", "/admin/deadletters", "/connz", "/admin/cluster?path=/admin/status"):
        answer = await request(node, "GET", path, headers={"Origin": origin})
        assert answer.status == 403, (path, answer)
    assert node.node.raft.proposed == proposed
    assert await stored_messages(node) == []


async def test_the_nodes_own_origin_and_no_origin_are_served(node: RunningNode) -> None:
    port = node.listening.http.rsplit(":", 1)[1]
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):
        headers = {**JSON, **({"Origin": origin} if origin else {})}
        answer = await request(node, "POST", "/message/send", json_body(SEND), headers=headers)
        assert answer.status == 200, (origin, answer)
    # The page's own origin is the Host it was loaded from: a page at http://localhost:port posts with
    # that origin to Host localhost:port.
    answer = await request(
        node,
        "POST",
        "/message/send",
        json_body(SEND),
        headers={**JSON, "Origin": f"http://localhost:{port}"},
        host=f"localhost:{port}",
    )
    assert answer.status == 200, answer
    assert len(await stored_messages(node)) == 4


async def test_allowed_origins_and_allowed_hosts_let_the_listed_in(tmp_path: Path) -> None:
    config = single_node_config(
        tmp_path / "n1",
        allowed_origins=("https://admin.example.com:443",),
        allowed_hosts=("im.example.com",),
    )
    async with running_node(config) as node:
        answer = await request(
            node,
            "POST",
            "/message/send",
            json_body(SEND),
            headers={**JSON, "Origin": "https://admin.example.com"},
        )
        assert answer.status == 200, answer
        answer = await request(node, "GET", "/health", host="im.example.com")
        assert answer.status == 200, answer
        answer = await request(node, "GET", "/health", host="other.example.com")
        assert answer.status == 421, answer


# -- item 4: Host --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["evil.example", "evil.example:5001", "127.0.0.1.nip.io", "10.1.2.3"])
async def test_a_host_the_node_does_not_serve_is_misdirected(node: RunningNode, host: str) -> None:
    """DNS rebinding: a foreign name resolving to the node. 421 Misdirected Request, before any routing."""
    for method, path, body, headers in (
        ("GET", "/admin/status", b"", {}),
        ("GET", "/console/", b"", {}),
        ("POST", "/message/send", json_body(SEND), JSON),
    ):
        answer = await request(node, method, path, body, headers=headers, host=host)
        assert answer.status == 421, (path, answer)
        assert "allowed_hosts" in answer.body["msg"], answer
    assert await stored_messages(node) == []


async def test_the_nodes_own_hosts_are_served(node: RunningNode) -> None:
    port = node.listening.http.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST"):
        answer = await request(node, "GET", "/health", host=host)
        assert answer.status == 200, (host, answer)


# -- item 4: the WebSocket port ------------------------------------------------------------------------------
async def ws_open(node: RunningNode, origin: str | None) -> int:
    """The status a node answers a browser's WebSocket upgrade with (101: accepted)."""
    head = [
        "GET / HTTP/1.1",
        f"Host: {node.listening.ws}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin else []),
    ]
    reply = await first_bytes(node.listening.ws, ("\r\n".join(head) + "\r\n\r\n").encode(), b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 "), reply
    return int(reply.split(b" ", 2)[1])


async def test_a_websocket_from_a_foreign_page_is_refused(node: RunningNode) -> None:
    port = node.listening.http.rsplit(":", 1)[1]
    for origin in (FOREIGN, "null", f"http://evil.example:{port}", f"https://127.0.0.1:{port}"):
        assert await ws_open(node, origin) == 403, origin
    # The console's playground (a page of the node's own HTTP port) and native SDKs (no Origin) connect.
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):
        assert await ws_open(node, origin) == 101, origin
    async with open_client(*node.ws, "alice", websocket=True) as alice:
        assert (await alice.send("bob", 1, b'{"content":"hi"}')).reason_code == Reason.SUCCESS
    assert node.node.gateway.statistics()["ws_origins_refused"] == 4


async def test_ws_allowed_origins_lists_web_apps_and_star_lets_any_page_in(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", ws_allowed_origins=("https://chat.example.com:443",))
    async with running_node(config) as node:
        assert await ws_open(node, "https://chat.example.com") == 101
        assert await ws_open(node, FOREIGN) == 403
    config = single_node_config(tmp_path / "n2", ws_allowed_origins=("*",))
    async with running_node(config) as node:
        assert await ws_open(node, FOREIGN) == 101


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('allowed_origins = ["https://a.example/path"]', "cluster.allowed_origins", "is not an origin"),
        ('allowed_origins = ["*"]', "cluster.allowed_origins", "is not an origin"),
        ('allowed_origins = ["a.example"]', "cluster.allowed_origins", "is not an origin"),
        ('ws_allowed_origins = ["ftp://a.example"]', "cluster.ws_allowed_origins", "is not an origin"),
        ('allowed_hosts = ["http://a.example"]', "cluster.allowed_hosts", "is not a host name"),
        ('allowed_hosts = ["a.example:80"]', "cluster.allowed_hosts", "is not a host name"),
        ('allowed_hosts = "a.example"', "cluster.allowed_hosts", "expected list"),
    ],
)
def test_bad_browser_settings_are_config_errors_naming_the_key(
    tmp_path: Path, line: str, key: str, words: str
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        f"[cluster]\n{line}\n[nodes.n1]\nnumeric_id = 1\n"
        'raft = "127.0.0.1:5301"\ntcp = "127.0.0.1:5101"\nws = "127.0.0.1:5201"\nhttp = "127.0.0.1:5001"\n'
        'data_dir = "d"\n'
    )
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value).startswith(f"cluster.toml: {key}:") and words in str(info.value), info.value


def test_browser_settings_load_in_one_spelling(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[cluster]\nallowed_origins = ["HTTPS://Admin.Example.com"]\nws_allowed_origins = ["*", '
        '"http://10.0.0.5:8080"]\nallowed_hosts = ["IM.example.com", "[::1]"]\n[nodes.n1]\nnumeric_id = 1\n'
        'raft = "127.0.0.1:5301"\ntcp = "127.0.0.1:5101"\nws = "127.0.0.1:5201"\nhttp = "127.0.0.1:5001"\n'
        'data_dir = "d"\n'
    )
    config = load(str(path))
    assert config.allowed_origins == ("https://admin.example.com:443",)
    assert config.ws_allowed_origins == ("*", "http://10.0.0.5:8080")
    assert config.allowed_hosts == ("im.example.com", "::1")


# -- item 8: security headers --------------------------------------------------------------------------------
async def test_every_answer_carries_the_security_headers(node: RunningNode) -> None:
    ws_port = node.ws[1]
    for method, path, body, headers in (
        ("GET", "/console/", b"", {}),
        ("GET", "/console/console.js", b"", {}),
        ("GET", "/health", b"", {}),
        ("GET", "/nope", b"", {}),
        ("POST", "/message/send", b"{", JSON),
    ):
        answer = await request(node, method, path, body, headers=headers)
        got = answer.headers
        assert got.get("x-frame-options") == "DENY", (path, got)
        assert got.get("x-content-type-options") == "nosniff", (path, got)
        assert got.get("referrer-policy") == "no-referrer", (path, got)
        policy = {
            directive.split()[0]: directive.split()[1:]
            for directive in got["content-security-policy"].split(";")
            if directive.strip()
        }
        assert policy["default-src"] == ["'none'"]
        assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
        assert policy["frame-ancestors"] == ["'none'"]
        # The playground's clients reach the cluster's WebSocket ports, and nothing else.
        assert policy["connect-src"] == ["'self'", f"ws://127.0.0.1:{ws_port}"], policy


# -- item 9: HTTP/1.1 only -----------------------------------------------------------------------------------
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame


async def test_http2_prior_knowledge_gets_an_http11_answer(node: RunningNode) -> None:
    reply = await first_bytes(node.listening.http, H2_PREFACE + H2_SETTINGS, b"only")
    assert reply.startswith(b"HTTP/1.1 505 "), reply[:80]
    assert b"HTTP/1.1 only" in reply


async def test_an_h2c_upgrade_is_ignored_and_answered_in_http11(node: RunningNode) -> None:
    upgrade = (
        f"GET /health HTTP/1.1\r\nHost: {node.listening.http}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    ).encode()
    reply = await first_bytes(node.listening.http, upgrade, b'"ok"}')
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
    assert b'{"status":"ok"}' in reply
