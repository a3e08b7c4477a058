"""raft/transport.py with real PySyncObj machines on 127.0.0.1: what a peer without the secret, or with a
forged, replayed, oversized or pickled message, gets (a closed connection, nothing run), and that the
cluster commits and catches a restarted follower up meanwhile.

The attacking peer is a raw socket in the test. Where it needs a session (to send a frame that would be
valid but for one thing) it does the real handshake with the right secret, claiming the address of the
cluster's third member, which is configured but not started: the two running nodes are a quorum, and the
stand-in disturbs no real connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import pickle
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pysyncobj.encryptor import getEncryptor

from raft import commands as c
from raft.bridge import RaftNode
from raft.machine import RaftSettings
from raft.transport import (
    MAGIC,
    NONCE_BYTES,
    FrameOpener,
    FrameSealer,
    Refused,
    auth_key,
    check_command,
    handshake_proof,
    session_keys,
)
from storage.store import Store
from tests.conftest import free_port
from tests.raft.test_machine import Running, group_setup, message_seqs, send

SECRET = "a-test-cluster-secret-of-enough-bytes"
READY_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 5.0
TWO_GIB = 2**31

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    # PySyncObj's journal leaks the handle of raft.journal.meta on every restart (its bug, see test_machine).
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in.*raft\.journal\.meta:pytest.PytestUnraisableExceptionWarning"
    ),
]


class _Exploit:
    """Unpickling this creates a marker file: proof that a peer ran code in the node."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# -- a cluster of real machines in this process --------------------------------------------------------
