"""node/config.py: defaults, a valid cluster file, and errors that name the file and the key."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from node.config import DEFAULT_NODE_ID, Config, ConfigError, NodeSpec, Tuning, load
from raft.secret import SECRET_FILE, SecretError, local_secret, read_secret_file
from tests.conftest import REPO

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

NODE_2 = """
[nodes.n2]
numeric_id = 2
raft = "127.0.0.1:5302"
tcp = "127.0.0.1:5102"
ws = "127.0.0.1:5202"
http = "127.0.0.1:5002"
data_dir = "data/n2"
"""

VALID = (
    """
[cluster]
name = "test-cluster"
manager_token = "a-manager-token-of-some-length"
secret = "a-cluster-secret-of-some-length"
encryption = false
token_auth = true
initial_members = ["n1", "n2"]

[tuning]
user_pool_shards = 2
handler_timeout_s = 3
batch_window_ms = 1.5
"""
    + NODE_1
    + NODE_2
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / FILE
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith(f"{FILE}: "), message
    return message


def test_load_none_gives_single_node_defaults() -> None:
    config = load(None)
    assert config == Config()
    assert config.source == "<defaults>"
    assert config.initial_members == (DEFAULT_NODE_ID,)
    assert config.node(DEFAULT_NODE_ID) == NodeSpec()
    assert config.partners(DEFAULT_NODE_ID) == ()
    assert config.tuning == Tuning()
    assert config.encryption is True and config.token_auth is False
    with pytest.raises(ConfigError, match="no node 'n9'"):
        config.node("n9")


def test_a_valid_file_loads(tmp_path: Path) -> None:
    config = load(write(tmp_path, VALID))
    assert config.source == FILE
    assert config.cluster_name == "test-cluster"
    assert config.manager_token == "a-manager-token-of-some-length"
    assert (config.secret, config.secret_file) == ("a-cluster-secret-of-some-length", "")
    assert (config.encryption, config.token_auth) == (False, True)
    assert config.initial_members == ("n1", "n2")
    assert set(config.nodes) == {"n1", "n2"}
    n2 = config.node("n2")
    assert (n2.id, n2.numeric_id, n2.tcp, n2.http) == ("n2", 2, "127.0.0.1:5102", "127.0.0.1:5002")
    # A relative data_dir is relative to the file, not to the working directory.
    assert n2.data_dir == os.path.join(str(tmp_path), "data", "n2")
    assert config.partners("n1") == ("127.0.0.1:5302",)
    assert config.tuning.user_pool_shards == 2
    assert config.tuning.handler_timeout_s == 3.0 and isinstance(config.tuning.handler_timeout_s, float)
    assert config.tuning.batch_window_ms == 1.5
    assert config.tuning.channel_pool_shards == Tuning().channel_pool_shards


def test_initial_members_default_to_every_node(tmp_path: Path) -> None:
    config = load(write(tmp_path, NODE_1 + NODE_2))
    assert config.initial_members == ("n1", "n2")
    assert config.cluster_name == "imnode"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"absent\.toml: no such file"):
        load(path)


def test_toml_syntax_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, NODE_1 + "\n[cluster\nname = 'x'\n")
    assert "not valid TOML" in message


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[clusterr]\nname = 'x'\n" + NODE_1, "clusterr", "unknown section"),
        ("[cluster]\nnmae = 'x'\n" + NODE_1, "cluster.nmae", "unknown key"),
        ("[tuning]\nuser_pool_shard = 2\n" + NODE_1, "tuning.user_pool_shard", "unknown key"),
        (NODE_1 + "colour = 'red'\n", "nodes.n1.colour", "unknown key"),
        (NODE_1.replace("numeric_id = 1", 'numeric_id = "1"'), "nodes.n1.numeric_id", "expected int"),
        (NODE_1.replace("numeric_id = 1", "numeric_id = true"), "nodes.n1.numeric_id", "expected an integer"),
        ("[tuning]\nuser_pool_shards = '8'\n" + NODE_1, "tuning.user_pool_shards", "expected int"),
        ("[tuning]\nuser_pool_shards = 2.5\n" + NODE_1, "tuning.user_pool_shards", "expected int"),
        ("[tuning]\nhandler_timeout_s = 'soon'\n" + NODE_1, "tuning.handler_timeout_s", "expected float"),
        ("[cluster]\nencryption = 'yes'\n" + NODE_1, "cluster.encryption", "expected bool"),
        ("[cluster]\ninitial_members = 'n1'\n" + NODE_1, "cluster.initial_members", "expected list"),
        (NODE_1.replace('tcp = "127.0.0.1:5101"\n', ""), "nodes.n1.tcp", "missing"),
        (NODE_1.replace("numeric_id = 1\n", ""), "nodes.n1.numeric_id", "missing"),
        ("[cluster]\nname = 'x'\n", "nodes", "at least one"),
        (NODE_1 + NODE_2.replace("5102", "5101"), "nodes.n2.tcp", "already used by nodes.n1.tcp"),
        (NODE_1.replace("5201", "5101"), "nodes.n1.ws", "already used by nodes.n1.tcp"),
        (NODE_1 + 'raft_bind = "nope"\n', "nodes.n1.raft_bind", "not host:port"),
        (NODE_1 + 'raft_bind = "127.0.0.1:5101"\n', "nodes.n1.tcp", "already used by nodes.n1.raft_bind"),
        (NODE_1.replace("127.0.0.1:5101", "127.0.0.1"), "nodes.n1.tcp", "not host:port"),
        (NODE_1.replace("127.0.0.1:5101", ":5101"), "nodes.n1.tcp", "not host:port"),
        (NODE_1.replace("127.0.0.1:5101", "127.0.0.1:70000"), "nodes.n1.tcp", "not host:port"),
        (NODE_1.replace("127.0.0.1:5101", "127.0.0.1:0"), "nodes.n1.tcp", "not host:port"),
        ("[cluster]\ninitial_members = ['n1', 'n7']\n" + NODE_1, "cluster.initial_members", "'n7'"),
        ("[cluster]\ninitial_members = []\n" + NODE_1, "cluster.initial_members", "at least one"),
        (NODE_1 + NODE_2.replace("numeric_id = 2", "numeric_id = 1"), "nodes.n2.numeric_id", "already used"),
        (NODE_1.replace("numeric_id = 1", "numeric_id = 1024"), "nodes.n1.numeric_id", "1..1023"),
        (NODE_1.replace("numeric_id = 1", "numeric_id = 0"), "nodes.n1.numeric_id", "1..1023"),
        ("[tuning]\nuser_pool_shards = 0\n" + NODE_1, "tuning.user_pool_shards", "must be positive"),
        ("[tuning]\nhandler_timeout_s = -1.0\n" + NODE_1, "tuning.handler_timeout_s", "must be positive"),
        (
            "[tuning]\nraft_min_timeout_s = 2.0\nraft_max_timeout_s = 1.0\n" + NODE_1,
            "tuning.raft_max_timeout_s",
            "above raft_min_timeout_s",
        ),
        ("[tuning]\nraft_min_timeout_s = 0.3\n" + NODE_1, "tuning.raft_min_timeout_s", "above 0.3"),
        (
            "[tuning]\nleader_fallback_timeout_s = 0.1\n" + NODE_1,
            "tuning.leader_fallback_timeout_s",
            "above 0.1",
        ),
        ("[tuning]\nhttp_body_timeout_s = 0\n" + NODE_1, "tuning.http_body_timeout_s", "must be positive"),
        (
            "[tuning]\noutbound_queue_bytes = 1048576\n" + NODE_1,
            "tuning.outbound_queue_bytes",
            "at least 2097152",
        ),
        (
            "[tuning]\nmax_frame_bytes = 4194304\noutbound_queue_bytes = 4194304\n" + NODE_1,
            "tuning.outbound_queue_bytes",
            "at least 8388608",
        ),
        ("nodes = 5\n", "nodes", "at least one"),
        ("[tuning]\n" + NODE_1 + "[nodes.n2]\n", "nodes.n2.numeric_id", "missing"),
        ("tuning = 3\n" + NODE_1, "tuning", "expected a table"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    message = load_error(tmp_path, text)
    assert message.startswith(f"{FILE}: {key}:"), message
    assert words in message, message


@pytest.mark.parametrize(
    ("text", "key", "meant"),
    [
        ("[clusterr]\nname = 'x'\n" + NODE_1, "clusterr", "cluster"),
        ("[cluster]\nnmae = 'x'\n" + NODE_1, "cluster.nmae", "name"),
        (NODE_1.replace("tcp =", "tpc ="), "nodes.n1.tpc", "tcp"),
        ("[tuning]\nuser_pool_shard = 2\n" + NODE_1, "tuning.user_pool_shard", "user_pool_shards"),
        ("[webhook]\nurll = 'http://x'\n" + NODE_1, "webhook.urll", "url"),
        ("[webhook]\nevent = ['msg.notify']\n" + NODE_1, "webhook.event", "events"),
        ("[tls]\ncertfile = 'x'\n" + NODE_1, "tls.certfile", "cert_file"),
        ("[[plugins]]\nhandlr = 'a:b'\n" + NODE_1, "plugins[0].handlr", "handler"),
    ],
)
def test_an_unknown_key_lists_the_known_ones_and_the_one_probably_meant(
    tmp_path: Path, text: str, key: str, meant: str
) -> None:
    message = load_error(tmp_path, text)
    assert message.startswith(f"{FILE}: {key}: unknown"), message
    assert f"did you mean {meant!r}?" in message and "(known: " in message, message


def test_an_unknown_key_like_no_known_one_suggests_nothing(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[tuning]\nzzz = 1\n" + NODE_1)
    assert "did you mean" not in message and "known: " in message, message


def test_initial_members_entries_must_be_strings(tmp_path: Path) -> None:
    message = load_error(tmp_path, "[cluster]\ninitial_members = [['n1']]\n" + NODE_1)
    assert "cluster.initial_members" in message


def test_raft_min_timeout_pysyncobj_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    # PySyncObj's SyncObjConf.validate() asserts raftMinTimeout > 3 * appendEntriesPeriod (0.1 s): a node
    # loaded with 0.2 dies at start with a bare AssertionError instead of a message naming the key.
    message = load_error(tmp_path, "[tuning]\nraft_min_timeout_s = 0.2\nraft_max_timeout_s = 1.0\n" + NODE_1)
    assert "tuning.raft_min_timeout_s" in message


def test_log_compaction_min_entries_pysyncobj_would_refuse_is_a_config_error(tmp_path: Path) -> None:
    # SyncObjConf.validate() asserts logCompactionMinEntries >= 2: the node would die at start with a bare
    # AssertionError (and under `python -O` run on with a value PySyncObj never expected).
    message = load_error(tmp_path, "[tuning]\nlog_compaction_min_entries = 1\n" + NODE_1)
    assert "tuning.log_compaction_min_entries" in message


def test_a_file_naming_several_nodes_reads_a_shared_secret_file_beside_it(tmp_path: Path) -> None:
    config = load(write(tmp_path, NODE_1 + NODE_2))
    assert config.secret == ""
    assert config.secret_file == os.path.join(str(tmp_path), Path(FILE).stem + ".secret")
    named = load(write(tmp_path, '[cluster]\nsecret_file = "keys/c.secret"\n' + NODE_1 + NODE_2))
    assert named.secret_file == os.path.join(str(tmp_path), "keys", "c.secret")
    one = load(write(tmp_path, NODE_1))  # one node: it generates its own secret in its data dir
    assert (one.secret, one.secret_file) == ("", "")


@pytest.mark.parametrize("key", ["secret", "manager_token"])
@pytest.mark.parametrize(
    "value",
    ["x", "fifteen-bytes!!", "change-me-raft-password", "change-me-manager-token", "CHANGEME-please-0123"],
)
def test_a_short_or_placeholder_secret_is_a_config_error_naming_the_key(
    tmp_path: Path, key: str, value: str
) -> None:
    message = load_error(tmp_path, f'[cluster]\n{key} = "{value}"\n' + NODE_1 + NODE_2)
    assert f"cluster.{key}:" in message and "secrets.token_urlsafe" in message


def test_raft_password_is_refused_with_what_replaces_it(tmp_path: Path) -> None:
    message = load_error(
        tmp_path, '[cluster]\nraft_password = "long-enough-but-gone-now"\n' + NODE_1 + NODE_2
    )
    assert "cluster.raft_password: replaced by the cluster secret" in message


def test_secret_and_secret_file_together_are_refused(tmp_path: Path) -> None:
    both = '[cluster]\nsecret = "a-cluster-secret-of-some-length"\nsecret_file = "c.secret"\n'
    assert "set one, not both" in load_error(tmp_path, both + NODE_1 + NODE_2)


def test_the_example_config_names_no_secret_literal() -> None:
    example = load(str(REPO / "cluster.example.toml"))
    assert example.secret == "" and example.manager_token == ""
    assert example.secret_file.endswith("cluster.example.secret")


def test_the_secret_file_is_made_once_and_kept_private(tmp_path: Path) -> None:
    secret = local_secret(str(tmp_path))
    path = tmp_path / SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(secret) >= 32 and local_secret(str(tmp_path)) == secret  # stable across restarts
    assert local_secret(str(tmp_path / "other")) != secret
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="readable by others"):
        local_secret(str(tmp_path))
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(SecretError, match="shorter than 16 bytes"):
        read_secret_file(str(path))
    with pytest.raises(SecretError, match="no cluster secret file"):
        read_secret_file(str(tmp_path / "absent.secret"))


def test_external_addresses_for_route_are_checked(tmp_path: Path) -> None:
    externals = (
        'external_tcp = "im.example.com:15100"\nexternal_ws = "wss://im.example.com/ws"\n'
        'external_wss = "wss://im.example.com:443/ws"\n'
    )
    config = load(
        write(tmp_path, VALID.replace('data_dir = "data/n2"\n', 'data_dir = "data/n2"\n' + externals))
    )
    n2 = config.node("n2")
    assert (n2.external_tcp, n2.external_ws, n2.external_wss) == (
        "im.example.com:15100",
        "wss://im.example.com/ws",
        "wss://im.example.com:443/ws",
    )
    assert config.node("n1").external_tcp == ""  # unset: /route answers the bound address
    for line, words in (
        ('external_tcp = "im.example.com"', "nodes.n2.external_tcp: 'im.example.com' is not host:port"),
        ('external_ws = "im.example.com:15200"', "nodes.n2.external_ws: expected a ws:// or wss:// URL"),
        ('external_wss = "ws://im.example.com:1"', "nodes.n2.external_wss: expected a wss:// URL"),
        ('external_ws = "ws://:15200"', "nodes.n2.external_ws: 'ws://:15200' names no host"),
        ('external_ws = "ws://im.example.com:99999"', "names no host (or a bad port)"),
    ):
        message = load_error(
            tmp_path, VALID.replace('data_dir = "data/n2"\n', f'data_dir = "data/n2"\n{line}\n')
        )
        assert words in message, message


def test_the_busy_batch_window_may_not_be_shorter_than_the_window(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID.replace("batch_window_ms = 1.5", "batch_window_busy_ms = 1.0"))
    assert "tuning.batch_window_busy_ms: must be at least batch_window_ms" in message


def test_the_node_wide_held_bytes_must_take_what_one_connection_may_hold(tmp_path: Path) -> None:
    message = load_error(tmp_path, VALID.replace("batch_window_ms = 1.5", "held_bytes_per_node = 4194304"))
    assert "tuning.held_bytes_per_node: must be at least outbound_queue_bytes + recv_inflight" in message
    message = load_error(tmp_path, VALID.replace("batch_window_ms = 1.5", "connections_per_uid = 0"))
    assert "tuning.connections_per_uid: must be positive" in message


def test_the_example_cluster_keeps_its_data_apart_from_a_single_node() -> None:
    """Issue 21: the single node's raft/ and store/ and the example's n1..n4 shared ./imnode-data."""
    single = Path(REPO, load(None).node(DEFAULT_NODE_ID).data_dir).resolve()  # from the README's folder
    example = load(str(REPO / "cluster.example.toml"))
    for node_id, spec in example.nodes.items():
        data = Path(spec.data_dir).resolve()
        assert single not in data.parents and data != single, (node_id, data)
        assert data.parent == REPO.resolve() / "imnode-cluster-data", (node_id, data)
