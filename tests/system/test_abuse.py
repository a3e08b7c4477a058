"""Abuse: a SEND flood gets reason 22; no Raft port runs a pickle it is sent (not even in PySyncObj's own
Fernet frame with the right secret: raft/transport.py never unpickles); nodes listen where told
only; hostile logins and uids (a uid with `@`, an extreme timestamp, a refused CONNECT) change nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import pickle
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from pysyncobj.encryptor import getEncryptor

from node.client import ConnectRefused, open_client
from node.wire.crypto import generate_keypair
from node.wire.protocol import LATEST_VERSION, Connack, Connect, FrameDecoder, Reason, encode
from raft.commands import BadCommand, check_op, person_channel_id
from raft.secret import SECRET_FILE
from storage.keys import channel_key
from tests.cluster_harness import Cluster, write_cluster_toml
from tests.conftest import (
    NodeProcess,
    http_json,
    running_node,
    single_node_config,
    wait_for,
    write_single_node_toml,
)

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def test_a_send_flood_from_one_connection_gets_reason_22_and_others_are_served(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", send_rate_per_s=50.0, send_burst=20)
    async with running_node(config) as node:
        async with open_client(*node.tcp, "flooder") as flooder, open_client(*node.tcp, "calm") as calm:
            acks = await flooder.send_many([("victim", 1, b"spam")] * 300)
            reasons = Counter(a.reason_code for a in acks)
            assert reasons[Reason.RATE_LIMIT] > 200 and 20 <= reasons[Reason.SUCCESS] < 100
            ok = await calm.send("victim", 1, b"hello")  # another connection has its own budget
            assert ok.reason_code == Reason.SUCCESS
        with node.node.store.read() as txn:
            stored = txn.messages(channel_key(person_channel_id("flooder", "victim"), 1), 1, 0, 1000)
        assert len(stored) == reasons[Reason.SUCCESS]  # a refused send is never stored


class _Exploit:
    """Unpickling this would create a marker file: proof that the Raft port ran our code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1))  # sets raft_password
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