class Cluster:
    """Three members (addresses sorted, so the third dials the other two); `start` runs any of them."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, secrets: dict[int, str] | None = None) -> None:
        self.addrs = sorted(f"127.0.0.1:{free_port()}" for _ in range(3))
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.secrets = secrets or {}
        self.running: dict[int, Running] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._stores: dict[int, Store] = {}

    def settings(self, i: int) -> RaftSettings:
        return RaftSettings(
            self_addr=self.addrs[i],
            partners=tuple(a for a in self.addrs if a != self.addrs[i]),
            data_dir=str(self.tmp_path / f"n{i}" / "raft"),
            password=self.secrets.get(i, SECRET),
            min_timeout_s=0.35,
            max_timeout_s=0.6,
            leader_fallback_timeout_s=1.0,
        )

    async def start(self, i: int) -> Running:
        store = Store(str(self.tmp_path / f"n{i}" / "store"), map_size=64 << 20)
        node = RaftNode(self.settings(i), store)
        running = Running(node)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(node.run)
                    inner.start_soon(running.consume)
                    task_status.started()

        await self.nursery.start(run)
        self.running[i], self._scopes[i], self._stores[i] = running, scope, store
        return running

    async def stop(self, i: int) -> None:
        self._scopes.pop(i).cancel()
        running = self.running.pop(i)
        with trio.fail_after(READY_TIMEOUT_S):
            while running.node._machine is not None:  # noqa: ASYNC110  run() closes it on the way out
                await trio.sleep(0.01)
        self._stores.pop(i).close()

    async def leader(self) -> Running:
        with trio.fail_after(READY_TIMEOUT_S):
            while True:
                for running in self.running.values():
                    if running.node.is_leader():
                        return running
                await trio.sleep(0.01)

    def close(self) -> None:
        for scope in self._scopes.values():
            scope.cancel()


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, *, start: tuple[int, ...], **kwargs: Any) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        nodes = Cluster(tmp_path, nursery, **kwargs)
        try:
            for i in start:
                await nodes.start(i)
            yield nodes
        finally:
            nodes.close()
    for store in nodes._stores.values():
        store.close()


async def commit_one(node: Running, mid: int) -> None:
    """A commit through the cluster, promptly: the proof that the node kept serving."""
    if mid == 1:
        await node.propose([group_setup("g", ["a", "b"])])
    with trio.fail_after(2.0):
        [result] = await node.propose([send("g", "a", f"m{mid}", mid)])
    assert result["r"] == 1


# -- a raw peer ----------------------------------------------------------------------------------------
def connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=CLOSE_TIMEOUT_S)
    return sock


def handshake(sock: socket.socket, secret: str, claim: str) -> tuple[FrameSealer, FrameOpener]:
    """The initiator's side of the handshake, done by hand; returns this side's sealer and opener."""
    key = auth_key(secret.encode())
    nonce_i = os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + nonce_i)
    challenge = _recv_exactly(sock, len(MAGIC) + NONCE_BYTES + 32)
    nonce_r, proof = challenge[len(MAGIC) : len(MAGIC) + NONCE_BYTES], challenge[len(MAGIC) + NONCE_BYTES :]
    addr = claim.encode()
    sock.sendall(handshake_proof(key, b"I", nonce_i, nonce_r, addr) + bytes((len(addr),)) + addr)
    if not hmac.compare_digest(proof, handshake_proof(key, b"R", nonce_i, nonce_r)):
        raise AssertionError("the node does not know the secret")  # only for the wrong-secret test
    to_responder, to_initiator = session_keys(secret.encode(), nonce_i, nonce_r)
    return FrameSealer(to_responder), FrameOpener(to_initiator)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    return data


def wait_closed(sock: socket.socket) -> None:
    """Read (and drop) whatever the node sends until it closes the connection; fail if it never does."""
    sock.settimeout(CLOSE_TIMEOUT_S)
    try:
        while sock.recv(1 << 16):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed with unread data on its side: closed all the same


def harmless() -> dict[str, Any]:
    """A valid message that changes nothing: a reply from term 0, which a node ignores."""
    return {"type": "next_node_idx", "next_node_idx": 1, "reset": False, "success": True, "term": 0}


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger="imnode.raft.transport"):
        yield caplog


def refused_because(caplog: pytest.LogCaptureFixture) -> str:
    return " | ".join(r.getMessage() for r in caplog.records if r.name == "imnode.raft.transport")


# -- the tests -----------------------------------------------------------------------------------------
async def test_three_machines_commit_and_a_restarted_follower_catches_up(tmp_path: Path) -> None:
    async with cluster(tmp_path, start=(0, 1, 2)) as nodes:
        leader = await nodes.leader()
        for mid in range(1, 21):
            await commit_one(leader, mid)
        follower = next(i for i, r in nodes.running.items() if r is not leader)
        await nodes.stop(follower)
        for mid in range(21, 41):
            await commit_one(leader, mid)
        back = await nodes.start(follower)
        with trio.fail_after(READY_TIMEOUT_S):
            while back.node.store.applied_index() < leader.node.store.applied_index():  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert message_seqs(back.node.store, "g") == list(range(1, 41))


async def test_a_success_reply_never_rewinds_next_index(tmp_path: Path) -> None:
    """Pipelined load: every entry reaches each follower once (PySyncObj sent 2.4-3.3 copies per 2)."""
    async with cluster(tmp_path, start=(0, 1, 2)) as nodes:
        leader = await nodes.leader()
        await commit_one(leader, 1)
        machine = leader.node.machine
        transport = machine._SyncObj__transport
        sent: list[int] = []
        send_as_is = transport.send

        def counting_send(node: Any, message: dict[str, Any]) -> bool:
            if message.get("type") == "append_entries":
                sent.extend(entry[1] for entry in message.get("entries", ()))
            return bool(send_as_is(node, message))

        transport.send = counting_send  # runs on the tick thread, like the send it wraps
        first = machine.raftLastApplied + 1

        async def proposer(k: int) -> None:
            for j in range(10):
                await leader.propose([send("g", "a", f"p{k}-{j}", 1000 + k * 10 + j)])

        async with trio.open_nursery() as load:
            for k in range(40):
                load.start_soon(proposer, k)
        transport.send = send_as_is
        fresh = [index for index in sent if index >= first]
        copies = len(fresh) / len(set(fresh))
        assert len(set(fresh)) >= 400
        assert copies <= 2.02, f"{copies:.2f} copies per entry to two followers"


async def test_a_node_with_a_wrong_secret_gets_nothing_and_the_others_commit(tmp_path: Path) -> None:
    async with cluster(tmp_path, start=(0, 1, 2), secrets={2: "another-secret-of-enough-bytes!!"}) as nodes:
        leader = await nodes.leader()
        assert leader is not nodes.running[2]
        await commit_one(leader, 1)
        outsider = nodes.running[2].node
        assert outsider.store.applied_index() == 0
        assert not any(outsider.status()["connected"].values())


async def test_a_raw_peer_with_a_wrong_secret_is_closed(tmp_path: Path, refusals: Any) -> None:
    async with cluster(tmp_path, start=(0, 1)) as nodes:
        leader = await nodes.leader()
        with connect(nodes.addrs[0]) as sock:
            with pytest.raises(AssertionError, match="does not know"):
                await trio.to_thread.run_sync(
                    handshake, sock, "a-wrong-secret-of-enough-bytes", nodes.addrs[2]
                )
            await trio.to_thread.run_sync(wait_closed, sock)
        assert "does not know the cluster secret" in refused_because(refusals)
        await commit_one(leader, 1)


@pytest.mark.parametrize("fault", ["tampered", "replayed", "reordered"])
async def test_a_forged_frame_closes_the_session(tmp_path: Path, refusals: Any, fault: str) -> None:
    async with cluster(tmp_path, start=(0, 1)) as nodes:
        leader = await nodes.leader()
        await commit_one(leader, 1)

        def attack() -> None:
            with connect(nodes.addrs[0]) as sock:
                sealer, _opener = handshake(sock, SECRET, nodes.addrs[2])
                first, second = sealer.seal(harmless()), sealer.seal(harmless())
                if fault == "tampered":
                    sock.sendall(first[:-1] + bytes((first[-1] ^ 1,)))
                elif fault == "replayed":
                    sock.sendall(first + first)
                else:
                    sock.sendall(second + first)
                wait_closed(sock)

        await trio.to_thread.run_sync(attack)
        assert "failed authentication" in refused_because(refusals)
        await commit_one(leader, 2)


async def test_an_oversized_length_prefix_is_refused_before_its_body(tmp_path: Path, refusals: Any) -> None:
    async with cluster(tmp_path, start=(0, 1)) as nodes:
        leader = await nodes.leader()
        await commit_one(leader, 1)

        def attack(authenticated: bool) -> None:
            with connect(nodes.addrs[0]) as sock:
                if authenticated:
                    handshake(sock, SECRET, nodes.addrs[2])
                sock.sendall(struct.pack(">I", TWO_GIB - 1) + b"\0" * 64)
                wait_closed(sock)

        for authenticated in (False, True):
            await trio.to_thread.run_sync(attack, authenticated)
            await commit_one(leader, 2 + authenticated)  # promptly (commit_one allows 2 s)
        reasons = refused_because(refusals)
        assert "not an imnode Raft handshake" in reasons  # without a session: only the handshake is read
        assert f"a frame length of {TWO_GIB - 1} bytes" in reasons  # with one: refused on the prefix
        # Nothing of the body was kept: the node's read buffers are empty on every live connection.
        conns = list(leader.node.machine._SyncObj__transport._connections.values())
        assert all(len(conn._rbuf) < (1 << 20) for conn in conns)


async def test_pickles_run_nothing_in_any_framing(tmp_path: Path, refusals: Any) -> None:
    """PySyncObj's old Fernet frame with the right secret, a pickle in a frame, a pickled command in an
    authenticated session: each refused, no marker file, and the node keeps committing."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Exploit(marker))
    async with cluster(tmp_path, start=(0, 1)) as nodes:
        leader = await nodes.leader()
        await commit_one(leader, 1)

        def unauthenticated(payload: bytes) -> bytes:
            """The node's first answer: closed (b"") here; PySyncObj answered after unpickling it."""
            with connect(nodes.addrs[0]) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(payload)
                with contextlib.suppress(ConnectionResetError):
                    return sock.recv(1)
                return b""

        fernet = getEncryptor(SECRET).encrypt(zlib.compress(evil))  # PySyncObj's own format, right password
        framed = struct.pack(">I", len(evil)) + evil
        for payload in (struct.pack("i", len(fernet)) + fernet, framed):
            answer = await trio.to_thread.run_sync(unauthenticated, payload)
            assert not marker.exists()
            assert answer == b""

        def authenticated(message: dict[str, Any]) -> None:
            with connect(nodes.addrs[0]) as sock:
                sealer, _opener = handshake(sock, SECRET, nodes.addrs[2])
                sock.sendall(sealer.seal(message))
                wait_closed(sock)

        command = b"\x00" + evil  # a regular command whose pickle calls os.system
        membership = b"\x02" + evil
        for message in (
            {"type": "apply_command", "command": command, "request_id": 1},
            {
                "type": "append_entries",
                "term": 0,
                "commit_index": 0,
                "prevLogIdx": 0,
                "prevLogTerm": 0,
                "entries": [[membership, 1, 0]],
            },
            {
                "type": "append_entries",
                "term": 0,
                "commit_index": 0,
                "prevLogIdx": 0,
                "prevLogTerm": 0,
                "transmission": "finish",
                "data": evil,
            },
        ):
            await trio.to_thread.run_sync(authenticated, message)
        await commit_one(leader, 2)
        assert not marker.exists()
        reasons = refused_because(refusals)
        assert reasons.count("not an imnode Raft handshake") == 2
        # In an entry and as a membership change alike: the loader knows no global but TCPNode.
        assert reasons.count("a command's pickle names posix.system") >= 2
        assert "chunked AppendEntries are not accepted" in reasons


