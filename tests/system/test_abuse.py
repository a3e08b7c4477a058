"""Abuse: a SEND flood gets reason 22; no Raft port runs a pickle it is sent; nodes listen where told only."""

from __future__ import annotations

import ipaddress
import os
import pickle
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from node.client import open_client
from node.wire.protocol import Reason
from raft.commands import person_channel_id
from raft.secret import SECRET_FILE
from storage.keys import channel_key
from tests.cluster_harness import Cluster, write_cluster_toml
from tests.conftest import NodeProcess, running_node, single_node_config, write_single_node_toml

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


def _send_exploits(raft_addr: str, marker: Path) -> None:
    """Send a code-running pickle to a Raft port in every framing PySyncObj might unpickle."""
    host, port = raft_addr.rsplit(":", 1)
    evil = pickle.dumps(_Exploit(str(marker)))
    # PySyncObj's frame: a native int length, then zlib(pickle). Without a password it unpickles that.
    framed = zlib.compress(evil)
    wire = struct.pack("i", len(framed)) + framed
    for payload in (wire, evil, struct.pack(">I", len(evil)) + evil, os.urandom(4096)):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.settimeout(1)
                sock.recv(1024)
            except OSError:
                pass  # the node may close on us: that is fine


async def test_a_raft_port_reached_without_the_password_runs_nothing(
    one_node: Cluster, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    _send_exploits(one_node.config.node("n1").raft, marker)
    await trio.sleep(0.5)  # give a vulnerable node the chance to run it (there is no event to wait for)
    assert not marker.exists()
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
    _send_exploits(f"127.0.0.1:{ports['raft']}", marker)
    await trio.sleep(0.5)  # give a vulnerable node the chance to run it (there is no event to wait for)
    assert not marker.exists()
    secret = tmp_path / "data" / "raft" / SECRET_FILE
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
