"""Node-to-node calls on a real cluster: only current members are asked, no call carries the manager token,
and an answer from whatever took over a stopped member's port is refused (signed with the cluster secret)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from node.api import peer_auth
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in child processes


class Impostor:
    """An HTTP server on a stopped member's port: it records what it is sent and claims to lead."""

    def __init__(self, address: str, body: bytes) -> None:
        host, port = address.rsplit(":", 1)
        self.headers: list[dict[str, str]] = []
        record, answer = self.headers, body

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                record.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(write_cluster_toml(tmp_path / "cluster.toml"))  # n4 is configured, never a member
    try:
        yield running
    finally:
        running.stop_all()


async def fan_out(cluster: Cluster, via: str) -> dict[str, dict[str, object]]:
    status, body = await http_json(
        cluster.http(via), "GET", "/admin/cluster?path=/admin/status", headers={"token": MANAGER_TOKEN}
    )
    assert status == 200, body
    return {answer["id"]: answer for answer in body["nodes"]}


@pytest.mark.parametrize("answer_bytes", [0, 8 << 20])
async def test_a_stopped_members_port_gets_no_token_and_its_impostor_is_not_believed(
    cluster: Cluster, answer_bytes: int
) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    answers = await fan_out(cluster, "n1")
    assert set(answers) == {"n1", "n2", "n3"}  # n4 is configured but not a member: never asked
    assert all(answers[m]["ok"] for m in ("n1", "n2", "n3")), answers

    cluster.procs["n3"].terminate()
    await trio.to_thread.run_sync(lambda: cluster.procs["n3"].wait(timeout=20))
    made_up = json.dumps({"role": "leader", "pad": "x" * answer_bytes}).encode()
    impostor = Impostor(cluster.config.node("n3").http, made_up)
    try:
        answers = await fan_out(cluster, "n1")
    finally:
        impostor.close()
    assert impostor.headers, "n3 (a member) was not asked"
    for headers in impostor.headers:
        assert MANAGER_TOKEN not in json.dumps(headers)  # the token never leaves for a peer
        assert headers.get(peer_auth.SIGNATURE_HEADER)  # a signature, useless anywhere else
    assert answers["n3"]["ok"] is False
    expected = "larger than" if answer_bytes else "not signed with the cluster secret"
    assert expected in str(answers["n3"]["error"])
    assert answers["n2"]["ok"] is True  # n2 took n1's signed call without the manager token


async def test_a_request_signed_with_another_secret_is_refused(cluster: Cluster) -> None:
    await trio.to_thread.run_sync(cluster.start_all)
    key = peer_auth.derive_key("another-cluster's-secret-0123456789")
    headers = peer_auth.sign_request(key, "GET", "/admin/status", "n2", "n1", b"")
    status, body = await http_json(cluster.http("n1"), "GET", "/admin/status", headers=headers)
    assert status == 401 and "signature not valid" in body["msg"]
    right = peer_auth.derive_key(cluster.config.secret)
    stale = peer_auth.sign_request(right, "GET", "/admin/status", "n2", "n1", b"")
    stale[peer_auth.TIME_HEADER] = str(int(stale[peer_auth.TIME_HEADER]) - 120)  # the MAC no longer fits
    status, body = await http_json(cluster.http("n1"), "GET", "/admin/status", headers=stale)
    assert status == 401
    for_n3 = peer_auth.sign_request(right, "GET", "/admin/status", "n2", "n3", b"")
    status, body = await http_json(cluster.http("n1"), "GET", "/admin/status", headers=for_n3)
    assert status == 401  # signed for another member: no good here
    odd = {**for_n3, peer_auth.SIGNATURE_HEADER: "\u00e9" * 64}
    status, body = await http_json(cluster.http("n1"), "GET", "/admin/status", headers=odd)
    assert status == 401  # not a 500
    fresh = peer_auth.sign_request(right, "GET", "/admin/status", "n2", "n1", b"")
    status, body = await http_json(cluster.http("n1"), "GET", "/admin/status", headers=fresh)
    assert status == 200 and body["id"] == "n1"