async def test_an_unfinished_handshake_is_closed_and_pending_ones_are_capped(
    tmp_path: Path, refusals: Any
) -> None:
    async with cluster(tmp_path, start=(0, 1)) as nodes:
        leader = await nodes.leader()
        socks = [connect(nodes.addrs[0]) for _ in range(40)]
        try:
            socks[0].sendall(MAGIC)  # half a HELLO, then nothing
            # Over the cap, connections are closed as they arrive; the rest when their time is up.
            for sock in socks:
                await trio.to_thread.run_sync(wait_closed, sock)
        finally:
            for sock in socks:
                sock.close()
        assert "the handshake did not finish in time" in refused_because(refusals)
        await commit_one(leader, 1)


def test_commands_as_pysyncobj_writes_them_pass_and_nothing_else() -> None:
    import pysyncobj.pickle as pysyncobj_pickle
    from pysyncobj.node import TCPNode

    node = TCPNode("127.0.0.1:4000")
    check_command(b"\x00" + pysyncobj_pickle.dumps((0, (c.encode_entry([group_setup("g", ["a"])]),))))
    check_command(b"\x01")
    check_command(b"\x02" + pysyncobj_pickle.dumps(["add", node.id, node]))
    check_command(b"\x03" + pysyncobj_pickle.dumps(3))
    evil = pickle.dumps(_Exploit(Path("/nonexistent")))
    for command in (b"\x00" + evil, b"\x02" + evil, b"\x03" + evil, b"\x07", b"", b"\x00not a pickle"):
        with pytest.raises(Refused):
            check_command(command)


