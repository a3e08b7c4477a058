"""Random and mutated frames against a live node, over TCP and WebSocket, before and after CONNECT.

Whatever a connection is sent, it may end with a DISCONNECT and a close, but the node keeps serving: every
`HEALTH_EVERY` examples and at the end of each test, two real clients exchange a person message (SENDACK
reason 1, RECV delivered), every SEND the node acknowledged to a fuzzing connection is in the store, the
good channel holds exactly the good messages, and no connection is left behind in the registry.

What the node sends back is checked too: every frame decodes and re-encodes to the same bytes, nothing is
served before a successful CONNACK, nothing follows a DISCONNECT, and a DISCONNECT is followed by a close.

Why a node in a thread: Hypothesis drives examples synchronously, and pytest-trio runs each example of an
async test in a trio.run of its own, so a node could not outlive one example. Here the node runs on its own
trio loop in a background thread for the whole module and each example runs on that loop through
`trio.from_thread.run`: one node start per module, not per example. A failure names the exact bytes the
failing example wrote (Hypothesis does not shrink here: the examples share one node, so a failure may
depend on the examples before it). Tests whose input may crash the node get a node of their own.

Examples are derandomized so that CI runs the same inputs every time; set IMNODE_FUZZ_EXPLORE=1 to draw
new ones.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from node.client import open_client
from node.wire.crypto import Session, generate_keypair
from node.wire.protocol import (
    LATEST_VERSION,
    MAX_REMAINING_LENGTH,
    PING_FRAME,
    SETTING_NO_ENCRYPT,
    Connack,
    Connect,
    Disconnect,
    FrameDecoder,
    Packet,
    PacketType,
    Ping,
    Pong,
    ProtocolError,
    Reason,
    Recv,
    Recvack,
    Send,
    Sendack,
    Sub,
    Suback,
    decode_body,
    encode,
    negotiate_version,
)
from raft.commands import person_channel_id
from storage.keys import channel_key
from tests.conftest import RunningNode, running_node, single_node_config, wait_for

T = TypeVar("T")

TEXT = b'{"content":"still serving","type":1}'
GOOD_SENDER = "good-alice"
GOOD_RECEIVER = "good-bob"
FUZZ_SINK = "fuzz-sink"
HEALTH_EVERY = 20
# How long an example waits for the node's next bytes before deciding it waits for more of ours (a frame
# cut short, a huge declared length under the limit): then the example closes its side and moves on.
QUIET_S = 0.15
# A DISCONNECT is followed by a close once the writer has drained (gateway: at most 5 s).
CLOSE_AFTER_DISCONNECT_S = 6.0
EXAMPLE_BOUND_S = 20.0
SERVER_MAX_FRAME_BYTES = 1 << 20  # Tuning.max_frame_bytes default, which the live node keeps
SEND_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio_websocket.ConnectionClosed, OSError)

# Stands in for a session before CONNECT: a SEND before CONNECT must be refused whatever its key.
DUMMY_SESSION = Session(b"k" * 16, b"i" * 16)
# One valid X25519 public key, so some generated CONNECTs get past the key exchange.
_FIXED_PRIVATE, FIXED_PUBLIC = generate_keypair()

FUZZ_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=os.environ.get("IMNODE_FUZZ_EXPLORE") is None,
    database=None,
    # No shrinking: the examples share one node, so a failure may depend on the examples before it, and
    # after a crash every replay would fail at once and "shrink" to a meaningless example.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- a live node on a loop of its own --------------------------------------------------------------------
@dataclass
class Ledger:
    """What the examples did, checked against the store by `check_serving`."""

    examples: int = 0
    good_sent: int = 0
    fuzz_frames: int = 0
    acked: dict[int, int] = field(default_factory=dict)  # message_id -> message_seq, SENDACK reason 1
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    last_bytes: bytes = b""
    last_leave: str = "read"  # how the client left: read the answer, or close / reset at once
    # The examples just before: a node may die of an input after its example has already returned.
    recent: collections.deque[tuple[bytes, str]] = field(default_factory=lambda: collections.deque(maxlen=3))

    def wrote(self, data: bytes, leave: str) -> None:
        if self.last_bytes:
            self.recent.append((self.last_bytes, self.last_leave))
        self.last_bytes, self.last_leave = data, leave


class LiveNode:
    """A node on a trio loop in a background thread; `run` executes a coroutine function on that loop."""

    def __init__(self, data_dir: Path) -> None:
        self.config = single_node_config(data_dir)
        self.ledger = Ledger()
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="fuzz-live-node", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._running: RunningNode | None = None
        self.error: BaseException | None = None
        self.crash_input: bytes | None = None  # what the example in flight had written when the node died

    @property
    def node(self) -> RunningNode:
        assert self._running is not None
        return self._running

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise AssertionError(f"the live node did not start within {timeout_s} s")
        self._check()

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.error = exc
        finally:
            self._finished.set()
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with running_node(self.config) as running:
            self._running = running
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def _check(self) -> None:
        if not self._finished.is_set():
            return
        if self.crash_input is None:
            self.crash_input = self.ledger.last_bytes
        before = "".join(f"\n  {data!r}, then {leave}" for data, leave in self.ledger.recent)
        raise AssertionError(
            f"the node crashed ({leaves(self.error) if self.error else None}); the example in flight had "
            f"written {self.crash_input!r}, then {self.ledger.last_leave}; the examples before it:{before}"
        ) from self.error

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        self._check()
        assert self._token is not None
        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except BaseException:
            # A crash of the node cancels what runs on its loop: report the crash, not the cancellation.
            self._finished.wait(1.0)
            self._check()
            raise

    def stop(self) -> BaseException | None:
        """Stop the node; the exception it crashed with, if it did."""
        if not self._finished.is_set() and self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(30)
        assert not self._thread.is_alive(), "the live node did not stop within 30 s"
        return self.error


def leaves(exc: BaseException) -> str:
    """The distinct leaf exceptions of a group: the node's own error is among them, not always first."""
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(dict.fromkeys(leaves(e) for e in exc.exceptions))
    return repr(exc)


