"""Configuration: embedded defaults for a single node, or a cluster TOML file checked strictly.

A config error names the file and the key (``cluster.example.toml: nodes.n2.tcp: port 5101 is already used
by nodes.n1.tcp``) and stops the start; nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from raft.commands import WEBHOOK_EVENTS

DEFAULT_NODE_ID = "n1"


class ConfigError(ValueError):
    """A configuration problem, with the file and key in its message."""


@dataclass(frozen=True)
class Tuning:
    """Limits and timings. Units are in the names; every queue, batch and retry has a maximum."""

    max_frame_bytes: int = 1 << 20
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 180.0
    outbound_queue_frames: int = 4096
    outbound_queue_bytes: int = 8 << 20
    recv_resend_interval_s: float = 10.0
    recv_resend_attempts: int = 5
    recv_inflight_max: int = 4096
    recv_inflight_bytes: int = 4 << 20
    # What all clients together can make a node hold (the limits above are per connection): connections
    # per uid, per peer address and per node (past one: CONNACK reason 22 and a close), and the bytes
    # queued or kept for resending over every connection (past it the connection holding most is cut).
    connections_per_uid: int = 64
    connections_per_address: int = 10_000
    connections_per_node: int = 20_000
    held_bytes_per_node: int = 256 << 20
    send_rate_per_s: float = 2000.0
    send_burst: int = 4000
    user_pool_shards: int = 8
    channel_pool_shards: int = 8
    pusher_pool_shards: int = 8
    pool_queue_size: int = 4096
    handler_timeout_s: float = 5.0
    handler_retries: int = 3
    dead_letters_max: int = 1000
    batch_window_ms: float = 2.0
    batch_window_busy_ms: float = 50.0
    batch_max_bytes: int = 256 << 10
    pending_per_channel_max: int = 10_000
    proposals_in_flight: int = 64
    commit_timeout_s: float = 10.0
    raft_min_timeout_s: float = 0.4
    raft_max_timeout_s: float = 1.4
    leader_fallback_timeout_s: float = 3.0
    log_compaction_min_entries: int = 1_000_000
    log_compaction_min_time_s: float = 3600.0
    store_map_bytes: int = 64 << 30
    store_sync_interval_s: float = 1.0
    node_down_after_s: float = 15.0
    http_body_timeout_s: float = 5.0
    # Every n-th SEND (and committed message) carries a per-stage latency trace (`imnode admin trace`);
    # 0 turns tracing off. A traced message costs a dozen clock reads.
    trace_sample_every: int = 100
    # Streamed messages (`/message/event`, node/streams.py): streams open on one node, the bytes of one
    # stream's text and snapshots held in memory, the stream.delta EVENTs queued on one connection (past it
    # that client misses deltas, not its connection), the events queued for one other node, and how long a
    # stream may go without an event before it is ended with stream.error "idle timeout" (WuKongIM: 10 min).
    stream_sessions_max: int = 10_000
    stream_snapshot_max_bytes: int = 1 << 20
    stream_deltas_queued_max: int = 1000
    stream_relay_queue_max: int = 100_000
    stream_relay_queue_bytes: int = 64 << 20
    stream_idle_timeout_s: float = 600.0


# Tuning keys for which 0 means "off" rather than a mistake.
_ZERO_MEANS_OFF = frozenset({"trace_sample_every"})


@dataclass(frozen=True)
class WebhookSettings:
    """Where and how the leader posts webhook events (no url: webhooks off)."""

    url: str = ""
    events: tuple[str, ...] = WEBHOOK_EVENTS
    attempts: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    timeout_s: float = 5.0
    batch_max: int = 100
    # msg.offline as a JSON array of up to batch_max messages per POST, like msg.notify; off: one message
    # object per POST, WuKongIM's shape (what its receivers parse). Either way one Raft commit per batch.
    offline_array: bool = False
    outbox_max: int = 100_000
    # Dead letters kept per stream (replicated, like outbox_max); past it the oldest are dropped and counted.
    deadletters_max: int = 10_000
    # PEM file of the CA (or CAs) an https:// receiver's certificate must chain to, instead of the system's
    # trust store: for receivers with a certificate from a private CA. Absolute once loaded.
    ca_file: str = ""


@dataclass(frozen=True)
class TlsSettings:
    """The certificate of the node's TLS listeners (off unless a listener asks for it). Absolute paths."""

    cert_file: str = ""  # PEM: the node's certificate, then any intermediates
    key_file: str = ""  # PEM: its private key, not encrypted (a node starts unattended)
    # The HTTP API over https on each node's `http` address; plain http is then refused there.
    http: bool = False
    # PEM of the CA that signed cert_file, for imnode's own commands (admin, cluster up/join) to check
    # the nodes' https; empty means the system's trust store.
    ca_file: str = ""


