"""TLS: the config shape, certificates a test makes (trustme), and real nodes serving TLS TCP, wss and https.

Every certificate here comes from a CA made for the test, so "untrusted" means exactly what it does in a
deployment: a client or a node that was not told about that CA refuses the other side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from node.client import ClientError, open_client
from node.config import Config, ConfigError, TlsSettings, WebhookSettings, load
from node.server import Node
from node.wire.protocol import Reason
from raft import outbox
from tests.cluster.test_webhooks import Receiver
from tests.conftest import REPO, NodeProcess, free_port, running_node, single_node_config, wait_for

FILE = "cluster.toml"

NODE_1 = """
[nodes.n1]
numeric_id = 1
raft = "127.0.0.1:5301"
tcp = "127.0.0.1:5101"
ws = "127.0.0.1:5201"
http = "127.0.0.1:5001"
data_dir = "data/n1"
"""


@dataclasses.dataclass(frozen=True)
class Certs:
    """PEM files of a CA and of a server certificate it issued for 127.0.0.1 and localhost."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    certs = Certs(ca, directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(certs.ca_file))
    for i, pem in enumerate(server.cert_chain_pems):
        pem.write_to_path(str(certs.cert_file), append=i > 0)
    server.private_key_pem.write_to_path(str(certs.key_file))
    return certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / FILE
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    return str(info.value)


# -- the config shape --------------------------------------------------------------------------------------
def test_tls_is_off_by_default() -> None:
    config = load(None)
    assert config.tls == TlsSettings() and not config.tls.cert_file and not config.tls.http
    assert (config.node("n1").tcp_tls, config.node("n1").wss) == ("", "")
    assert config.webhook.ca_file == ""


def test_a_tls_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    text = (
        NODE_1
        + 'tcp_tls = "127.0.0.1:5111"\nwss = "127.0.0.1:5211"\n'
        + '[tls]\ncert_file = "certs/server.pem"\nkey_file = "/etc/imnode/server.key"\n'
        + 'http = true\nca_file = "certs/ca.pem"\n'
        + '[webhook]\nurl = "https://hooks.example:8443/in"\nca_file = "hooks-ca.pem"\n'
    )
    config = load(write(tmp_path, text))
    n1 = config.node("n1")
    assert (n1.tcp_tls, n1.wss) == ("127.0.0.1:5111", "127.0.0.1:5211")
    assert config.tls == TlsSettings(
        cert_file=str(tmp_path / "certs" / "server.pem"),
        key_file="/etc/imnode/server.key",
        http=True,
        ca_file=str(tmp_path / "certs" / "ca.pem"),
    )
    assert config.webhook.url == "https://hooks.example:8443/in"
    assert config.webhook.ca_file == str(tmp_path / "hooks-ca.pem")


CERT = '[tls]\ncert_file = "s.pem"\nkey_file = "s.key"\n'


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (NODE_1 + CERT + "certfile = 'x'\n", "tls.certfile", "unknown key"),
        (NODE_1 + CERT + "http = 'yes'\n", "tls.http", "expected bool"),
        (NODE_1 + 'wss = "127.0.0.1:5211"\n', "tls.cert_file", "missing (nodes.n1.wss serves TLS)"),
        (NODE_1 + 'tcp_tls = "127.0.0.1:5111"\n', "tls.cert_file", "missing (nodes.n1.tcp_tls serves"),
        (NODE_1 + "[tls]\nhttp = true\n", "tls.cert_file", "missing (tls.http serves TLS)"),
        (NODE_1 + '[tls]\nhttp = true\ncert_file = "s.pem"\n', "tls.key_file", "missing"),
        (NODE_1 + CERT, "tls", "no TLS listener uses it"),
        (NODE_1 + CERT + 'wss = "127.0.0.1:1"\n', "tls.wss", "unknown key"),
        (NODE_1 + '[tls]\nhttp = true\ncert_file = ""\nkey_file = "k"\n', "tls.cert_file", "empty"),
        (NODE_1 + 'wss = "127.0.0.1:1"\n' + CERT + 'ca_file = "ca.pem"\n', "tls.ca_file", "tls.http = false"),
        (NODE_1 + 'wss = "nope"\n' + CERT, "nodes.n1.wss", "not host:port"),
        (NODE_1 + 'wss = "127.0.0.1:5201"\n' + CERT, "nodes.n1.wss", "already used by nodes.n1.ws"),
        (NODE_1 + 'tcp_tls = "127.0.0.1:5101"\n' + CERT, "nodes.n1.tcp_tls", "already used by nodes.n1.tcp"),
        (NODE_1 + '[webhook]\nurl = "ftp://x/"\n', "webhook.url", "http:// or https://"),
        (NODE_1 + '[webhook]\nurl = "http://x/"\nca_file = "ca.pem"\n', "webhook.ca_file", "https://"),
    ],
)
def test_tls_config_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    message = load_error(tmp_path, text)
    assert message.startswith(f"{FILE}: {key}:"), message
    assert words in message, message


