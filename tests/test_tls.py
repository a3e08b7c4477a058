"""TLS: the config shape, certificates a test makes (trustme), and real nodes serving TLS TCP, wss and https.

Every certificate here comes from a CA made for the test, so "untrusted" means exactly what it does in a
deployment: a client or a node that was not told about that CA refuses the other side.
"""

from __future__ import annotations

import dataclasses
import ssl
import textwrap
from pathlib import Path

import pytest
import trustme

from node.config import ConfigError, TlsSettings, load

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
