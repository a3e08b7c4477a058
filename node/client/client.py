"""imnode's own WuKongIM client on trio, for tests, the CLI and the benchmark.

It speaks the same wire protocol and encryption as the official SDKs, over TCP or WebSocket, either one
optionally inside TLS (`ssl_context=`: a node's `tcp_tls` port, or its `wss` port with `websocket=True`):

    async with open_client("127.0.0.1", 5100, "alice") as alice:
        ack = await alice.send("bob", 1, b'{"content":"hi","type":1}')
        recv = await alice.recv()

One background task per client reads frames and routes them: SENDACKs to the task waiting on
that client_seq, RECVs (verified and decrypted) to a bounded queue, PONGs to `ping`. Every
wait is bounded by a timeout and raises ClientError, never trio.TooSlowError, when it runs out.

For load (the benchmark), a client can skip the per-message tasks and queues: `on_recv=` hands each
verified RECV to a function in the reader task, `on_sendack=` each SENDACK nobody awaits, and
`prepare_sends` + `write_frames` pipeline a batch of SENDs in one write. The RECVACKs of everything one
read brought in go out in one write either way.
"""

import dataclasses
import math
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Final, Generic, TypeVar

import trio
import trio_websocket

from node.gateway.transports import TRANSPORT_ERRORS, TcpTransport, Transport, WebSocketTransport
from node.wire.crypto import CryptoError, Session, generate_keypair, msg_key_matches
from node.wire.protocol import (
    DEFAULT_MAX_REMAINING,
    FLAG_RED_DOT,
    LATEST_VERSION,
    PING_FRAME,
    SETTING_NO_ENCRYPT,
    SETTING_TOPIC,
    Connack,
    Connect,
    Disconnect,
    Event,
    FrameDecoder,
    Packet,
    Pong,
    ProtocolError,
    Reason,
    Recv,
    Recvack,
    Send,
    Sendack,
    encode,
    negotiate_version,
    recvack_frame,
)

RECV_QUEUE_SIZE: Final = 10_000
EVENT_QUEUE_SIZE: Final = 10_000
MAX_PENDING_ACKS: Final = 100_000
WRITE_CHUNK_BYTES: Final = 256 * 1024
CLOSE_TIMEOUT_S: Final = 2.0
# A RECV re-encrypts a SEND the server accepted at its own frame limit, under a header with more
# fields, so it can be slightly larger than the largest SEND: leave headroom over that limit.
MAX_FRAME_BYTES: Final = 2 * DEFAULT_MAX_REMAINING
_MAX_CLIENT_SEQ: Final = 0xFFFFFFFF

# Called in the reader task, so they must not block: what they do delays every later frame of the connection.
RecvHandler = Callable[[Recv], None]
SendackHandler = Callable[[Sendack], None]

_T = TypeVar("_T")


class ClientError(Exception):
    """The connection failed, closed, or did not answer in time."""


class ConnectRefused(ClientError):
    """The server answered CONNECT with a reason code other than SUCCESS."""

    def __init__(self, reason_code: int, message: str = "") -> None:
        super().__init__(message or f"connect refused: {_reason_name(reason_code)}")
        self.reason_code = reason_code


def _reason_name(code: int) -> str:
    try:
        return f"{Reason(code).name} ({code})"
    except ValueError:
        return f"reason {code}"