# -- a bad certificate stops the start ---------------------------------------------------------------------
def tls_node_config(data_dir: Path, certs: Certs, **tls: object) -> Config:
    """One in-process node with every TLS listener on a port of its own (0: chosen at bind)."""
    base = single_node_config(data_dir)
    spec = dataclasses.replace(base.nodes["n1"], tcp_tls="127.0.0.1:0", wss="127.0.0.1:0")
    settings = {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file), "http": True, **tls}
    return dataclasses.replace(base, nodes={"n1": spec}, tls=TlsSettings(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"cert_file": "/nonexistent/server.pem"}, "tls.cert_file: cannot read /nonexistent/server.pem"),
        ({"key_file": "/nonexistent/server.key"}, "tls.key_file: cannot read /nonexistent/server.key"),
        ({"cert_file": "KEY"}, "tls.cert_file, tls.key_file: not a PEM certificate"),
        ({"key_file": "OTHER_KEY"}, "tls.cert_file, tls.key_file: not a PEM certificate"),
    ],
)
def test_a_bad_certificate_is_a_config_error_before_anything_opens(
    tmp_path: Path, certs: Certs, change: dict[str, str], words: str
) -> None:
    other = make_certs(tmp_path / "other")
    paths = {"KEY": str(certs.key_file), "OTHER_KEY": str(other.key_file)}
    change = {k: paths.get(v, v) for k, v in change.items()}
    data_dir = tmp_path / "n1"
    with pytest.raises(ConfigError, match=words):
        Node(tls_node_config(data_dir, certs, **change), "n1")
    assert not data_dir.exists()  # refused before the store (or anything else) was opened


def test_node_start_with_a_missing_certificate_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(5)]
    config = tmp_path / "node.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [nodes.n1]
            numeric_id = 1
            raft = "127.0.0.1:{ports[0]}"
            tcp = "127.0.0.1:{ports[1]}"
            ws = "127.0.0.1:{ports[2]}"
            wss = "127.0.0.1:{ports[3]}"
            http = "127.0.0.1:{ports[4]}"
            data_dir = "data"

            [tls]
            cert_file = "missing.pem"
            key_file = "missing.key"
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "node.tools.cli", "node", "start", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"node.toml: tls.cert_file: cannot read {tmp_path / 'missing.pem'}" in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()


# -- clients over TLS TCP and wss -------------------------------------------------------------------------
def split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def test_clients_over_tls_tcp_and_wss_send_and_receive(tmp_path: Path, certs: Certs) -> None:
    async with running_node(tls_node_config(tmp_path / "n1", certs)) as node:
        listening = node.listening
        trust = certs.client_context()
        async with (
            open_client(*split(listening.tcp_tls), "alice", ssl_context=trust) as alice,
            open_client(*split(listening.wss), "bob", websocket=True, ssl_context=trust) as bob,
            open_client(*node.tcp, "carol") as carol,  # the plain port serves on beside the TLS ones
        ):
            for sender, recipient, text in (
                (alice, bob, b"tls"),
                (bob, alice, b"wss"),
                (carol, alice, b"tcp"),
            ):
                ack = await sender.send(recipient.uid, 1, b'{"content":"' + text + b'"}')
                assert ack.reason_code == Reason.SUCCESS
                recv = await recipient.recv()
                assert (recv.from_uid, recv.payload) == (sender.uid, b'{"content":"' + text + b'"}')
            async with httpx.AsyncClient(verify=trust, timeout=10) as https:
                connz = (await https.get(f"https://{listening.http}/connz")).json()
            kinds = {c["uid"]: c["proxy_type_format"] for c in connz["connections"]}
            assert kinds == {"alice": "tls", "bob": "wss", "carol": "tcp"}