def _send_exploits(raft_addr: str, marker: Path, secret: str) -> None:
    """Send a code-running pickle to a Raft port in every framing PySyncObj ever unpickled, including its
    own Fernet frame encrypted with the node's RIGHT secret; each time wait for the node's first answer
    (a closed connection here; PySyncObj's transport answered after running the pickle), then look for
    the marker."""
    host, port = raft_addr.rsplit(":", 1)
    evil = pickle.dumps(_Exploit(str(marker)))
    # PySyncObj's frame: a native int length, then zlib(pickle), Fernet-encrypted when it has a password.
    fernet = getEncryptor(secret).encrypt(zlib.compress(evil))
    framed = zlib.compress(evil)
    for payload in (
        struct.pack("i", len(fernet)) + fernet,
        struct.pack("i", len(framed)) + framed,
        evil,
        struct.pack(">I", len(evil)) + evil,
        os.urandom(4096),
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            answer = b""
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(payload)
                answer = sock.recv(1)
        assert not marker.exists()
        assert answer == b"", "the Raft port answered a pickle instead of closing"


async def test_a_raft_port_reached_without_the_password_runs_nothing(
    one_node: Cluster, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    _send_exploits(one_node.config.node("n1").raft, marker, "test-raft-password")
    async with open_client(*one_node.tcp("n1"), "alice") as alice:
        assert (await alice.send("bob", 1, b"still serving")).reason_code == Reason.SUCCESS


@pytest.fixture
def passwordless_node(tmp_path: Path) -> Iterator[tuple[NodeProcess, dict[str, int]]]:
    """A single node from a config that sets no raft_password: the shape of the embedded defaults."""
    ports = write_single_node_toml(tmp_path / "single.toml", tmp_path / "data")
    process = NodeProcess(tmp_path / "single.toml", tmp_path / "node.log")
    try:
        process.start()
        yield process, ports
    finally:
        process.stop()


async def test_a_node_without_raft_password_runs_no_pickle_from_its_raft_port(
    passwordless_node: tuple[NodeProcess, dict[str, int]], tmp_path: Path
) -> None:
    _process, ports = passwordless_node
    marker = tmp_path / "pwned"
    secret = tmp_path / "data" / "raft" / SECRET_FILE
    _send_exploits(f"127.0.0.1:{ports['raft']}", marker, secret.read_text().strip())
    assert secret.stat().st_mode & 0o777 == 0o600  # the generated secret is the owner's alone
    async with open_client("127.0.0.1", ports["tcp"], "alice") as alice:
        assert (await alice.send("bob", 1, b"still serving")).reason_code == Reason.SUCCESS


def _listening_addresses(pid: int) -> set[str]:
    """host:port of every TCP socket in LISTEN state that process `pid` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                continue
            raw_host, raw_port = local.split(":")
            packed = bytes.fromhex(raw_host)
            # /proc prints the address as host-order 32-bit words.
            packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
            found.add(f"{ipaddress.ip_address(packed)}:{int(raw_port, 16)}")
    return found


def test_a_node_listens_on_the_configured_addresses_only(
    passwordless_node: tuple[NodeProcess, dict[str, int]],
) -> None:
    process, ports = passwordless_node
    assert process.proc is not None
    expected = {f"127.0.0.1:{port}" for port in ports.values()}
    assert _listening_addresses(process.proc.pid) == expected


def test_importing_raft_leaves_socket_inet_ntop_working() -> None:
    # PySyncObj's Windows shim replaces it process-wide with one that raises TypeError on Linux.
    import raft.machine  # noqa: F401

    assert socket.inet_ntop(socket.AF_INET, b"\x7f\x00\x00\x01") == "127.0.0.1"


# -- what a hostile client sends at login and as a uid ----------------------------------------------------
async def raw_connect(
    address: tuple[str, int],
    uid: str,
    *,
    client_timestamp: int | None = None,
    client_key: str | None = None,
    token: str = "",
) -> tuple[trio.SocketStream, Connack]:
    """A CONNECT with any field values (the client library only sends sane ones), and its CONNACK."""
    stream = await trio.open_tcp_stream(*address)
    stamp = int(time.time() * 1000) if client_timestamp is None else client_timestamp
    key = generate_keypair()[1] if client_key is None else client_key
    await stream.send_all(
        encode(Connect(LATEST_VERSION, 0, f"dev-{uid}", uid, token, stamp, key), LATEST_VERSION)
    )
    decoder = FrameDecoder(version=LATEST_VERSION)
    with trio.fail_after(10):
        while (connack := decoder.next_packet()) is None:
            data = await stream.receive_some(65536)
            assert data, "the node closed the connection before CONNACK"
            decoder.feed(data)
    assert isinstance(connack, Connack), connack
    return stream, connack


async def test_a_uid_with_at_cannot_write_into_another_pairs_person_conversation(tmp_path: Path) -> None:
    # Person channels are stored as `a@b`: with `@` allowed in uids, `eve` writing to `mail.com@bob` and
    # `eve@mail.com` writing to `bob` name the same stored channel.
    shared = person_channel_id("eve@mail.com", "bob")
    assert shared == person_channel_id("eve", "mail.com@bob")
    payload = base64.b64encode(b'{"content":"hi","type":1}').decode()
    async with running_node(single_node_config(tmp_path / "n1")) as node:
        async with open_client(*node.tcp, "eve") as eve:
            assert (await eve.send("mail.com@bob", 1, b"forged")).reason_code == Reason.CHANNEL_ID_ERROR
            assert (await eve.send("bob", 1, b"fine")).reason_code == Reason.SUCCESS
        with pytest.raises(ConnectRefused) as refused:
            async with open_client(*node.tcp, "eve@mail.com"):
                pass
        assert refused.value.reason_code == Reason.AUTH_FAIL
        # Every HTTP field that takes a uid refuses one with `@`, naming the field.
        refusals = [
            ("/user/token", {"uid": "eve@mail.com", "token": "t"}, "uid"),
            ("/user/device_quit", {"uid": "eve@mail.com"}, "uid"),
            ("/user/onlinestatus", ["eve@mail.com"], "uids"),
            ("/user/systemuids_add", {"uids": ["eve@mail.com"]}, "uids"),
            (
                "/channel",
                {"channel_id": "g", "channel_type": 2, "subscribers": ["eve@mail.com"]},
                "subscribers",
            ),
            (
                "/channel/subscriber_add",
                {"channel_id": "g", "channel_type": 2, "subscribers": ["eve@mail.com"]},
                "subscribers",
            ),
            (
                "/channel/blacklist_add",
                {"channel_id": "g", "channel_type": 2, "uids": ["eve@mail.com"]},
                "uids",
            ),
            (
                "/channel/whitelist_set",
                {"channel_id": "g", "channel_type": 2, "uids": ["eve@mail.com"]},
                "uids",
            ),
            # A person channel's lists belong to the uid named as channel_id.
            (
                "/channel/blacklist_add",
                {"channel_id": "mail.com@bob", "channel_type": 1, "uids": ["x"]},
                "channel_id",
            ),
            (
                "/message/send",
                {"from_uid": "eve@mail.com", "channel_id": "bob", "channel_type": 1, "payload": payload},
                "from_uid",
            ),
            (
                "/message/send",
                {"from_uid": "eve", "channel_id": "mail.com@bob", "channel_type": 1, "payload": payload},
                "channel_id",
            ),
            (
                "/message/sendbatch",
                {"from_uid": "eve", "subscribers": ["mail.com@bob"], "payload": payload},
                "subscribers",
            ),
            (
                "/channel/messagesync",
                {"login_uid": "eve@mail.com", "channel_id": "bob", "channel_type": 1},
                "login_uid",
            ),
            ("/conversation/sync", {"uid": "eve@mail.com"}, "uid"),
            (
                "/conversations/clearUnread",
                {"uid": "eve@mail.com", "channel_id": "bob", "channel_type": 1},
                "uid",
            ),
        ]
        for path, body, field in refusals:
            status, answer = await http_json(node.http, "POST", path, body)
            assert status == 400 and answer["msg"].startswith(f"{field} "), (path, body, status, answer)
            assert "@" in answer["msg"], answer
        status, answer = await http_json(node.http, "GET", "/connz?uid=eve%40mail.com")
        assert status == 400 and answer["msg"].startswith("uid "), answer
        # Every op is checked before it is proposed: hand-made ops carrying such uids go no further. (Apply
        # itself does not judge by this rule: entries committed before it must apply alike everywhere.)
        forged = {
            "t": "send",
            "cid": shared,
            "ct": 1,
            "from": "eve",
            "to": "mail.com@bob",
            "cmn": "forged-by-hand",
            "mid": 1,
            "ts": 1,
            "setting": 0,
            "payload": b"forged",
        }
        token = {"t": "token", "uid": "eve@mail.com", "flag": 0, "level": 0, "token": "t"}
        for op in (forged, token):
            with pytest.raises(BadCommand, match="must not contain '@'"):
                check_op(op)
        with node.node.store.read() as txn:
            assert txn.channel(channel_key(shared, 1)) is None
            assert txn.user("eve@mail.com") is None
            assert txn.channel(channel_key(person_channel_id("eve", "bob"), 1)) is not None


async def test_a_send_to_a_person_uid_longer_than_a_uid_is_a_channel_id_error_not_a_system_error(
    tmp_path: Path,
) -> None:
    # The wire takes channel ids of up to 128 bytes (a group's), but a uid is at most 64: a person channel
    # named by a longer one cannot exist. The sender's mistake, so reason 16, not 15 ("retry later").
    longest, too_long = "u" * 64, "u" * 128
    async with running_node(single_node_config(tmp_path / "n1")) as node:
        async with open_client(*node.tcp, "alice") as alice, open_client(*node.tcp, longest) as receiver:
            for uid in (too_long, "u" * 65, "é" * 33):  # bytes count, not characters
                assert (await alice.send(uid, 1, b"hi")).reason_code == Reason.CHANNEL_ID_ERROR, uid
            assert (await alice.send(longest, 1, b"hi")).reason_code == Reason.SUCCESS
            assert (await receiver.recv()).payload == b"hi"  # and the node goes on serving
        payload = base64.b64encode(b"hi").decode()
        status, answer = await http_json(
            node.http,
            "POST",
            "/message/send",
            {"from_uid": "alice", "channel_id": too_long, "channel_type": 1, "payload": payload},
        )
        assert status == 400 and "channel_id_error (reason 16)" in answer["msg"], answer
        status, answer = await http_json(
            node.http,
            "POST",
            "/message/sendbatch",
            {"from_uid": "alice", "subscribers": [too_long, longest], "payload": payload},
        )
        assert status == 400 and "subscribers" in answer["msg"], answer  # refused whole at the edge


async def test_a_connect_is_never_refused_for_its_timestamp(tmp_path: Path) -> None:
    i64_min, i64_max = -(1 << 63), (1 << 63) - 1
    async with running_node(single_node_config(tmp_path / "n1")) as node:
        for n, stamp in enumerate((i64_min, i64_max, 0, -1)):
            stream, connack = await raw_connect(node.tcp, f"clock-{n}", client_timestamp=stamp)
            async with stream:
                assert connack.reason_code == Reason.SUCCESS, (stamp, connack)
                # time_diff = server ms - client ms, clamped to the field's range.
                if stamp == i64_min:
                    assert connack.time_diff == i64_max
                else:
                    assert connack.time_diff == pytest.approx(int(time.time() * 1000) - stamp, abs=60_000)
        assert node.node.user_pool.statistics()["dead_letters"] == 0


async def test_a_refused_connect_leaves_the_live_session_alone(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", token_auth=True)
    async with running_node(config) as node:
        for uid in ("alice", "bob"):
            status, _ = await http_json(node.http, "POST", "/user/token", {"uid": uid, "token": f"{uid}-t"})
            assert status == 200
        async with open_client(*node.tcp, "alice", token="alice-t", device_id="phone") as alice:
            live = list(node.node.registry.of_uid("alice"))
            assert len(live) == 1
            # The same uid and device flag with the right token but a client key that is no X25519 key.
            stream, connack = await raw_connect(node.tcp, "alice", token="alice-t", client_key="bm90LWEta2V5")
            async with stream:
                assert connack.reason_code == Reason.CLIENT_KEY_IS_EMPTY
            # The live session was not kicked: it is still registered, open and served.
            assert node.node.registry.of_uid("alice") == live and not live[0].closed.is_set()
            await alice.ping()
            async with open_client(*node.tcp, "bob", token="bob-t") as bob:
                assert (await alice.send("bob", 1, b"still here")).reason_code == Reason.SUCCESS
                assert (await bob.recv()).payload == b"still here"
            # A CONNECT of the same device that passes every check does replace it.
            async with open_client(*node.tcp, "alice", token="alice-t", device_id="phone"):
                await wait_for(lambda: live[0].closed.is_set(), 10, "the older session kicked")