def first_leaf(exc: BaseException | None) -> BaseException | None:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    running = LiveNode(tmp_path_factory.mktemp("fuzz-live") / "n1")
    running.start()
    try:
        yield running
    finally:
        error = running.stop()
        assert error is None, f"the live node crashed: {first_leaf(error)!r}"


@pytest.fixture
def own_live(tmp_path: Path) -> Iterator[LiveNode]:
    """A live node for one test whose input may crash it: the module's node stays up for the others."""
    running = LiveNode(tmp_path / "n1")
    running.start()
    try:
        yield running
    finally:
        running.stop()  # a crash is the test's failure, reported there with the bytes that caused it


# -- the node's answers, checked ----------------------------------------------------------------------------
class ServerFrames:
    """Splits the node's byte stream into packets, checking each one.

    A CONNACK says in its own header whether a version byte (and so a node_id) follows, so it is decoded
    by its header; later packets at the version that CONNACK gave.
    """

    def __init__(self, version: int = LATEST_VERSION) -> None:
        self.version = version
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        packets = []
        while (packet := self._next()) is not None:
            packets.append(packet)
        return packets

    def _next(self) -> Packet | None:
        buf = self._buf
        if not buf:
            return None
        first = buf[0]
        packet_type, flags = first >> 4, first & 0x0F
        if packet_type in (PacketType.PING, PacketType.PONG):
            frame, body = bytes(buf[:1]), b""
            del buf[:1]
        else:
            remaining, shift, i = 0, 0, 1
            while True:
                if i >= len(buf):
                    return None
                byte = buf[i]
                i += 1
                remaining |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                assert shift < 28, f"the node sent an over-long varint: {bytes(buf[:8])!r}"
            if len(buf) < i + remaining:
                return None
            frame, body = bytes(buf[: i + remaining]), bytes(buf[i : i + remaining])
            del buf[: i + remaining]
        version = self.version
        if packet_type == PacketType.CONNACK:
            version = LATEST_VERSION if flags & 0x01 else 2
        try:
            packet = decode_body(packet_type, flags, body, version)
        except ProtocolError as exc:
            raise AssertionError(f"the node sent an undecodable frame {frame!r}: {exc}") from None
        assert encode(packet, version) == frame, f"the node's frame {frame!r} is not canonical: {packet}"
        # Without the version byte (clients that announced 1 to 3) the node runs at the announced version,
        # which `play` set before the CONNECT went out.
        if isinstance(packet, Connack) and flags & 0x01:
            self.version = packet.server_version
        return packet


class Peer:
    """One client connection over TCP or WebSocket, as raw as the transport allows."""

    async def send(self, data: bytes | str) -> None:
        raise NotImplementedError

    async def receive(self) -> bytes:
        """Some bytes, or b"" once the node has closed the connection."""
        raise NotImplementedError