@dataclass(frozen=True)
class NodeSpec:
    """Where one node listens and keeps its data."""

    id: str = DEFAULT_NODE_ID
    numeric_id: int = 1
    raft: str = "127.0.0.1:5300"
    # Where the Raft port binds when the other nodes reach it through another address (NAT, port
    # forwarding, a proxy); empty means `raft`. `raft` stays the node's identity in the cluster.
    raft_bind: str = ""
    tcp: str = "127.0.0.1:5100"
    ws: str = "127.0.0.1:5200"
    http: str = "127.0.0.1:5001"
    data_dir: str = "imnode-data"
    # TLS listeners for clients, next to the plain ones as in WuKongIM (its wss port 5210): the plain
    # ports keep serving SDKs and tools that do not speak TLS; `/route` names both. Empty means none.
    tcp_tls: str = ""
    wss: str = ""
    # What `GET /route` tells clients, when they reach the node through another address than the one it
    # binds (NAT, a load balancer, a proxy), as WuKongIM's `external.tcpAddr/wsAddr/wssAddr`: host:port
    # for TCP, URLs for WebSocket. Empty: the bound address.
    external_tcp: str = ""
    external_ws: str = ""
    external_wss: str = ""


@dataclass(frozen=True)
class Listening:
    """Where a started node listens (ports resolved when the config asked for port 0): its NodeSpec's
    addresses as bound. Here, beside NodeSpec, so the command line prints them without the server."""

    node_id: str
    tcp: str
    ws: str
    http: str
    raft: str
    tcp_tls: str = ""  # empty: no such listener
    wss: str = ""
    https: bool = False  # the HTTP API speaks https on `http`

    def describe(self) -> str:
        tls = f"  tcp+tls {self.tcp_tls}" if self.tcp_tls else ""
        tls += f"  wss wss://{self.wss}" if self.wss else ""
        scheme = "https" if self.https else "http"
        urls = f"tcp {self.tcp}  ws ws://{self.ws}{tls}  http {scheme}://{self.http}  raft {self.raft}"
        return f"node {self.node_id}: {urls}"

    def console(self, manager_token: str) -> str:
        """The web console's address, and whether it asks for a token: what a newcomer opens first."""
        scheme = "https" if self.https else "http"
        login = (
            "log in with cluster.manager_token" if manager_token else "no token needed: no manager_token set"
        )
        return f"console {scheme}://{self.http}/console/ ({login})"


