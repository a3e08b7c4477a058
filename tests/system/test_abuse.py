"""Abuse: a SEND flood gets reason 22; a Raft port reached without the password runs nothing."""

from __future__ import annotations

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
from storage.keys import channel_key
from tests.cluster_harness import Cluster, write_cluster_toml
from tests.conftest import running_node, single_node_config

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


async def test_a_raft_port_reached_without_the_password_runs_nothing(
    one_node: Cluster, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    host, port = one_node.config.node("n1").raft.rsplit(":", 1)
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
    await trio.sleep(0.5)  # give a vulnerable node the chance to run it (there is no event to wait for)
    assert not marker.exists()
    async with open_client(*one_node.tcp("n1"), "alice") as alice:
        assert (await alice.send("bob", 1, b"still serving")).reason_code == Reason.SUCCESS