class TcpPeer(Peer):
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send(self, data: bytes | str) -> None:
        await self.stream.send_all(data.encode("latin-1") if isinstance(data, str) else data)

    async def receive(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""  # reset by the node: as closed as it gets


@asynccontextmanager
async def websocket_to(address: tuple[str, int]) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client WebSocket whose TCP socket this test owns and closes.

    Why not `open_websocket_url`: when the server closes first (a DISCONNECT and close, exactly what these
    tests provoke), trio-websocket 0.12's client never closes its TCP socket, and the ResourceWarning fails
    the test under filterwarnings=error.
    """
    host, port = address
    stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, host, "/", max_message_size=1 << 22)
        try:
            yield ws
        finally:
            with trio.move_on_after(1, shield=True):
                await ws.aclose()
            await stream.aclose()


class WsPeer(Peer):
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, data: bytes | str) -> None:
        await self.ws.send_message(data)

    async def receive(self) -> bytes:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return b""
            if isinstance(message, bytes):
                break
            # A connection whose first message is text speaks JSON-RPC (node/wire/jsonrpc.py): the only text
            # a fuzzed one gets is the error answering its bad first message, before the node closes it.
            assert "error" in json.loads(message), f"the node sent a text message: {message!r}"
        assert message, "the node sent an empty WebSocket message"
        return message


@dataclass
class Conversation:
    """The node's side of one connection as seen so far."""

    frames: ServerFrames = field(default_factory=ServerFrames)
    connected: bool = False  # a CONNACK with reason 1 arrived
    disconnect: Disconnect | None = None
    pong: bool = False
    closed: bool = False
    packets: list[Packet] = field(default_factory=list)

    def take(self, data: bytes, ledger: Ledger) -> None:
        for packet in self.frames.feed(data):
            assert self.disconnect is None, f"{packet} after {self.disconnect}"
            self.packets.append(packet)
            if isinstance(packet, Connack):
                assert not self.connected, f"a second CONNACK: {packet}"
                self.connected = packet.reason_code == Reason.SUCCESS
            elif isinstance(packet, Disconnect):
                self.disconnect = packet
            elif isinstance(packet, (Sendack, Pong, Recv, Suback)):
                assert self.connected, f"{packet} served before a successful CONNACK"
                if isinstance(packet, Sendack):
                    assert packet.reason_code in set(Reason), packet
                    if packet.reason_code == Reason.SUCCESS:
                        assert packet.message_id > 0 and packet.message_seq > 0, packet
                        previous = ledger.acked.setdefault(packet.message_id, packet.message_seq)
                        assert previous == packet.message_seq, (packet, previous)
                self.pong = self.pong or isinstance(packet, Pong)
            else:
                raise AssertionError(f"the node sent a {type(packet).__name__}, which only clients send")

    async def read(self, peer: Peer, ledger: Ledger) -> None:
        """Read until the node closes or falls quiet (answered the closing PING, or waits for more bytes).

        Quiet means nothing for QUIET_S: SENDACKs follow a Raft commit, so they may come after the PONG.
        """
        while not self.closed:
            quiet_s = CLOSE_AFTER_DISCONNECT_S if self.disconnect is not None else QUIET_S
            with trio.move_on_after(quiet_s):
                data = await peer.receive()
                if not data:
                    self.closed = True
                    return
                self.take(data, ledger)
                continue
            assert self.disconnect is None, f"{self.disconnect} but no close within {quiet_s} s"
            return


# -- what the examples write ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """Any packet, with any field values its wire format can carry, laid out at `version`."""

    packet: Packet
    version: int


@dataclass(frozen=True)
class Sealed:
    """A SEND that the node accepts when unmutated: encrypted and keyed for the connection's session."""

    setting: int
    payload: bytes
    channel_id: str
    channel_type: int


@dataclass(frozen=True)
class Raw:
    data: bytes


@dataclass(frozen=True)
class Declared:
    """A header declaring `length` body bytes, followed by a few."""

    first: int
    length: int
    tail: bytes


@dataclass(frozen=True)
class Mutation:
    op: str  # flip, insert or delete
    pos: int
    value: int


@dataclass(frozen=True)
class Plan:
    frames: tuple[tuple[Encoded | Sealed | Raw | Declared, tuple[Mutation, ...]], ...]
    splits: tuple[int, ...]
    connect_version: int
    text_chunks: frozenset[int]  # WebSocket only: these chunks go as text messages


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n & 0x7F, n >> 7
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mutate(data: bytes, mutations: tuple[Mutation, ...]) -> bytes:
    out = bytearray(data)
    for m in mutations:
        if m.op == "insert":
            out.insert(m.pos % (len(out) + 1), m.value)
        elif out and m.op == "flip":
            out[m.pos % len(out)] ^= m.value
        elif out and m.op == "delete":
            del out[m.pos % len(out)]
    return bytes(out)


def split(data: bytes, points: tuple[int, ...]) -> list[bytes]:
    cuts = sorted({p % len(data) for p in points if data} - {0})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def materialize(
    spec: Encoded | Sealed | Raw | Declared, session: Session, version: int, seq: int, cmn: str
) -> bytes:
    if isinstance(spec, Encoded):
        return encode(spec.packet, spec.version)
    if isinstance(spec, Sealed):
        wire = spec.payload if spec.setting & SETTING_NO_ENCRYPT else session.encrypt(spec.payload)
        key = session.send_msg_key(seq, cmn, spec.channel_id, spec.channel_type, wire)
        return encode(Send(spec.setting, seq, cmn, spec.channel_id, spec.channel_type, wire, key), version)
    if isinstance(spec, Raw):
        return spec.data
    return bytes((spec.first,)) + varint(spec.length) + spec.tail


# -- strategies ----------------------------------------------------------------------------------------------
u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
u64 = st.integers(0, 2**64 - 1)
nibble = st.integers(0, 15)
# Never the good clients' uids: a fuzzing CONNECT may kick its own kind, not the health check's clients.
short_text = st.text(max_size=12).filter(lambda s: not s.startswith("good-"))
some_bytes = st.binary(max_size=48)

packets: st.SearchStrategy[Packet] = st.one_of(
    st.builds(
        Connect,
        version=u8,
        device_flag=u8,
        device_id=short_text,
        uid=short_text,
        token=short_text,
        client_timestamp=i64,
        client_key=st.one_of(short_text, st.just(FIXED_PUBLIC)),
    ),
    st.builds(
        Connack,
        time_diff=i64,
        reason_code=u8,
        server_key=short_text,
        salt=short_text,
        server_version=u8,
        node_id=u64,
    ),
    st.builds(
        Send,
        setting=u8,
        client_seq=u32,
        client_msg_no=short_text,
        channel_id=short_text,
        channel_type=u8,
        payload=some_bytes,
        msg_key=short_text,
        stream_no=short_text,
        expire=u32,
        topic=short_text,
        flags=nibble,
    ),
    st.builds(Sendack, message_id=i64, client_seq=u32, message_seq=u32, reason_code=u8),
    st.builds(
        Recv,
        setting=u8,
        msg_key=short_text,
        from_uid=short_text,
        channel_id=short_text,
        channel_type=u8,
        client_msg_no=short_text,
        message_id=i64,
        message_seq=u32,
        timestamp=i32,
        payload=some_bytes,
        expire=u32,
        stream_flag=u8,
        stream_no=short_text,
        stream_id=u64,
        topic=short_text,
        flags=nibble,
    ),
    st.builds(Recvack, message_id=i64, message_seq=u32, flags=nibble),
    st.just(Ping()),
    st.just(Pong()),
    st.builds(Disconnect, reason_code=u8, reason=short_text),
    st.builds(
        Sub,
        setting=u8,
        sub_no=short_text,
        channel_id=short_text,
        channel_type=u8,
        action=u8,
        param=short_text,
    ),
    st.builds(Suback, sub_no=short_text, channel_id=short_text, channel_type=u8, action=u8, reason_code=u8),
)

frame_specs: st.SearchStrategy[Encoded | Sealed | Raw | Declared] = st.one_of(
    st.builds(Encoded, packet=packets, version=st.integers(2, 5)),
    st.builds(
        Sealed,
        setting=st.one_of(st.just(0), u8),
        payload=some_bytes,
        channel_id=st.sampled_from([FUZZ_SINK, FUZZ_SINK, "no-such-group", ""]),
        channel_type=st.sampled_from([1, 1, 2, 9]),
    ),
    st.builds(Raw, data=st.binary(min_size=1, max_size=300)),
    st.builds(
        Declared,
        first=st.one_of(st.integers(1, 11).map(lambda t: t << 4), u8),
        length=st.one_of(
            st.integers(SERVER_MAX_FRAME_BYTES + 1, MAX_REMAINING_LENGTH),
            st.integers(0, MAX_REMAINING_LENGTH),
        ),
        tail=st.binary(max_size=32),
    ),
)

# Half the frames go unmutated, so the examples also reach the paths behind a valid frame.
mutations = st.one_of(
    st.just(()),
    st.lists(
        st.builds(
            Mutation,
            op=st.sampled_from(["flip", "insert", "delete"]),
            pos=st.integers(0, 4095),
            value=st.integers(1, 255),
        ),
        min_size=1,
        max_size=3,
    ).map(tuple),
)

plans = st.builds(
    Plan,
    frames=st.lists(st.tuples(frame_specs, mutations), min_size=1, max_size=4).map(tuple),
    splits=st.lists(st.integers(0, 1 << 16), max_size=4).map(tuple),
    connect_version=st.integers(1, 8),
    text_chunks=st.frozensets(st.integers(0, 4), max_size=1),
)


# -- one example ---------------------------------------------------------------------------------------------
async def play(live: LiveNode, peer: Peer, plan: Plan, *, connect_first: bool, websocket: bool) -> None:
    ledger = live.ledger
    talk = Conversation()
    session, version = DUMMY_SESSION, LATEST_VERSION
    if connect_first:
        private, public = generate_keypair()
        uid = f"fuzz-{ledger.examples}"
        hello = Connect(plan.connect_version, 0, f"dev-{uid}", uid, "", int(time.time() * 1000), public)
        talk.frames.version = negotiate_version(plan.connect_version)
        await peer.send(encode(hello, plan.connect_version))
        with trio.fail_after(5):
            while not talk.packets:
                data = await peer.receive()
                assert data, "the node closed a valid CONNECT"
                talk.take(data, ledger)
        connack = talk.packets[0]
        assert isinstance(connack, Connack) and connack.reason_code == Reason.SUCCESS, connack
        session = Session.from_keys(private, connack.server_key, connack.salt)
        version = negotiate_version(plan.connect_version)
    written = [
        mutate(materialize(spec, session, version, seq, f"fz-{ledger.examples}-{seq}"), muts)
        for seq, (spec, muts) in enumerate(plan.frames, start=1)
    ]
    data = b"".join(written)
    ledger.wrote(data, "read")
    ledger.fuzz_frames += len(written)
    try:
        for i, chunk in enumerate(split(data, plan.splits)):
            await peer.send(chunk.decode("latin-1") if websocket and i in plan.text_chunks else chunk)
        await peer.send(PING_FRAME)
    except SEND_ERRORS:
        pass  # the node closed first: its answer is still read below
    await talk.read(peer, ledger)
    ledger.outcomes["closed" if talk.closed else "open"] += 1
    ledger.outcomes["disconnect" if talk.disconnect else "no-disconnect"] += 1
    ledger.outcomes["pong" if talk.pong else "no-pong"] += 1
    ledger.outcomes["connected" if talk.connected else "not-connected"] += 1
    if any(isinstance(p, Sendack) and p.reason_code == Reason.SUCCESS for p in talk.packets):
        ledger.outcomes["sendack-success"] += 1


async def play_tcp(live: LiveNode, plan: Plan, connect_first: bool) -> None:
    with trio.fail_after(EXAMPLE_BOUND_S):
        stream = await trio.open_tcp_stream(*live.node.tcp)
        async with stream:
            await play(live, TcpPeer(stream), plan, connect_first=connect_first, websocket=False)


async def play_ws(live: LiveNode, plan: Plan, connect_first: bool) -> None:
    with trio.fail_after(EXAMPLE_BOUND_S):
        async with websocket_to(live.node.ws) as ws:
            await play(live, WsPeer(ws), plan, connect_first=connect_first, websocket=True)


# -- the node still serves -----------------------------------------------------------------------------------
def stored_messages(node: RunningNode) -> list[dict[str, Any]]:
    with node.node.store.read() as txn:
        return [record for _key, record in txn.scan("messages", b"")]


def stored_in(node: RunningNode, channel_id: str, channel_type: int) -> int:
    with node.node.store.read() as txn:
        return len(txn.messages(channel_key(channel_id, channel_type), 1, 0, 1_000_000))


async def check_serving(live: LiveNode, websocket: bool) -> None:
    node, ledger = live.node, live.ledger
    host, port = node.tcp
    receiver_at = node.ws if websocket else node.tcp
    with trio.fail_after(30):
        async with (
            open_client(host, port, GOOD_SENDER) as alice,
            open_client(*receiver_at, GOOD_RECEIVER, websocket=websocket) as bob,
        ):
            ack = await alice.send(GOOD_RECEIVER, 1, TEXT)
            assert ack.reason_code == Reason.SUCCESS, ack
            ledger.good_sent += 1
            got = await bob.recv()
            assert (got.message_id, got.payload, got.from_uid) == (ack.message_id, TEXT, GOOD_SENDER)
        good_channel = person_channel_id(GOOD_SENDER, GOOD_RECEIVER)
        assert stored_in(node, good_channel, 1) == ledger.good_sent
        stored = {record["mid"]: record["seq"] for record in stored_messages(node)}
        lost = {mid: seq for mid, seq in ledger.acked.items() if stored.get(mid) != seq}
        assert not lost, f"acknowledged with SENDACK reason 1 but not stored: {lost}"
        fuzz_stored = len(stored) - ledger.good_sent
        assert fuzz_stored <= ledger.fuzz_frames, (fuzz_stored, ledger.fuzz_frames)
    # Every connection of the examples and of this check is gone from the node, not just from our side.
    await wait_for(lambda: not len(node.node.registry), 10, "no connection left in the registry")


def fuzz(
    live: LiveNode,
    player: Callable[[LiveNode, Plan, bool], Awaitable[None]],
    *,
    connect_first: bool,
    websocket: bool,
) -> collections.Counter[str]:
    """Run the examples, checking the node serves every HEALTH_EVERY examples and at the end."""
    before = collections.Counter(live.ledger.outcomes)

    @FUZZ_SETTINGS
    @given(plan=plans)
    def example(plan: Plan) -> None:
        live.ledger.examples += 1
        try:
            live.run(player, live, plan, connect_first)
        finally:
            after = "CONNECT" if connect_first else "connecting"
            note(f"bytes written after {after}: {live.ledger.last_bytes!r}")
        if live.ledger.examples % HEALTH_EVERY == 0:
            live.run(check_serving, live, websocket)

    example()
    live.run(check_serving, live, websocket)
    return live.ledger.outcomes - before


# -- the tests -----------------------------------------------------------------------------------------------
# Bad input closes the connection without a DISCONNECT: the node sends one only for a kick (WuKongIM's
# rule; the SDKs stop reconnecting after any DISCONNECT), and no example here kicks anyone.
def test_tcp_fuzz_before_connect(live: LiveNode) -> None:
    outcomes = fuzz(live, play_tcp, connect_first=False, websocket=False)
    assert outcomes["closed"] and not outcomes["disconnect"], outcomes


def test_tcp_fuzz_after_connect(live: LiveNode) -> None:
    outcomes = fuzz(live, play_tcp, connect_first=True, websocket=False)
    # The examples reach the interesting places: refused frames, answered PINGs, stored messages.
    assert outcomes["closed"] and outcomes["pong"] and outcomes["sendack-success"], outcomes
    assert not outcomes["disconnect"], outcomes


def test_websocket_fuzz_before_connect(live: LiveNode) -> None:
    outcomes = fuzz(live, play_ws, connect_first=False, websocket=True)
    assert outcomes["closed"] and not outcomes["disconnect"], outcomes


def test_websocket_fuzz_after_connect(live: LiveNode) -> None:
    outcomes = fuzz(live, play_ws, connect_first=True, websocket=True)
    assert outcomes["closed"] and outcomes["pong"] and outcomes["sendack-success"], outcomes
    assert not outcomes["disconnect"], outcomes


# Raw bytes at the WebSocket port: a mutated upgrade request, then hand-built (maybe unmasked) WS frames.
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def ws_frame(opcode: int, payload: bytes, masked: bool, fin: bool) -> bytes:
    head = bytes(((0x80 if fin else 0) | opcode,))
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes((mask_bit | n,))
    elif n < 1 << 16:
        head += bytes((mask_bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


ws_port_inputs = st.tuples(
    st.lists(
        st.tuples(
            st.sampled_from([0x0, 0x1, 0x2, 0x2, 0x8, 0x9, 0xA, 0x3, 0xF]),
            st.one_of(packets.map(lambda p: encode(p, LATEST_VERSION)), st.binary(max_size=200)),
            st.sampled_from([True, True, False]),  # masked, as a client must
            st.sampled_from([True, True, False]),  # fin
        ),
        max_size=3,
    ),
    mutations,
    st.booleans(),  # mutate the upgrade request too
    st.lists(st.integers(0, 1 << 12), max_size=3).map(tuple),
    # How the client leaves: reads the answer until the node closes or falls quiet, or goes away at once
    # with a FIN or a reset.
    st.sampled_from(["read", "read", "close", "reset"]),
)


async def reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, zero timeout)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def play_ws_port(live: LiveNode, data: bytes, splits: tuple[int, ...], leave: str) -> None:
    ledger = live.ledger
    ledger.wrote(data, leave)
    with trio.fail_after(EXAMPLE_BOUND_S):
        stream = await trio.open_tcp_stream(*live.node.ws)
        async with stream:
            try:
                for chunk in split(data, splits):
                    await stream.send_all(chunk)
            except SEND_ERRORS:
                pass
            if leave == "reset":
                await reset(stream)
            if leave != "read":
                ledger.outcomes["left"] += 1
                return
            while True:
                with trio.move_on_after(QUIET_S * 2):
                    try:
                        if not await stream.receive_some(65536):
                            ledger.outcomes["closed"] += 1
                            return
                    except trio.BrokenResourceError:
                        ledger.outcomes["closed"] += 1
                        return
                    continue
                ledger.outcomes["open"] += 1
                return


def test_websocket_port_raw_bytes(own_live: LiveNode) -> None:
    live = own_live
    before = collections.Counter(live.ledger.outcomes)

    @FUZZ_SETTINGS
    @given(ws_port_inputs)
    def example(
        drawn: tuple[list[tuple[int, bytes, bool, bool]], tuple[Mutation, ...], bool, tuple[int, ...], str],
    ) -> None:
        frames, muts, mutate_upgrade, splits, leave = drawn
        body = b"".join(ws_frame(opcode, payload, masked, fin) for opcode, payload, masked, fin in frames)
        data = mutate(UPGRADE, muts) + body if mutate_upgrade else UPGRADE + mutate(body, muts)
        live.ledger.examples += 1
        try:
            live.run(play_ws_port, live, data, splits, leave)
        finally:
            note(f"bytes written to the WebSocket port: {data!r}, then {leave}")
        if live.ledger.examples % HEALTH_EVERY == 0:
            live.run(check_serving, live, True)

    example()
    live.run(check_serving, live, True)
    outcomes = live.ledger.outcomes - before
    assert outcomes["closed"] and outcomes["left"], outcomes


async def test_clients_that_vanish_at_once_leave_the_node_serving(tmp_path: Path) -> None:
    """Peers gone before the gateway's handler runs: its getpeername and the WebSocket accept then fail.

    Each of these once stopped the whole node (the error escaped the handler into the listener's nursery).
    """

    async def reset_at_once(address: tuple[str, int]) -> None:
        # A bare socket: no checkpoint between connect and reset, so the reset lands before the handler runs.
        sock = trio.socket.socket()
        await sock.connect(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def tcp_reset(node: RunningNode) -> None:
        await reset_at_once(node.tcp)

    async def tcp_half_connect_then_reset(node: RunningNode) -> None:
        stream = await trio.open_tcp_stream(*node.tcp)
        await stream.send_all(encode(Connect(5, 0, "d", "gone", "", 0, FIXED_PUBLIC), 5)[:7])
        await reset(stream)

    async def ws_reset(node: RunningNode) -> None:
        await reset_at_once(node.ws)

    async def ws_upgrade_then(node: RunningNode, tail: bytes, how: str) -> None:
        stream = await trio.open_tcp_stream(*node.ws)
        await stream.send_all(UPGRADE + tail)
        await (reset(stream) if how == "reset" else stream.aclose())

    attacks: dict[str, Callable[[RunningNode], Awaitable[None]]] = {
        "tcp: reset at once": tcp_reset,
        "tcp: half a CONNECT, then reset": tcp_half_connect_then_reset,
        "ws: reset at once": ws_reset,
        "ws: upgrade request, then close": lambda n: ws_upgrade_then(n, b"", "close"),
        "ws: upgrade request, then reset": lambda n: ws_upgrade_then(n, b"", "reset"),
        "ws: upgrade request and an unmasked frame, then close": lambda n: ws_upgrade_then(
            n, ws_frame(0x2, b"", masked=False, fin=True), "close"
        ),
    }
    in_flight = ""
    try:
        async with running_node(single_node_config(tmp_path / "n1")) as node:
            for name, attack in attacks.items():
                in_flight = name
                for _ in range(5):
                    await attack(node)
                host, port = node.tcp
                with trio.fail_after(10):
                    async with (
                        open_client(host, port, "alice") as alice,
                        open_client(*node.ws, "bob", websocket=True) as bob,
                    ):
                        ack = await alice.send("bob", 1, TEXT)
                        assert ack.reason_code == Reason.SUCCESS
                        assert (await bob.recv()).message_id == ack.message_id
    except BaseExceptionGroup as group:
        raise AssertionError(f"the node crashed after {in_flight!r}: {leaves(group)}") from group


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-without-upgrade-headers"),
        pytest.param(UPGRADE.replace(b"Version: 13", b"Version: 99"), id="unsupported-websocket-version"),
        pytest.param(b"\x00\x01garbage\r\n\r\n", id="not-http"),
    ],
)
async def test_a_bad_upgrade_request_then_a_reset_leaves_the_node_serving(
    tmp_path: Path, request_bytes: bytes
) -> None:
    try:
        async with running_node(single_node_config(tmp_path / "n1")) as node:
            sock = trio.socket.socket()
            await sock.connect(node.ws)
            await sock.send(request_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # an RST, before the node has answered
            with trio.fail_after(10):
                async with (
                    open_client(*node.tcp, "alice") as alice,
                    open_client(*node.ws, "bob", websocket=True) as bob,
                ):
                    ack = await alice.send("bob", 1, TEXT)
                    assert ack.reason_code == Reason.SUCCESS
                    assert (await bob.recv()).message_id == ack.message_id
    except BaseExceptionGroup as group:
        raise AssertionError(f"the node crashed: {leaves(group)}") from group


# -- the decoder under the same inputs: any split gives the same packets and the same error ------------------
@settings(max_examples=300, deadline=None, derandomize=FUZZ_SETTINGS.derandomize, database=None)
@given(
    frames=st.lists(st.tuples(frame_specs, mutations), min_size=1, max_size=4),
    splits=st.lists(st.integers(0, 1 << 16), max_size=6),
    version=st.integers(2, 5),
)
def test_decoder_gives_the_same_packets_and_error_however_the_bytes_are_split(
    frames: list[tuple[Encoded | Sealed | Raw | Declared, tuple[Mutation, ...]]],
    splits: list[int],
    version: int,
) -> None:
    data = b"".join(
        mutate(materialize(spec, DUMMY_SESSION, version, seq, f"c{seq}"), muts)
        for seq, (spec, muts) in enumerate(frames, start=1)
    )

    def decode(chunks: list[bytes]) -> tuple[list[Packet], type[Exception] | None]:
        decoder = FrameDecoder(max_remaining=SERVER_MAX_FRAME_BYTES, version=version)
        out: list[Packet] = []
        try:
            for chunk in chunks:
                decoder.feed(chunk)
                while (packet := decoder.next_packet()) is not None:
                    out.append(packet)
        except ProtocolError as exc:
            return out, type(exc)
        return out, None

    whole = decode([data])
    assert decode(split(data, tuple(splits))) == whole
    assert decode([bytes((b,)) for b in data[:2000]] + [data[2000:]]) == whole


# -- limits --------------------------------------------------------------------------------------------------
async def _expect_close_without_disconnect(peer: Peer, what: str) -> None:
    talk = Conversation()
    ledger = Ledger()
    with trio.fail_after(CLOSE_AFTER_DISCONNECT_S):
        while not talk.closed:
            data = await peer.receive()
            if not data:
                talk.closed = True
            else:
                talk.take(data, ledger)
    assert talk.disconnect is None, f"{what}: a DISCONNECT ({talk.disconnect}) for something not a kick"


async def test_a_frame_over_the_size_limit_gets_a_close_without_disconnect(tmp_path: Path) -> None:
    limit = 4096
    async with running_node(single_node_config(tmp_path / "n1", max_frame_bytes=limit)) as node:
        declared_over = b"\x30" + varint(limit + 1) + b"\x00" * 16
        public = FIXED_PUBLIC

        async def tcp_case(connect_first: bool, data: bytes) -> None:
            stream = await trio.open_tcp_stream(*node.tcp)
            async with stream:
                peer = TcpPeer(stream)
                if connect_first:
                    await peer.send(encode(Connect(5, 0, "d", "big", "", 0, public), 5))
                    frames = ServerFrames()
                    with trio.fail_after(5):
                        packets: list[Packet] = []
                        while not packets:
                            packets = frames.feed(await peer.receive())
                    assert isinstance(packets[0], Connack) and packets[0].reason_code == Reason.SUCCESS
                try:
                    await peer.send(data)
                except SEND_ERRORS:
                    pass
                await _expect_close_without_disconnect(peer, f"tcp connect_first={connect_first}")

        async def ws_case(connect_first: bool, data: bytes) -> None:
            async with websocket_to(node.ws) as ws:
                peer = WsPeer(ws)
                if connect_first:
                    await peer.send(encode(Connect(5, 0, "d", "big-ws", "", 0, public), 5))
                    assert isinstance(ServerFrames().feed(await peer.receive())[0], Connack)
                try:
                    await peer.send(data)
                except SEND_ERRORS:
                    pass
                await _expect_close_without_disconnect(peer, f"ws connect_first={connect_first}")

        whole_over = encode(Send(0, 1, "c", "x", 1, b"\x00" * (limit + 1)), 5)
        for connect_first in (False, True):
            await tcp_case(connect_first, declared_over)
            await tcp_case(connect_first, whole_over)
            await ws_case(connect_first, declared_over)
            # Over the WebSocket message limit: the WebSocket layer closes it (code 1009), nothing is decoded.
            await ws_case(connect_first, whole_over + b"\x00" * 64)
        assert node.node.gateway.protocol_errors >= 6

        host, port = node.tcp
        async with (
            open_client(host, port, "alice") as alice,
            open_client(*node.ws, "bob", websocket=True) as bob,
        ):
            ack = await alice.send("bob", 1, TEXT)
            assert ack.reason_code == Reason.SUCCESS
            assert (await bob.recv()).message_id == ack.message_id


IDLE_CONNECTIONS = 2000  # "thousands": each costs two descriptors here (client and node share the process)


async def test_connections_that_never_connect_are_closed_while_a_client_keeps_working(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * IDLE_CONNECTIONS + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    timeout_s = 0.5
    async with running_node(single_node_config(tmp_path / "n1", connect_timeout_s=timeout_s)) as node:
        host, port = node.tcp
        ws_host, ws_port = node.ws
        partial_connect = encode(Connect(5, 0, "d", "slow", "", 0, FIXED_PUBLIC), 5)[:5]
        lifetimes: list[float] = []
        disconnects: list[int] = []
        async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:

            async def idle(i: int) -> None:
                opened = trio.current_time()
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    if i % 2:
                        await stream.send_all(partial_connect)  # a slow loris: half a CONNECT, then nothing
                    talk = Conversation()
                    with trio.fail_after(10):
                        while data := await TcpPeer(stream).receive():
                            talk.take(data, Ledger())
                lifetimes.append(trio.current_time() - opened)
                if talk.disconnect is not None:
                    disconnects.append(talk.disconnect.reason_code)

            async def idle_websocket() -> None:
                async with websocket_to(node.ws) as ws:
                    with trio.fail_after(10):
                        while await WsPeer(ws).receive():
                            pass

            async def no_handshake() -> None:
                stream = await trio.open_tcp_stream(ws_host, ws_port)
                async with stream:
                    with trio.fail_after(10):
                        while await TcpPeer(stream).receive():
                            pass

            exchanged = 0
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(IDLE_CONNECTIONS):
                        nursery.start_soon(idle, i)
                    for _ in range(10):
                        nursery.start_soon(idle_websocket)
                        nursery.start_soon(no_handshake)
                    # The real client is served while the idle ones wait out their timeout, and after it.
                    started = trio.current_time()
                    while len(lifetimes) < IDLE_CONNECTIONS or trio.current_time() - started < 2 * timeout_s:
                        ack = await alice.send("bob", 1, TEXT)
                        assert ack.reason_code == Reason.SUCCESS
                        assert (await bob.recv()).message_id == ack.message_id
                        exchanged += 1
                        await trio.sleep(0.05)
            assert exchanged >= 5
            assert len(lifetimes) == IDLE_CONNECTIONS and min(lifetimes) >= timeout_s * 0.9, sorted(
                lifetimes
            )[:5]
            assert not disconnects  # closed, never DISCONNECTed: a DISCONNECT is for a kick only
            assert node.node.gateway.connect_timeouts >= IDLE_CONNECTIONS + 10
            assert sorted(c.uid for c in node.node.registry) == ["alice", "bob"]