async def test_tls_listeners_refuse_untrusted_and_plain_clients(tmp_path: Path, certs: Certs) -> None:
    async with running_node(tls_node_config(tmp_path / "n1", certs)) as node:
        listening = node.listening
        system_only = ssl.create_default_context()  # does not know the test's CA
        with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"):
            async with open_client(*split(listening.tcp_tls), "eve", ssl_context=system_only):
                pass
        with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"):
            async with open_client(*split(listening.wss), "eve", websocket=True, ssl_context=system_only):
                pass
        # A client that skips TLS gets no CONNACK from a TLS port: its CONNECT is not a TLS handshake,
        # and the node closes the connection.
        with pytest.raises(ClientError, match="closed the connection before CONNACK"):
            async with open_client(*split(listening.tcp_tls), "eve"):
                pass
        # (trio-websocket waits for an upgrade answer that never comes: the client's timeout ends it.)
        with pytest.raises(ClientError):
            async with open_client(*split(listening.wss), "eve", websocket=True, timeout_s=1):
                pass
        # None of that disturbed the listeners.
        trust = certs.client_context()
        async with open_client(*split(listening.tcp_tls), "alice", ssl_context=trust) as alice:
            await alice.ping()


def chain_text(exc: BaseException) -> str:
    """Every message of an exception chain (httpx on trio hides the ssl error two causes down)."""
    parts: list[str] = []
    found: BaseException | None = exc
    while found is not None and len(parts) < 10:
        parts.append(repr(found))
        found = found.__cause__ or found.__context__
    return " <- ".join(parts)