def test_frames_fail_on_any_change_replay_or_reorder() -> None:
    to_r, _to_i = session_keys(b"s" * 32, b"i" * 32, b"r" * 32)
    sealer, opener = FrameSealer(to_r), FrameOpener(to_r)
    entries = {"type": "append_entries", "term": 3, "commit_index": 1, "entries": [(b"\x01", 2, 3)]}
    first, second = sealer.seal(entries), sealer.seal(harmless())
    assert opener.open(first[4:]) == entries  # tuples come back as tuples
    with pytest.raises(Refused):
        opener.open(first[4:])  # replayed
    assert opener.open(second[4:]) == harmless()
    other = FrameOpener(to_r)
    with pytest.raises(Refused):
        other.open(second[4:])  # out of order
    assert hashlib.sha256(first).digest() != hashlib.sha256(sealer.seal(entries)).digest()  # fresh nonce


def test_a_membership_command_cannot_name_another_global_by_stack_tricks(tmp_path: Path) -> None:
    # STACK_GLOBAL takes the top two strings of the stack: push os/system, then TCPNode's names, pop the
    # latter, and an opcode scan sees TCPNode while the load gets os.system. BUILD (which a node's pickle
    # uses) then plants it as a module's __setstate__ and a second BUILD calls it, with no REDUCE at all.
    # The check loads through an unpickler that knows no other global: refused, nothing runs.
    marker = tmp_path / "ran"

    def s(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE

    def smuggled(module: str, name: str) -> bytes:
        return s(module) + s(name) + s("pysyncobj.node") + s("TCPNode") + b"00" + b"\x93"  # POP POP GLOBAL

    trick = (
        b"\x80\x05"
        + smuggled("os", "path")
        + b"}"  # EMPTY_DICT
        + s("__setstate__")
        + smuggled("os", "system")
        + b"sb"  # SETITEM, BUILD: os.path.__setstate__ = os.system
        + s(f"touch {marker}")
        + b"b."  # BUILD: os.system("touch ...")
    )
    with pytest.raises(Refused):
        check_command(b"\x02" + trick)
    assert not marker.exists()
    from pysyncobj.node import TCPNode

    node = TCPNode("127.0.0.1:4000")
    node.evil = _Exploit(marker)  # type: ignore[attr-defined]
    with pytest.raises(Refused):
        check_command(b"\x02" + pickle.dumps(["add", "127.0.0.1:4000", node]))
    assert not marker.exists()