@dataclass(frozen=True)
class Config:
    """The whole configuration of a cluster, as seen by the node `node`."""

    cluster_name: str = "imnode"
    manager_token: str = ""
    # The cluster secret (Raft transport, node-to-node calls): given here, or read from `secret_file`
    # (absolute; a cluster config defaults it to <config name>.secret beside the file). Both empty: a node
    # alone, which keeps its own in its data dir.
    secret: str = ""
    secret_file: str = ""
    encryption: bool = True
    token_auth: bool = False
    # WebSocket clients may speak WuKongIM's JSON-RPC (the EasySDKs) beside the binary protocol; WuKongIM's
    # disableJSONRPC turned around. Off: a text or JSON first message is a protocol error, as before.
    jsonrpc: bool = True
    initial_members: tuple[str, ...] = (DEFAULT_NODE_ID,)
    nodes: dict[str, NodeSpec] = field(default_factory=lambda: {DEFAULT_NODE_ID: NodeSpec()})
    tuning: Tuning = field(default_factory=Tuning)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Handler plugins from [[plugins]] tables: ("module:object", options). Switching one on or off at run
    # time goes through Raft (`imnode admin handlers --disable NAME`), so every node agrees.
    plugins: tuple[tuple[str, dict[str, Any]], ...] = ()
    # Also load the plugins installed packages publish under the `imnode.handlers` entry point group.
    entry_point_plugins: bool = True
    source: str = "<defaults>"
    # The config file's folder: plugin modules are imported from it too ("" for the embedded defaults).
    base_dir: str = ""
    # Browsers (node/api/guard.py): host names the HTTP API answers to besides the node's own addresses,
    # localhost and its external_* hosts; origins (scheme://host[:port]) whose pages may call the HTTP API
    # besides the node's own; origins whose pages may open a WebSocket client connection besides the
    # cluster's own HTTP origins ("*": any page).
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    ws_allowed_origins: tuple[str, ...] = ()

    def node(self, node_id: str) -> NodeSpec:
        try:
            return self.nodes[node_id]
        except KeyError:
            known = ", ".join(sorted(self.nodes))
            raise ConfigError(f"{self.source}: no node {node_id!r} (known: {known})") from None

    def partners(self, node_id: str) -> tuple[str, ...]:
        """Raft addresses of the other initial members (the TOML file only bootstraps membership)."""
        return tuple(self.nodes[n].raft for n in self.initial_members if n != node_id)


def _unknown(source: str, key: str, known: Iterable[str], what: str = "key") -> ConfigError:
    """An unknown key: name it, the known ones, and the one probably meant (a typo is the usual cause)."""
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: {key}: unknown {what}{hint} (known: {', '.join(sorted(known))})")