# -- the HTTP API over https -------------------------------------------------------------------------------
async def plain_exchange(address: str, request: bytes) -> bytes:
    """What a plain-text HTTP client gets back from `address` (b"" if the connection just ends)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*split(address))
        async with stream:
            await stream.send_all(request)
            received = b""
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # reset by the server
    return received


async def test_http_api_over_https_answers_trusted_clients_only(tmp_path: Path, certs: Certs) -> None:
    async with running_node(tls_node_config(tmp_path / "n1", certs)) as node:
        listening = node.listening
        base = f"https://{listening.http}"
        async with httpx.AsyncClient(verify=certs.client_context(), timeout=10) as https:
            answer = await https.get(f"{base}/health")
            assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
            # /route names the TLS addresses next to the plain ones, wss with its scheme as in WuKongIM.
            assert (await https.get(f"{base}/route")).json() == {
                "tcp_addr": listening.tcp,
                "ws_addr": f"ws://{listening.ws}",
                "wss_addr": f"wss://{listening.wss}",
                "tcp_tls_addr": listening.tcp_tls,
            }
            created = await https.post(
                f"{base}/channel", json={"channel_id": "g1", "channel_type": 2, "subscribers": ["a", "b"]}
            )
            assert created.status_code == 200, created.text
        # A client that does not know the CA refuses the node.
        async with httpx.AsyncClient(timeout=10) as untrusting:
            with pytest.raises(httpx.ConnectError) as refused:
                await untrusting.get(f"{base}/health")
            assert "CERTIFICATE_VERIFY_FAILED" in chain_text(refused.value)
        # Plain HTTP on the https port gets no HTTP answer, and the node serves on.
        reply = await plain_exchange(listening.http, b"GET /health HTTP/1.1\r\nHost: n1\r\n\r\n")
        assert not reply.startswith(b"HTTP/"), reply
        async with httpx.AsyncClient(verify=certs.client_context(), timeout=10) as https:
            assert (await https.get(f"{base}/health")).status_code == 200


def test_admin_commands_reach_an_https_node_with_tls_ca_file(tmp_path: Path, certs: Certs) -> None:
    ports = [free_port() for _ in range(6)]
    config = tmp_path / "node.toml"
    body = f"""
        [cluster]
        manager_token = "tls-admin-t0ken-0123"

        [nodes.n1]
        numeric_id = 1
        raft = "127.0.0.1:{ports[0]}"
        tcp = "127.0.0.1:{ports[1]}"
        ws = "127.0.0.1:{ports[2]}"
        http = "127.0.0.1:{ports[3]}"
        tcp_tls = "127.0.0.1:{ports[4]}"
        wss = "127.0.0.1:{ports[5]}"
        data_dir = "data"

        [tls]
        cert_file = "{certs.cert_file}"
        key_file = "{certs.key_file}"
        http = true
        """
    config.write_text(textwrap.dedent(body + f'ca_file = "{certs.ca_file}"\n'))
    without_ca = tmp_path / "without-ca.toml"
    without_ca.write_text(textwrap.dedent(body))
    proc = NodeProcess(config, tmp_path / "node.log")
    try:
        proc.start()
        started = (tmp_path / "node.log").read_text()
        assert f"https://127.0.0.1:{ports[3]}" in started and f"wss wss://127.0.0.1:{ports[5]}" in started

        def admin_status(path: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "node.tools.cli", "admin", "status", "--config", str(path)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )

        status = admin_status(config)
        assert status.returncode == 0 and "leader n1" in status.stdout, status.stdout + status.stderr
        # Without the CA the command cannot check the node's certificate, so it does not talk to it.
        status = admin_status(without_ca)
        assert "leader (none)" in status.stdout and "down" in status.stdout, status.stdout + status.stderr
    finally:
        proc.stop()


# -- webhooks to https -------------------------------------------------------------------------------------
@dataclasses.dataclass
class HttpsReceiver(Receiver):
    """test_webhooks' receiver behind TLS, with a certificate from a CA of its own."""

    ssl_context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.ssl_context is not None
        with trio.CancelScope() as scope:
            self._scope = scope
            tcp = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            listeners = [trio.SSLListener(t, self.ssl_context, https_compatible=True) for t in tcp]
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle_tls, listeners, handler_nursery=nursery)

    async def _handle_tls(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # a client that refused our certificate
            await self._handle(stream)  # type: ignore[arg-type]


@pytest.mark.parametrize("ca", ["receiver", "none", "other"])
async def test_webhooks_reach_an_https_receiver_only_with_its_ca(
    tmp_path: Path, certs: Certs, ca: str
) -> None:
    hooks = make_certs(tmp_path / "hooks")  # the receiver's own CA: unknown to the system's trust store
    receiver = HttpsReceiver(ssl_context=hooks.server_context())
    # webhook.ca_file replaces the trust store: the nodes' own CA ("other") does not vouch for the receiver.
    ca_file = {"receiver": str(hooks.ca_file), "none": "", "other": str(certs.ca_file)}[ca]
    webhook = WebhookSettings(
        url=receiver.url, events=("msg.notify",), attempts=2, backoff_initial_s=0.05, ca_file=ca_file
    )
    config = dataclasses.replace(single_node_config(tmp_path / "n1"), webhook=webhook)
    async with trio.open_nursery() as nursery:
        await receiver.up(nursery)
        async with running_node(config) as node, open_client(*node.tcp, "alice") as alice:
            acks = await alice.send_many([("bob", 1, f"m{i}".encode()) for i in range(3)])
            assert all(a.reason_code == Reason.SUCCESS for a in acks)
            sent = sorted(a.message_id for a in acks)
            state = node.node.webhooks.streams["notify"]
            if ca == "receiver":
                await wait_for(lambda: len(receiver.notified()) >= 3, 30, "delivered over https")
                assert sorted(m["message_id"] for m in receiver.notified()) == sent
                assert (state.delivered, state.dead_lettered) == (3, 0)
            else:
                # Never posted: each attempt failed the certificate check and counted as a failure, and
                # after `attempts` the events went to the dead letters like those of any failing receiver.
                await wait_for(lambda: state.dead_lettered >= 3, 30, "dead-lettered")
                assert receiver.posts == [] and state.delivered == 0
                with node.node.store.read() as txn:
                    letters = outbox.deadletters(txn)
                assert [(stream, v["attempts"]) for stream, _seq, v in letters] == [("notify", 2)] * 3
                assert all("CERTIFICATE_VERIFY_FAILED" in v["error"] for _s, _q, v in letters), letters
        nursery.cancel_scope.cancel()


def test_a_missing_webhook_ca_file_is_a_config_error_before_anything_opens(tmp_path: Path) -> None:
    webhook = WebhookSettings(url="https://127.0.0.1:1/hook", ca_file=str(tmp_path / "absent.pem"))
    config = dataclasses.replace(single_node_config(tmp_path / "n1"), webhook=webhook)
    with pytest.raises(ConfigError, match=r"webhook\.ca_file: cannot read .*absent\.pem"):
        Node(config, "n1")


# -- the wss port refuses what is not a TLS 1.2+ handshake at once, as tcp_tls does -------------------------
async def closed_within(address: str, hello: bytes, limit_s: float) -> float:
    """Seconds until the node closes a connection that sent `hello` (fails past `limit_s`)."""
    started = trio.current_time()
    with trio.fail_after(limit_s):
        stream = await trio.open_tcp_stream(*split(address))
        async with stream:
            await stream.send_all(hello)
            try:
                while await stream.receive_some(65536):
                    pass  # a TLS alert, then the close
            except trio.BrokenResourceError:
                pass  # reset by the node: closed all the same
    return trio.current_time() - started


def tls10_client_hello() -> bytes:
    """The first flight of a client that speaks TLS 1.0 at most (what an old SDK or a scanner sends)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point: an old version
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    assert hello[:3] == b"\x16\x03\x01" and hello[9:11] == b"\x03\x01", hello[:12]  # ClientHello, TLS 1.0
    return hello


@pytest.mark.parametrize(
    "hello",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", id="plain-upgrade"),
        pytest.param(b"\x00\x00\x00\x00 not tls at all", id="plain-bytes"),
        pytest.param(None, id="tls-1.0-client-hello"),
    ],
)
async def test_wss_closes_a_handshake_that_is_not_tls12_at_once_as_tcp_tls_does(
    tmp_path: Path, certs: Certs, hello: bytes | None
) -> None:
    config = tls_node_config(tmp_path / "n1", certs)
    # A connect timeout far above "at once": the node must not wait for it.
    config = dataclasses.replace(config, tuning=dataclasses.replace(config.tuning, connect_timeout_s=30.0))
    first = hello if hello is not None else tls10_client_hello()
    async with running_node(config) as node:
        listening = node.listening
        assert await closed_within(listening.tcp_tls, first, 5) < 2
        assert await closed_within(listening.wss, first, 5) < 2
        # The listener serves on.
        trust = certs.client_context()
        async with open_client(*split(listening.wss), "alice", websocket=True, ssl_context=trust) as alice:
            await alice.ping()


async def test_the_https_listener_answers_an_http2_preface_in_http11(tmp_path: Path, certs: Certs) -> None:
    """ALPN picks http/1.1, but Hypercorn would still switch on a prior-knowledge preface inside TLS."""
    async with running_node(tls_node_config(tmp_path / "n1", certs)) as node:
        context = certs.client_context()
        context.set_alpn_protocols(["http/1.1"])
        with trio.fail_after(10):
            raw = await trio.open_tcp_stream(*split(node.listening.http))
            stream = trio.SSLStream(raw, context, server_hostname="127.0.0.1")
            async with stream:
                await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                reply = b""
                with trio.move_on_after(5):  # HTTP/2 would keep the connection open
                    while b"only" not in reply and (chunk := await stream.receive_some(65536)):
                        reply += chunk
        assert reply.startswith(b"HTTP/1.1 505 "), reply[:80]