@contextmanager
def _bounded(timeout_s: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(timeout_s):
            yield
    except trio.TooSlowError:
        raise ClientError(f"{what}: nothing within {timeout_s} s") from None


class _Waiter(Generic[_T]):
    """One answer awaited by one task; `value` stays None if the connection ends first."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: _T | None = None


# --- transports (the gateway's own: node/gateway/transports.py) ----------------------------------


async def _open_stream(
    host: str, port: int, ssl_context: ssl.SSLContext | None, https: bool
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    if ssl_context is None:
        return await trio.open_tcp_stream(host, port)
    # https_compatible for wss, as trio-websocket itself connects: web servers may close without close_notify.
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context, https_compatible=https)
    try:
        # Here, not on the first write: an untrusted certificate fails the connect with its own reason
        # (trio-websocket would only wait for an upgrade that never comes).
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _open_transport(
    host: str, port: int, websocket: bool, nursery: trio.Nursery | None, ssl_context: ssl.SSLContext | None
) -> Transport:
    if not websocket:
        return TcpTransport(await _open_stream(host, port, ssl_context, https=False))
    if nursery is None:
        raise ValueError("websocket=True needs a nursery for the WebSocket's own reader task")
    stream = await _open_stream(host, port, ssl_context, https=True)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            stream,
            netloc,
            "/",
            message_queue_size=64,
            # A whole frame travels in one message: room for the largest body plus its header.
            max_message_size=MAX_FRAME_BYTES + 16,
        )
    except BaseException:
        # A connect timeout cancels the wait for the upgrade: trio-websocket would leave the socket open.
        await trio.aclose_forcefully(stream)
        raise
    return WebSocketTransport(ws, stream)


async def _close_quietly(transport: Transport) -> None:
    # Shielded and bounded: closing must finish even inside a cancelled scope, but a WebSocket
    # close handshake with a dead peer must not hang us.
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        with suppress(*TRANSPORT_ERRORS):
            await transport.aclose()


# --- the client -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ClientStatistics:
    sends: int
    pending_acks: int
    recvs: int
    queued_recvs: int
    bad_msg_keys: int
    bad_payloads: int


class Client:
    """One connected, logged-in device. Build it with `open_client` (or `connect`).

    `disconnected` is set, and every pending wait fails with ClientError, as soon as the server
    sends DISCONNECT (whose code lands in `disconnect_reason`), the stream ends, or `aclose` runs.
    """

    def __init__(
        self,
        transport: Transport,
        decoder: FrameDecoder,
        session: Session | None,
        *,
        uid: str,
        connack: Connack,
        auto_ack: bool,
        on_recv: RecvHandler | None = None,
        on_sendack: SendackHandler | None = None,
    ) -> None:
        self.uid = uid
        self.connack = connack
        self.version = decoder.version
        self.disconnected = trio.Event()
        self.disconnect_reason: int | None = None
        self.close_reason = ""
        self.bad_msg_keys = 0
        self.bad_payloads = 0
        self._transport = transport
        self._decoder = decoder
        # None means payloads travel in clear (the server runs with encryption off).
        self._session = session
        self._auto_ack = auto_ack
        self._on_recv = on_recv
        self._on_sendack = on_sendack
        self._write_lock = trio.Lock()
        self._next_seq = 1
        self._pending: dict[int, _Waiter[Sendack]] = {}
        self._pong_waiters: list[_Waiter[bool]] = []
        self._recv_in, self._recv_out = trio.open_memory_channel[Recv](RECV_QUEUE_SIZE)
        # Unbounded, so the reader never waits on a write: a reader blocked behind a long
        # pipelined write could deadlock with a server blocked writing RECVs to us. It holds at
        # most one small frame per RECV read, and reading stops when the RECV queue is full.
        # One item is the RECVACKs of one read, so one wake-up of the writer acknowledges them all.
        self._acks_in, self._acks_out = trio.open_memory_channel[list[bytes]](math.inf)
        self._sends = 0
        self._recvs = 0
        # Message events (EVENT packets of streamed messages), bounded: past it they are counted, not kept.
        self._events_in, self._events_out = trio.open_memory_channel[Event](EVENT_QUEUE_SIZE)
        self.dropped_events = 0

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            sends=self._sends,
            pending_acks=len(self._pending),
            recvs=self._recvs,
            queued_recvs=self._recv_out.statistics().current_buffer_used,
            bad_msg_keys=self.bad_msg_keys,
            bad_payloads=self.bad_payloads,
        )

    # -- reading -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and route frames until the connection ends. `open_client` runs this for you."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ack_loop)
            try:
                await self._read_loop()
            finally:
                nursery.cancel_scope.cancel()

    async def _ack_loop(self) -> None:
        try:
            while True:
                frames = await self._acks_out.receive()
                while len(frames) < 1024:
                    try:
                        frames += self._acks_out.receive_nowait()
                    except trio.WouldBlock:
                        break
                await self._write(frames)
        except (ClientError, trio.EndOfChannel):
            # The connection is over; _write or _shut has already recorded why.
            return

    async def _read_loop(self) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = await self._transport.receive()
                if not data:
                    break
                self._decoder.feed(data)
                if not await self._dispatch_all():
                    return
        except ProtocolError as exc:
            reason = f"undecodable data from the server: {exc}"
        except (ClientError, *TRANSPORT_ERRORS) as exc:
            reason = f"connection lost: {exc!r}"
        finally:
            self._shut(reason)

    async def _dispatch_all(self) -> bool:
        """Route every packet the decoder holds; False once the connection is over.

        The RECVACKs of the batch go to the writer together, before anything here can wait (a full RECV
        queue), so a RECV is never left unacknowledged while its reader is stalled.
        """
        decoder = self._decoder
        acks: list[bytes] = []
        try:
            while (packet := decoder.next_packet()) is not None:
                packet_type = type(packet)
                if packet_type is Recv:
                    opened = self._open(packet)  # type: ignore[arg-type]
                    if opened is None:
                        # Like the JS SDK: drop it unacknowledged, so the server's resend logic shows.
                        continue
                    self._recvs += 1
                    if self._auto_ack:
                        # Flags are not copied: the server ignores them on RECVACK.
                        acks.append(recvack_frame(opened.message_id, opened.message_seq))
                    if self._on_recv is not None:
                        self._on_recv(opened)
                        continue
                    try:
                        self._recv_in.send_nowait(opened)
                    except trio.WouldBlock:
                        # Blocks when the queue is full: reading stalls and TCP pushes back on the server,
                        # rather than RECVs being dropped behind the caller's back.
                        self._flush_acks(acks)
                        acks = []
                        await self._recv_in.send(opened)
                elif packet_type is Sendack:
                    self._on_ack(packet)  # type: ignore[arg-type]
                elif not self._dispatch_other(packet):
                    return False
        finally:
            self._flush_acks(acks)
        return True

    def _flush_acks(self, acks: list[bytes]) -> None:
        if acks:
            with suppress(trio.ClosedResourceError):  # the connection ended: nothing to acknowledge on
                self._acks_in.send_nowait(acks)

    def _on_ack(self, ack: Sendack) -> None:
        waiter = self._pending.get(ack.client_seq)
        if waiter is not None:
            if waiter.value is None:
                waiter.value = ack
                waiter.event.set()
        elif self._on_sendack is not None:
            self._on_sendack(ack)

    def _dispatch_other(self, packet: Packet) -> bool:
        """Route a packet other than RECV and SENDACK; False once the connection is over."""
        if isinstance(packet, Pong):
            waiters, self._pong_waiters = self._pong_waiters, []
            for pong_waiter in waiters:
                pong_waiter.value = True
                pong_waiter.event.set()
        elif isinstance(packet, Disconnect):
            self.disconnect_reason = packet.reason_code
            self._shut(f"server sent DISCONNECT {_reason_name(packet.reason_code)} {packet.reason!r}")
            return False
        elif isinstance(packet, Event):
            try:
                self._events_in.send_nowait(packet)
            except trio.WouldBlock:
                self.dropped_events += 1
        # Anything else (a repeated CONNACK, SUBACK) asks nothing of this client.
        return True

    def _open(self, recv: Recv) -> Recv | None:
        session = self._session
        if session is None or recv.setting & SETTING_NO_ENCRYPT:
            return recv
        expected = session.recv_msg_key(
            recv.message_id,
            recv.message_seq,
            recv.client_msg_no,
            recv.timestamp,
            recv.from_uid,
            recv.channel_id,
            recv.channel_type,
            recv.payload,
        )
        if not msg_key_matches(expected, recv.msg_key):
            self.bad_msg_keys += 1
            return None
        try:
            payload = session.decrypt(recv.payload)
        except CryptoError:
            self.bad_payloads += 1
            return None
        # Built field by field: dataclasses.replace looks every field up again, several times slower.
        return Recv(
            recv.setting,
            recv.msg_key,
            recv.from_uid,
            recv.channel_id,
            recv.channel_type,
            recv.client_msg_no,
            recv.message_id,
            recv.message_seq,
            recv.timestamp,
            payload,
            recv.expire,
            recv.stream_flag,
            recv.stream_no,
            recv.stream_id,
            recv.topic,
            recv.flags,
        )

    def _shut(self, reason: str) -> None:
        if self.disconnected.is_set():
            return
        self.close_reason = reason
        self.disconnected.set()
        # Waiters wake with value None and raise ClientError now rather than at their timeout.
        for waiter in self._pending.values():
            waiter.event.set()
        for pong_waiter in self._pong_waiters:
            pong_waiter.event.set()
        self._pong_waiters = []
        # recv() still drains what was queued, then sees the end.
        self._recv_in.close()
        self._acks_in.close()

    # -- writing -------------------------------------------------------------------------------

    async def _write(self, frames: Sequence[bytes]) -> None:
        if self.disconnected.is_set():
            raise ClientError(f"connection closed: {self.close_reason}")
        try:
            async with self._write_lock:
                await self._transport.send(frames)
        except TRANSPORT_ERRORS as exc:
            self._shut(f"write failed: {exc!r}")
            raise ClientError(f"write failed: {exc!r}") from exc

    def _prepare_send(
        self,
        channel_id: str,
        channel_type: int,
        payload: bytes,
        client_msg_no: str | None,
        setting: int,
        flags: int,
        expire: int = 0,
        topic: str = "",
    ) -> tuple[int, bytes]:
        """Allocate a client_seq, register its ack waiter, and encode the SEND frame (a topic sets the
        setting's topic bit; expire travels from protocol version 3)."""
        if len(self._pending) >= MAX_PENDING_ACKS:
            raise ClientError(f"{MAX_PENDING_ACKS} SENDs already await their SENDACK")
        seq, frame = self._encode_send(
            channel_id, channel_type, payload, client_msg_no, setting, flags, expire, topic
        )
        self._pending[seq] = _Waiter()
        return seq, frame

    def _encode_send(
        self,
        channel_id: str,
        channel_type: int,
        payload: bytes,
        client_msg_no: str | None,
        setting: int,
        flags: int,
        expire: int = 0,
        topic: str = "",
    ) -> tuple[int, bytes]:
        """Allocate a client_seq and encode its SEND frame (encrypted and signed as the SDKs do)."""
        seq = self._next_seq
        if seq in self._pending:
            raise ClientError(f"client_seq {seq} wrapped around onto a SEND still awaiting its ack")
        if client_msg_no is None:
            # The SDKs' shape: 32 hex digits and one more digit (random, as uuid4's would be, at a fifth
            # of its cost).
            client_msg_no = os.urandom(16).hex() + "0"
        session = self._session
        if session is None or setting & SETTING_NO_ENCRYPT:
            wire_payload, msg_key = payload, ""
        else:
            wire_payload = session.encrypt(payload)
            msg_key = session.send_msg_key(seq, client_msg_no, channel_id, channel_type, wire_payload)
        if topic:
            setting |= SETTING_TOPIC
        packet = Send(
            setting,
            seq,
            client_msg_no,
            channel_id,
            channel_type,
            wire_payload,
            msg_key,
            expire=expire,
            topic=topic,
            flags=flags,
        )
        try:
            frame = encode(packet, self.version)
        except ProtocolError as exc:
            raise ClientError(f"cannot send to {channel_id!r}: {exc}") from exc
        self._next_seq = seq % _MAX_CLIENT_SEQ + 1
        self._sends += 1
        return seq, frame

    def prepare_sends(self, items: Sequence[tuple[str, int, bytes]]) -> tuple[list[int], list[bytes]]:
        """Encode (channel_id, channel_type, payload) SENDs for `write_frames`, with no ack waiter: their
        SENDACKs go to the `on_sendack` handler, so the caller keeps its own account of what is in flight
        (register the client_seqs before writing: a SENDACK can arrive while the write is still going on).
        """
        if self._on_sendack is None:
            raise ClientError("prepare_sends needs a client connected with on_sendack=")
        seqs: list[int] = []
        frames: list[bytes] = []
        for channel_id, channel_type, payload in items:
            seq, frame = self._encode_send(channel_id, channel_type, payload, None, 0, FLAG_RED_DOT)
            seqs.append(seq)
            frames.append(frame)
        return seqs, frames

    async def write_frames(self, frames: Sequence[bytes], timeout_s: float = 30.0) -> None:
        """Write encoded frames (from `prepare_sends`) in writes of up to WRITE_CHUNK_BYTES."""
        with _bounded(timeout_s, f"writing {len(frames)} frames"):
            for chunk in _chunks(frames, WRITE_CHUNK_BYTES):
                await self._write(chunk)

    def _ack_of(self, seq: int, waiter: _Waiter[Sendack]) -> Sendack:
        if waiter.value is None:
            raise ClientError(f"no SENDACK for client_seq {seq}: connection closed: {self.close_reason}")
        return waiter.value

    async def send(
        self,
        channel_id: str,
        channel_type: int,
        payload: bytes,
        *,
        client_msg_no: str | None = None,
        setting: int = 0,
        flags: int = FLAG_RED_DOT,
        expire: int = 0,
        topic: str = "",
        timeout_s: float = 10.0,
    ) -> Sendack:
        """Send one message and wait for its SENDACK (whatever its reason code)."""
        seq, frame = self._prepare_send(
            channel_id, channel_type, payload, client_msg_no, setting, flags, expire, topic
        )
        waiter = self._pending[seq]
        try:
            with _bounded(timeout_s, f"SENDACK for client_seq {seq}"):
                await self._write((frame,))
                await waiter.event.wait()
        finally:
            self._pending.pop(seq, None)
        return self._ack_of(seq, waiter)

    async def send_many(
        self, items: Sequence[tuple[str, int, bytes]], *, timeout_s: float = 30.0
    ) -> list[Sendack]:
        """Pipeline (channel_id, channel_type, payload) sends; the acks come back in item order."""
        seqs: list[int] = []
        try:
            frames: list[bytes] = []
            for channel_id, channel_type, payload in items:
                seq, frame = self._prepare_send(channel_id, channel_type, payload, None, 0, FLAG_RED_DOT)
                seqs.append(seq)
                frames.append(frame)
            with _bounded(timeout_s, f"SENDACKs for {len(seqs)} pipelined SENDs"):
                for chunk in _chunks(frames, WRITE_CHUNK_BYTES):
                    await self._write(chunk)
                for seq in seqs:
                    await self._pending[seq].event.wait()
            return [self._ack_of(seq, self._pending[seq]) for seq in seqs]
        finally:
            for seq in seqs:
                self._pending.pop(seq, None)

    async def submit(
        self,
        channel_id: str,
        channel_type: int,
        payload: bytes,
        *,
        client_msg_no: str | None = None,
        setting: int = 0,
        flags: int = FLAG_RED_DOT,
        timeout_s: float = 10.0,
    ) -> int:
        """Write one SEND without waiting for its ack; collect the ack with `wait_ack`.

        Every submitted client_seq must be passed to `wait_ack` once, or it keeps a slot of
        the MAX_PENDING_ACKS table.
        """
        seq, frame = self._prepare_send(channel_id, channel_type, payload, client_msg_no, setting, flags)
        try:
            with _bounded(timeout_s, f"writing SEND client_seq {seq}"):
                await self._write((frame,))
        except BaseException:
            self._pending.pop(seq, None)
            raise
        return seq

    async def wait_ack(self, client_seq: int, timeout_s: float = 10.0) -> Sendack:
        """The SENDACK of a `submit`ted SEND. Each client_seq can be awaited once."""
        waiter = self._pending.get(client_seq)
        if waiter is None:
            raise ClientError(f"client_seq {client_seq} is not awaiting a SENDACK")
        try:
            with _bounded(timeout_s, f"SENDACK for client_seq {client_seq}"):
                await waiter.event.wait()
        finally:
            self._pending.pop(client_seq, None)
        return self._ack_of(client_seq, waiter)

    async def recv(self, timeout_s: float = 10.0) -> Recv:
        """The next RECV, payload decrypted and msg_key verified."""
        try:
            with _bounded(timeout_s, "RECV"):
                return await self._recv_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ClientError(f"connection closed: {self.close_reason}") from None

    async def event(self, timeout_s: float = 10.0) -> Event:
        """The next message event (EVENT packet: a streamed message's delta, snapshot or end)."""
        try:
            with _bounded(timeout_s, "EVENT"):
                return await self._events_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ClientError(f"connection closed: {self.close_reason}") from None

    async def ack(self, recv: Recv, timeout_s: float = 5.0) -> None:
        """Acknowledge a RECV by hand (only needed with auto_ack=False)."""
        with _bounded(timeout_s, "writing RECVACK"):
            await self._write((encode(Recvack(recv.message_id, recv.message_seq), self.version),))

    async def ping(self, timeout_s: float = 5.0) -> None:
        """Send PING and wait for the PONG."""
        waiter: _Waiter[bool] = _Waiter()
        self._pong_waiters.append(waiter)
        try:
            with _bounded(timeout_s, "PONG"):
                await self._write((PING_FRAME,))
                await waiter.event.wait()
        finally:
            if waiter in self._pong_waiters:
                self._pong_waiters.remove(waiter)
        if waiter.value is None:
            raise ClientError(f"no PONG: connection closed: {self.close_reason}")

    async def aclose(self) -> None:
        """Close the connection; idempotent. The reader task ends with it."""
        self._shut("closed by the client")
        await _close_quietly(self._transport)


def _chunks(frames: Sequence[bytes], chunk_bytes: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for frame in frames:
        chunk.append(frame)
        size += len(frame)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --- connecting -------------------------------------------------------------------------------


async def _read_connack(transport: Transport, decoder: FrameDecoder) -> Connack:
    while True:
        packet = decoder.next_packet()
        if packet is None:
            data = await transport.receive()
            if not data:
                raise ClientError("the server closed the connection before CONNACK")
            decoder.feed(data)
        elif isinstance(packet, Connack):
            return packet
        elif isinstance(packet, Disconnect):
            raise ConnectRefused(packet.reason_code, f"server sent DISCONNECT before CONNACK: {packet}")
        else:
            raise ClientError(f"expected CONNACK, got {type(packet).__name__}")


async def connect(
    host: str,
    port: int,
    uid: str,
    *,
    token: str = "",
    device_flag: int = 0,
    device_id: str | None = None,
    version: int = LATEST_VERSION,
    encrypt: bool = True,
    websocket: bool = False,
    auto_ack: bool = True,
    timeout_s: float = 5.0,
    nursery: trio.Nursery | None = None,
    ssl_context: ssl.SSLContext | None = None,
    on_recv: RecvHandler | None = None,
    on_sendack: SendackHandler | None = None,
) -> Client:
    """Open a connection, log in, and return the Client.

    The reader task is started in `nursery` when one is given; otherwise the caller must run
    `await client.run()` in a task of its own. WebSocket needs a nursery. `encrypt=False` is
    for servers running with encryption off: payloads travel in clear, msg_keys stay empty.
    `ssl_context` connects over TLS (wss with `websocket=True`), checking the node's certificate and
    host name: `ssl.create_default_context()` for the system's CAs, `cafile=` for a private one.
    `on_recv` takes every verified RECV instead of the `recv()` queue; `on_sendack` every SENDACK no `send`
    or `wait_ack` awaits (see `prepare_sends`). Both run in the reader task and must not block.
    Raises ConnectRefused if the server refuses the login, ClientError on any other failure.
    """
    if version < 1:
        raise ValueError(f"protocol version {version} is below 1")
    private_key, public_key = generate_keypair()
    decoder = FrameDecoder(max_remaining=MAX_FRAME_BYTES, version=negotiate_version(version))
    try:
        with _bounded(timeout_s, f"connecting to {host}:{port}"):
            transport = await _open_transport(host, port, websocket, nursery, ssl_context)
    except (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError) as exc:
        # A failed TLS handshake (an untrusted certificate, say) is a BrokenResourceError whose cause
        # says why.
        why = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
        raise ClientError(f"cannot connect to {host}:{port}: {why!r}") from exc
    try:
        # client_timestamp is wall-clock ms by definition: the server compares it with its own
        # wall clock to report time_diff, so trio's clock would be the wrong one here.
        hello = Connect(
            version,
            device_flag,
            device_id if device_id is not None else uuid.uuid4().hex,
            uid,
            token,
            int(time.time() * 1000),
            public_key,
        )
        with _bounded(timeout_s, f"CONNACK from {host}:{port}"):
            await transport.send((encode(hello, decoder.version),))
            connack = await _read_connack(transport, decoder)
        if connack.reason_code != Reason.SUCCESS:
            raise ConnectRefused(connack.reason_code)
        if connack.server_version:
            # A server older than our request lays packets out at its own version.
            decoder.version = min(decoder.version, connack.server_version)
        session = None
        if encrypt:
            try:
                session = Session.from_keys(private_key, connack.server_key, connack.salt)
            except CryptoError as exc:
                raise ClientError(
                    f"server key or salt unusable ({exc}); is encryption off on the server?"
                ) from exc
    except BaseException as exc:
        await _close_quietly(transport)
        if isinstance(exc, ProtocolError):
            raise ClientError(f"bad CONNACK from {host}:{port}: {exc}") from exc
        if isinstance(exc, TRANSPORT_ERRORS):
            raise ClientError(f"connection to {host}:{port} lost during login: {exc!r}") from exc
        raise
    client = Client(
        transport,
        decoder,
        session,
        uid=uid,
        connack=connack,
        auto_ack=auto_ack,
        on_recv=on_recv,
        on_sendack=on_sendack,
    )
    if nursery is not None:
        nursery.start_soon(client.run)
    return client


@asynccontextmanager
async def open_client(
    host: str,
    port: int,
    uid: str,
    *,
    token: str = "",
    device_flag: int = 0,
    device_id: str | None = None,
    version: int = LATEST_VERSION,
    encrypt: bool = True,
    websocket: bool = False,
    auto_ack: bool = True,
    timeout_s: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    on_recv: RecvHandler | None = None,
    on_sendack: SendackHandler | None = None,
) -> AsyncIterator[Client]:
    """A connected Client whose reader runs for the duration of the block.

    Same arguments as `connect`. On exit the connection is closed and the reader stopped.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = await connect(
                host,
                port,
                uid,
                token=token,
                device_flag=device_flag,
                device_id=device_id,
                version=version,
                encrypt=encrypt,
                websocket=websocket,
                auto_ack=auto_ack,
                timeout_s=timeout_s,
                nursery=nursery,
                ssl_context=ssl_context,
                on_recv=on_recv,
                on_sendack=on_sendack,
            )
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps even a lone exception from the caller's block; hand that one back
        # as itself so `except ClientError` around the block works.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