def _check_type(source: str, key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(
            f"{source}: {key}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _fields(cls: type) -> dict[str, type]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: hints[str(f.type)] for f in dataclasses.fields(cls) if str(f.type) in hints}


def _table(
    source: str, prefix: str, table: Any, cls: type, skip: tuple[str, ...] = (), also: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check a table's keys and types against a dataclass; `also` names keys the caller reads itself."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {prefix}: expected a table")
    known = _fields(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in known:
            raise _unknown(source, f"{prefix}.{key}", [*known, *also])
        values[key] = _check_type(source, f"{prefix}.{key}", value, known[key])
    return values


def _address(source: str, key: str, value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{source}: {key}: {value!r} is not host:port with a port in 1..65535")
    return host, int(port_text)


def _check_tuning(source: str, tuning: Tuning) -> None:
    for f in dataclasses.fields(tuning):
        value = getattr(tuning, f.name)
        if f.name in _ZERO_MEANS_OFF and value == 0:
            continue
        if value <= 0:
            raise ConfigError(f"{source}: tuning.{f.name}: must be positive, got {value!r}")
    # An empty queue must take one RECV of the largest message (an HTTP send carries 1 MiB, which encryption
    # and base64 make 1.4 MB), or every recipient of such a message would be cut for it.
    queue_floor = max(2 * tuning.max_frame_bytes, 2 << 20)
    if tuning.outbound_queue_bytes < queue_floor:
        raise ConfigError(
            f"{source}: tuning.outbound_queue_bytes: must be at least {queue_floor} (2 MiB and twice "
            "max_frame_bytes: a RECV of the largest message must fit)"
        )
    # One connection at both of its own bounds must fit, or it would be cut for a single large message.
    if tuning.held_bytes_per_node < tuning.outbound_queue_bytes + tuning.recv_inflight_bytes:
        raise ConfigError(
            f"{source}: tuning.held_bytes_per_node: must be at least outbound_queue_bytes + "
            "recv_inflight_bytes (what one connection may hold)"
        )
    if tuning.batch_window_busy_ms < tuning.batch_window_ms:
        raise ConfigError(f"{source}: tuning.batch_window_busy_ms: must be at least batch_window_ms")
    if tuning.log_compaction_min_entries < 2:
        raise ConfigError(f"{source}: tuning.log_compaction_min_entries: must be at least 2")
    # PySyncObj asserts these at start (heartbeats every 0.1 s); say so here, naming the key.
    if tuning.raft_min_timeout_s <= 0.3:
        raise ConfigError(f"{source}: tuning.raft_min_timeout_s: must be above 0.3 (3 heartbeat periods)")
    if tuning.raft_max_timeout_s <= tuning.raft_min_timeout_s:
        raise ConfigError(f"{source}: tuning.raft_max_timeout_s: must be above raft_min_timeout_s")
    if tuning.leader_fallback_timeout_s <= 0.1:
        raise ConfigError(
            f"{source}: tuning.leader_fallback_timeout_s: must be above 0.1 (one heartbeat period)"
        )


def load(path: str | None) -> Config:
    """Load and check a config file; None gives the embedded single-node defaults."""
    if path is None:
        return Config()
    source = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    allowed = {"cluster", "nodes", "tuning", "plugins", "webhook", "tls"}
    for key in doc:
        if key not in allowed:
            raise _unknown(source, key, allowed, "section")

    cluster = doc.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError(f"{source}: cluster: expected a table")
    cluster_keys = {
        "name": str,
        "manager_token": str,
        "secret": str,
        "secret_file": str,
        "encryption": bool,
        "token_auth": bool,
        "jsonrpc": bool,
        "initial_members": list,
        "entry_point_plugins": bool,
        "allowed_hosts": list,
        "allowed_origins": list,
        "ws_allowed_origins": list,
    }
    for key, value in cluster.items():
        if key == "raft_password":
            raise ConfigError(
                f"{source}: cluster.raft_password: replaced by the cluster secret; drop the key and let "
                "`imnode cluster up` create a secret file, or set cluster.secret_file (see "
                "cluster.example.toml). Every node must run this version: the Raft transport changed"
            )
        if key not in cluster_keys:
            raise _unknown(source, f"cluster.{key}", cluster_keys)
        _check_type(source, f"cluster.{key}", value, cluster_keys[key])

    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise ConfigError(f"{source}: nodes: at least one [nodes.<id>] table is required")
    nodes: dict[str, NodeSpec] = {}
    used: dict[tuple[str, int], str] = {}
    numeric_ids: dict[int, str] = {}
    base_dir = os.path.dirname(os.path.abspath(path))
    for node_id, table in raw_nodes.items():
        values = _table(source, f"nodes.{node_id}", table, NodeSpec, skip=("id",))
        for key in ("numeric_id", "raft", "tcp", "ws", "http", "data_dir"):
            if key not in values:
                raise ConfigError(f"{source}: nodes.{node_id}.{key}: missing")
        for key in ("raft", "raft_bind", "tcp", "tcp_tls", "ws", "wss", "http"):
            if key not in values or (key in ("tcp_tls", "wss") and not values[key]):
                continue  # raft_bind, tcp_tls and wss are optional
            addr = _address(source, f"nodes.{node_id}.{key}", values[key])
            if addr in used:
                raise ConfigError(
                    f"{source}: nodes.{node_id}.{key}: {values[key]} is already used by {used[addr]}"
                )
            used[addr] = f"nodes.{node_id}.{key}"
        _externals(source, f"nodes.{node_id}", values)
        if not 0 < values["numeric_id"] < 1024:
            raise ConfigError(f"{source}: nodes.{node_id}.numeric_id: must be in 1..1023 (message id space)")
        if values["numeric_id"] in numeric_ids:
            raise ConfigError(
                f"{source}: nodes.{node_id}.numeric_id: {values['numeric_id']} is already used by "
                f"nodes.{numeric_ids[values['numeric_id']]}"
            )
        numeric_ids[values["numeric_id"]] = node_id
        values["data_dir"] = _path(base_dir, values["data_dir"])
        nodes[node_id] = NodeSpec(id=node_id, **values)

    members = cluster.get("initial_members", list(nodes))
    for member in members:
        if not isinstance(member, str):
            raise ConfigError(
                f"{source}: cluster.initial_members: entries must be node ids (strings), got {member!r}"
            )
        if member not in nodes:
            raise ConfigError(f"{source}: cluster.initial_members: {member!r} has no [nodes.{member}] table")
    if not members:
        raise ConfigError(f"{source}: cluster.initial_members: must name at least one node")

    for key in ("secret", "manager_token"):
        if cluster.get(key):
            _check_secret(source, f"cluster.{key}", cluster[key])
    if cluster.get("secret") and cluster.get("secret_file"):
        raise ConfigError(f"{source}: cluster.secret and cluster.secret_file: set one, not both")
    secret_file = cluster.get("secret_file", "")
    if not secret_file and not cluster.get("secret") and len(nodes) > 1:
        # Every node started from this file reads the same secret; `imnode cluster up` creates it.
        secret_file = os.path.splitext(os.path.basename(path))[0] + ".secret"
    plugins = _plugins(source, doc.get("plugins", []))
    webhook = _webhook(source, doc.get("webhook", {}), base_dir)
    tls = _tls(source, doc.get("tls", {}), base_dir, nodes)
    tuning = Tuning(**_table(source, "tuning", doc.get("tuning", {}), Tuning))
    _check_tuning(source, tuning)
    return Config(
        cluster_name=cluster.get("name", "imnode"),
        manager_token=cluster.get("manager_token", ""),
        secret=cluster.get("secret", ""),
        secret_file=_path(base_dir, secret_file) if secret_file else "",
        encryption=cluster.get("encryption", True),
        token_auth=cluster.get("token_auth", False),
        jsonrpc=cluster.get("jsonrpc", True),
        initial_members=tuple(members),
        nodes=nodes,
        tuning=tuning,
        plugins=plugins,
        webhook=webhook,
        tls=tls,
        entry_point_plugins=cluster.get("entry_point_plugins", True),
        source=source,
        base_dir=base_dir,
        allowed_hosts=_hosts(source, "cluster.allowed_hosts", cluster.get("allowed_hosts", [])),
        allowed_origins=_origins(source, "cluster.allowed_origins", cluster.get("allowed_origins", [])),
        ws_allowed_origins=_origins(
            source, "cluster.ws_allowed_origins", cluster.get("ws_allowed_origins", []), any_ok=True
        ),
    )


# Values this project's docs and examples have shown: copied into a config, they are no secret.
PLACEHOLDER_SECRETS = frozenset(
    {
        "change-me-manager-token",
        "change-me-raft-password",
        "change-me-cluster-secret",
    }
)
SECRET_MIN_BYTES = 16
MAKE_A_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _check_secret(source: str, key: str, value: str) -> None:
    """A secret must be long and not a value shown in docs: either can be guessed by anyone."""
    lowered = value.lower()
    if value in PLACEHOLDER_SECRETS or "change-me" in lowered or "changeme" in lowered:
        raise ConfigError(f"{source}: {key}: a placeholder, not a secret; make one with {MAKE_A_SECRET}")
    if len(value.encode()) < SECRET_MIN_BYTES:
        raise ConfigError(
            f"{source}: {key}: shorter than {SECRET_MIN_BYTES} bytes; make a good one with {MAKE_A_SECRET}"
        )


ORIGIN_SCHEMES = {"http": 80, "https": 443}


def canonical_origin(value: str) -> str | None:
    """`scheme://host:port` (lowercase, the port spelled out), or None if `value` is no http(s) origin."""
    try:
        parts = urllib.parse.urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ORIGIN_SCHEMES or not parts.hostname or parts.path or parts.query:
        return None
    if parts.fragment or parts.username is not None or parts.password is not None:
        return None
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port or ORIGIN_SCHEMES[parts.scheme]}"


def _origins(source: str, key: str, values: list[Any], *, any_ok: bool = False) -> tuple[str, ...]:
    out = []
    for value in values:
        if any_ok and value == "*":
            out.append("*")
            continue
        origin = canonical_origin(value) if isinstance(value, str) else None
        if origin is None:
            example = '"https://app.example.com" or "http://10.0.0.5:8080"' + (' or "*"' if any_ok else "")
            raise ConfigError(
                f"{source}: {key}: {value!r} is not an origin (scheme://host[:port], no path: {example})"
            )
        out.append(origin)
    return tuple(out)


def _hosts(source: str, key: str, values: list[Any]) -> tuple[str, ...]:
    out = []
    for value in values:
        host = value.strip("[]").lower() if isinstance(value, str) else ""
        if not host or any(c in host for c in "/@ ") or (":" in host and not _is_ipv6(host)):
            raise ConfigError(
                f"{source}: {key}: {value!r} is not a host name (no scheme, port or path: "
                '"im.example.com" or "10.0.0.5")'
            )
        out.append(host)
    return tuple(out)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _externals(source: str, prefix: str, values: dict[str, Any]) -> None:
    """external_tcp is host:port; external_ws a ws:// or wss:// URL; external_wss a wss:// URL."""
    if values.get("external_tcp"):
        _address(source, f"{prefix}.external_tcp", values["external_tcp"])
    for key, schemes in (("external_ws", ("ws://", "wss://")), ("external_wss", ("wss://",))):
        url = values.get(key, "")
        if not url:
            continue
        if not url.startswith(schemes):
            raise ConfigError(f"{source}: {prefix}.{key}: expected a {' or '.join(schemes)} URL, got {url!r}")
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError:
            parts = parts._replace(netloc="")
        if not parts.hostname:
            raise ConfigError(f"{source}: {prefix}.{key}: {url!r} names no host (or a bad port)")


def _path(base_dir: str, value: str) -> str:
    return os.path.normpath(os.path.join(base_dir, value))


def _tls(source: str, raw: Any, base_dir: str, nodes: dict[str, NodeSpec]) -> TlsSettings:
    """Only the shape is checked here; the files are read when a node starts (node/tls.py), so an admin
    command on a machine without the node's private key still loads the config."""
    values = _table(source, "tls", raw, TlsSettings)
    for key in ("cert_file", "key_file", "ca_file"):
        if key in values:
            if not values[key]:
                raise ConfigError(f"{source}: tls.{key}: empty (leave the key out instead)")
            values[key] = _path(base_dir, values[key])
    users = [f"nodes.{n}.{k}" for n, spec in nodes.items() for k in ("tcp_tls", "wss") if getattr(spec, k)]
    if values.get("http"):
        users.append("tls.http")
    for key in ("cert_file", "key_file"):
        if users and key not in values:
            raise ConfigError(f"{source}: tls.{key}: missing ({users[0]} serves TLS)")
    if not users and ("cert_file" in values or "key_file" in values):
        raise ConfigError(
            f"{source}: tls: a certificate but no TLS listener uses it "
            "(set tls.http = true, nodes.<id>.wss or nodes.<id>.tcp_tls)"
        )
    if "ca_file" in values and not values.get("http"):
        raise ConfigError(
            f"{source}: tls.ca_file: only checks the nodes' https API, which is off (tls.http = false)"
        )
    return TlsSettings(**values)


def _webhook(source: str, raw: Any, base_dir: str) -> WebhookSettings:
    raw = dict(raw) if isinstance(raw, dict) else raw
    events = raw.pop("events", None) if isinstance(raw, dict) else None
    values = _table(source, "webhook", raw, WebhookSettings, also=("events",))
    if events is not None:
        known = WEBHOOK_EVENTS
        if not isinstance(events, list) or any(e not in known for e in events):
            raise ConfigError(f"{source}: webhook.events: expected a list of {', '.join(known)}")
        values["events"] = tuple(events)
    url = values.get("url", "")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source}: webhook.url: expected an http:// or https:// URL, got {url!r}")
    if "ca_file" in values:
        if not url.startswith("https://"):
            raise ConfigError(f"{source}: webhook.ca_file: only checks an https:// url, got {url!r}")
        values["ca_file"] = _path(base_dir, values["ca_file"])
    for key in (
        "attempts",
        "batch_max",
        "outbox_max",
        "deadletters_max",
        "backoff_initial_s",
        "backoff_max_s",
        "timeout_s",
    ):
        if key in values and values[key] <= 0:
            raise ConfigError(f"{source}: webhook.{key}: must be positive")
    return WebhookSettings(**values)


def _plugins(source: str, raw: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: plugins: expected [[plugins]] tables")
    plugins = []
    for i, table in enumerate(raw):
        key = f"plugins[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {key}: expected a table")
        for name in table:
            if name not in ("handler", "options"):
                raise _unknown(source, f"{key}.{name}", ("handler", "options"))
        ref = table.get("handler")
        if not isinstance(ref, str) or ":" not in ref:
            raise ConfigError(f"{source}: {key}.handler: expected 'module:object', got {ref!r}")
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: {key}.options: expected a table")
        plugins.append((ref, options))
    return tuple(plugins)
