"""TCP and WebSocket listeners: bytes in, typed events to the user pool; queued frames out.

Per connection there are two tasks: the reader decodes frames (partial and coalesced reads alike) and hands
events to the user pool, waiting when the pool is full (backpressure on this one client); the writer drains
the connection's bounded queues (control frames such as SENDACK first), coalescing frames into one write on
TCP and sending exactly one frame per message on WebSocket (the JS SDK mishandles several frames in one
message).

A client must send CONNECT within `connect_timeout_s` and then something (a PING at least) within every
`idle_timeout_s`. Bad bytes get a close; nothing else is affected. None of these closes sends a DISCONNECT:
as in WuKongIM, a DISCONNECT means a kick (reason 12), and the SDKs stop reconnecting after one (the JS SDK
after any DISCONNECT, the Android SDK treats it as a kick), so a client cut for a timeout must only see
the socket close and reconnect.

On WebSocket, a connection whose first message is text or starts with `{` or `[` speaks JSON-RPC
(node/wire/jsonrpc.py, the EasySDKs' protocol) unless `cluster.jsonrpc` is off: from then on its codec
turns messages into the same packets and encodes what the node sends, and everything else is the same.
A malformed JSON-RPC request is answered with an error and the connection goes on; before `connect` the
answer is followed by a close.

Past `connections_per_node` or `connections_per_address` (peer host, WebSocket included), a new connection
is answered its CONNECT with CONNACK reason 22 (rate limit: the SDKs report it and retry later, where an
auth failure would make them give up on the credentials) and closed, without reaching the user pool. At
most `REFUSING_MAX` such connections wait for their CONNECT, for at most `REFUSE_WAIT_S`; beyond that they
are closed at once.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import trio
import trio_websocket

from node.config import Tuning
from node.gateway import events as ev
from node.gateway.connection import Connection, HeldBytes
from node.gateway.registry import Registry, peer_host
from node.gateway.transports import TRANSPORT_ERRORS, TcpTransport, Transport, WebSocketTransport
from node.trace import Tracer
from node.wire.jsonrpc import JsonRpcCodec, looks_like_jsonrpc
from node.wire.protocol import (
    Connack,
    Connect,
    Disconnect,
    FrameDecoder,
    FrameTooLarge,
    Ping,
    ProtocolError,
    Reason,
    Recvack,
    Send,
    Sub,
    Suback,
    encode,
    negotiate_version,
)

log = logging.getLogger("imnode.gateway")

# Connections over a connection limit kept open to answer their CONNECT with a refusal: bounded in number
# and time, so a flood past the limits costs the node a few tasks, not one per connection attempt.
REFUSING_MAX: Final = 64
REFUSE_WAIT_S: Final = 2.0
# A refused connection's CONNECT is small (uid, token, key); nothing larger is buffered for it.
REFUSED_FRAME_MAX: Final = 16 << 10


class _Closed(Exception):
    """The peer closed its side."""


class OriginCheck(Protocol):
    def allows(self, origin: str | None) -> bool: ...


class Gateway:
    def __init__(
        self,
        tuning: Tuning,
        registry: Registry,
        user_events: ev.EventSink,
        tracer: Tracer | None = None,
        *,
        ws_origins: OriginCheck | None = None,
        jsonrpc: bool = True,
    ) -> None:
        self.tuning = tuning
        # Whether WebSocket clients may speak JSON-RPC (cluster.jsonrpc).
        self.jsonrpc = jsonrpc
        self.jsonrpc_accepted = 0
        # Which pages may open a WebSocket connection (node/api/guard.py); None: any.
        self.ws_origins = ws_origins
        self.tracer = tracer or Tracer(0)
        self.registry = registry
        self.user_events = user_events
        self.accepted = 0
        self.protocol_errors = 0
        self.connect_timeouts = 0
        self.idle_timeouts = 0
        self.refused_connections = 0
        self._refusing = 0
        # Shared by every connection: what they hold together, bounded by held_bytes_per_node.
        self.held = HeldBytes(tuning.held_bytes_per_node, registry.by_id.values)
        self.origins_refused = 0

    # -- listeners ---------------------------------------------------------------------------------------
    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The binary protocol on TCP, or on TLS over TCP with `ssl_context`.

        The TLS handshake runs on the connection's first read, so `connect_timeout_s` bounds it together
        with the CONNECT that follows.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        kind = "tcp" if ssl_context is None else "tls"

        async def handler(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()
                wrapped: trio.abc.Stream = stream
                if ssl_context is not None:
                    wrapped = trio.SSLStream(stream, ssl_context, server_side=True)
                await self.serve(TcpTransport(wrapped), kind, f"{peer[0]}:{peer[1]}")
            except OSError:
                pass  # the peer went away before we looked (ENOTCONN): nothing to serve
            except Exception:
                # One connection's failure must never reach the listener's nursery (it would stop the node).
                log.exception("tcp connection failed")

        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            await trio.serve_listeners(handler, listeners, handler_nursery=nursery)

    async def serve_ws(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """WebSocket on plain TCP listeners: every connection, its handshake included, in its own nursery.

        (trio-websocket's own server lets a failed handshake escape into the server's nursery, which would
        stop the node when a client sends a bad upgrade and resets.) With `ssl_context` it is wss: the TLS
        handshake runs inside the same `connect_timeout_s` as the WebSocket upgrade.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        kind = "ws" if ssl_context is None else "wss"

        async def handler(stream: trio.SocketStream) -> None:
            wrapped: trio.abc.Stream = stream
            if ssl_context is not None:
                wrapped = trio.SSLStream(stream, ssl_context, server_side=True)
            try:
                async with trio.open_nursery() as nursery:
                    with trio.move_on_after(self.tuning.connect_timeout_s) as handshake:
                        if isinstance(wrapped, trio.SSLStream):
                            # The TLS handshake first, on its own: a plain-TCP client or an old TLS
                            # version fails it at once and is closed (as on tcp_tls), where trio-websocket
                            # would wait for an upgrade request until the connect timeout.
                            await wrapped.do_handshake()
                        request = await trio_websocket.wrap_server_stream(
                            nursery, wrapped, max_message_size=self.tuning.max_frame_bytes + 16
                        )
                        origin = _header(request.headers, "origin")
                        if self.ws_origins is not None and not self.ws_origins.allows(origin):
                            # A page on another origin must not log in as anyone through the browser.
                            self.origins_refused += 1
                            await request.reject(
                                403,
                                body=f"origin {origin} may not connect: list it in "
                                "cluster.ws_allowed_origins".encode("latin-1", "replace"),
                            )
                            nursery.cancel_scope.cancel()
                            return
                        ws = await request.accept()
                    if handshake.cancelled_caught:
                        self.connect_timeouts += 1
                        nursery.cancel_scope.cancel()
                        return
                    remote = getattr(stream.socket, "getpeername", lambda: ("?", 0))()
                    transport = WebSocketTransport(ws, text_allowed=self.jsonrpc)
                    await self.serve(transport, kind, f"{remote[0]}:{remote[1]}")
                    nursery.cancel_scope.cancel()
            except (
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ):
                pass  # the peer broke the WebSocket protocol or went away: its connection only
            except Exception:
                # One connection's failure must never reach the listener's nursery (it would stop the node).
                log.exception("websocket connection failed")
            finally:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    try:
                        await wrapped.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass  # TLS: the peer broke the connection; the socket is closed all the same

        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            await trio.serve_listeners(handler, listeners, handler_nursery=nursery)

    # -- one connection ----------------------------------------------------------------------------------
    async def serve(self, transport: Transport, kind: str, remote: str) -> None:
        over = self._over_connection_limit(remote)
        if over:
            await self._refuse(transport, remote, over)
            return
        conn = Connection(
            self.registry.next_id(),
            kind,
            remote,
            outbound_frames=self.tuning.outbound_queue_frames,
            outbound_bytes=self.tuning.outbound_queue_bytes,
            inflight_bytes=self.tuning.recv_inflight_bytes,
            held=self.held,
        )
        self.registry.add(conn)
        self.accepted += 1
        try:
            async with trio.open_nursery() as nursery:
                conn.cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop, conn, transport, nursery.cancel_scope)
                await self._read_loop(conn, transport)
                conn.close()  # let the writer drain what is queued (a DISCONNECT, a last SENDACK)
                with trio.move_on_after(5):
                    await conn.closed.wait()
        finally:
            conn.closed.set()
            self.registry.remove(conn)
            conn.release()
            if conn.authenticated:
                # Ordered after this uid's other events in its shard; try_submit so a full pool can't
                # keep a dead connection's task alive (the registry entry is already gone).
                self.user_events.try_submit(conn.uid, ev.CLOSE, ev.ConnEvent(conn))
            await _close_quietly(transport)

    def _over_connection_limit(self, remote: str) -> str:
        """Which connection limit a new connection from `remote` is past ("" if none)."""
        if len(self.registry) >= self.tuning.connections_per_node:
            return f"connections_per_node ({self.tuning.connections_per_node})"
        if self.registry.of_address(peer_host(remote)) >= self.tuning.connections_per_address:
            return f"connections_per_address ({self.tuning.connections_per_address})"
        return ""

    async def _refuse(self, transport: Transport, remote: str, limit: str) -> None:
        """Answer the CONNECT of a connection past a limit with CONNACK reason 22, then close it."""
        self.refused_connections += 1
        log.info("connection from %s refused: past %s", remote, limit)
        try:
            if self._refusing >= REFUSING_MAX:
                return  # already answering as many as we keep: close at once
            self._refusing += 1
            try:
                decoder: FrameDecoder | JsonRpcCodec = FrameDecoder(max_remaining=REFUSED_FRAME_MAX)
                with trio.move_on_after(min(REFUSE_WAIT_S, self.tuning.connect_timeout_s)):
                    packet = None
                    while packet is None:
                        data = await transport.receive()
                        if not data:
                            return
                        if isinstance(transport, WebSocketTransport) and transport.text_allowed:
                            # A JSON-RPC client gets its refusal as a `connect` result (its errors: none).
                            if len(data) > REFUSED_FRAME_MAX:
                                return
                            if transport.received_text or looks_like_jsonrpc(data):
                                transport.text = True
                                decoder = JsonRpcCodec(lambda _error: None)
                            transport.text_allowed = False
                        decoder.feed(data)
                        packet = decoder.next_packet()
                    if isinstance(packet, Connect):
                        version = negotiate_version(packet.version)
                        refusal = Connack(time_diff=0, reason_code=Reason.RATE_LIMIT, server_version=version)
                        frame = decoder.encode(refusal) if isinstance(decoder, JsonRpcCodec) else None
                        await transport.send([frame or encode(refusal, version)])
            except (ProtocolError, *TRANSPORT_ERRORS):
                pass  # a bad or vanished peer: it is being closed anyway
            finally:
                self._refusing -= 1
        finally:
            await _close_quietly(transport)

    async def _write_loop(self, conn: Connection, transport: Transport, scope: trio.CancelScope) -> None:
        """Write everything queued since the last write in one `transport.send`, control frames first.

        On TCP that is one `send_all` per wake-up; on WebSocket one message per frame. No timer: a frame
        queued to an idle connection is written as soon as this task runs.
        """
        try:
            while True:
                frames, size, finished = conn.take_frames()
                if not frames:
                    if finished:
                        break
                    await conn.wait_writable()
                    continue
                # Every frame queued so far is in this write, so every trace waiting for one ends with it;
                # traces added while it is in progress wait for the next.
                traces, conn.write_traces = conn.write_traces, []
                await transport.send(frames)
                conn.written(size)
                for trace, stage in traces:
                    trace.finish(stage)
        except TRANSPORT_ERRORS:
            pass
        finally:
            scope.cancel()

    async def _read_loop(self, conn: Connection, transport: Transport) -> None:
        decoder: FrameDecoder | JsonRpcCodec = FrameDecoder(max_remaining=self.tuning.max_frame_bytes)
        undecided = isinstance(transport, WebSocketTransport) and transport.text_allowed

        def buffered_packet() -> Any:
            """The next packet already received in full, or None (never reads)."""
            packet = decoder.next_packet()
            if packet is not None:
                conn.received_frames += 1
            return packet

        async def next_packet() -> Any:
            while True:
                packet = buffered_packet()
                if packet is not None:
                    return packet
                data = await transport.receive()
                if not data:
                    raise _Closed
                conn.read_at = time.perf_counter()  # the latency trace starts from the read
                nonlocal decoder, undecided
                if undecided:
                    undecided = False
                    assert isinstance(transport, WebSocketTransport)
                    decoder = self._choose_protocol(conn, transport, data) or decoder
                decoder.feed(data)

        try:
            with trio.move_on_after(self.tuning.connect_timeout_s):
                first = await next_packet()
            if not conn.received_frames:
                self.connect_timeouts += 1
                conn.close(None, "no CONNECT in time")
                return
            if not isinstance(first, Connect):
                conn.close(None, "the first packet must be CONNECT")
                return
            decoder.version = negotiate_version(first.version)
            await self.user_events.submit(first.uid, ev.CONNECT, ev.ConnectEvent(conn, first))
            with trio.move_on_after(self.tuning.handler_timeout_s * 4):
                await conn.auth_done.wait()
            if not conn.authenticated:
                return
            await self._serve_packets(conn, next_packet, buffered_packet)
        except FrameTooLarge as exc:
            self.protocol_errors += 1
            conn.close(None, str(exc))
        except ProtocolError as exc:
            self.protocol_errors += 1
            conn.close(None, f"protocol error: {exc}")
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _choose_protocol(
        self, conn: Connection, transport: WebSocketTransport, first: bytes
    ) -> JsonRpcCodec | None:
        """From a WebSocket connection's first message: its JSON-RPC codec, or None (binary, text refused)."""
        if not (transport.received_text or looks_like_jsonrpc(first)):
            transport.text_allowed = False
            return None
        transport.text = True
        codec = JsonRpcCodec(conn.send_control)
        conn.jsonrpc = codec
        self.jsonrpc_accepted += 1
        return codec

    async def _serve_packets(
        self,
        conn: Connection,
        next_packet: Callable[[], Awaitable[Any]],
        buffered_packet: Callable[[], Any],
    ) -> None:
        """Hand every packet of a read to the user pool, the SENDs and the RECVACKs among them as batches.

        A run of consecutive SENDs (or RECVACKs) of one read goes as one event (up to SEND_BATCH_MAX); any
        other packet first submits the batch before it, so the user shard sees this connection's packets
        in the order read.
        """
        while not conn.closed.is_set():
            with trio.move_on_after(self.tuning.idle_timeout_s):
                packet = await next_packet()
                conn.last_activity = trio.current_time()
                batch = _ReadBatch(conn, self.user_events)
                while packet is not None:
                    if isinstance(packet, Send):
                        trace = self.tracer.start("send", conn.read_at)
                        if trace is not None:
                            trace.mark("decode")
                        await batch.add_send(ev.SendEvent(conn, packet, trace=trace))
                    elif isinstance(packet, Recvack):
                        await batch.add_recvack(ev.RecvackEvent(conn, packet))
                    else:
                        await batch.submit()
                        if not await self._serve_packet(conn, packet):
                            return
                    if conn.closed.is_set():
                        break  # closed meanwhile (kicked, cut off): the rest of the read goes unread
                    try:
                        packet = buffered_packet()
                    except ProtocolError:
                        # The frames before the bad one were read and are answered, as if read alone.
                        await batch.submit()
                        raise
                await batch.submit()
                continue
            self.idle_timeouts += 1
            conn.close(None, "idle timeout")
            return

    async def _serve_packet(self, conn: Connection, packet: Any) -> bool:
        """One packet other than SEND or RECVACK; False when the connection is done (the client left)."""
        pool = self.user_events
        if isinstance(packet, Ping):
            await pool.submit(conn.uid, ev.PING, ev.ConnEvent(conn))
        elif isinstance(packet, Disconnect):
            conn.close()
            return False
        elif isinstance(packet, Sub):
            conn.send_packet(
                Suback(
                    packet.sub_no,
                    packet.channel_id,
                    packet.channel_type,
                    packet.action,
                    Reason.NOT_SUPPORT_CHANNEL_TYPE,
                )
            )
        else:
            raise ProtocolError(f"unexpected {type(packet).__name__} from a client")
        return True

    def statistics(self) -> dict[str, int]:
        return {
            "connections": len(self.registry),
            "online_users": self.registry.online_users(),
            "accepted": self.accepted,
            "protocol_errors": self.protocol_errors,
            "connect_timeouts": self.connect_timeouts,
            "idle_timeouts": self.idle_timeouts,
            "refused_connections": self.refused_connections,
            "held_bytes": self.held.total,
            "held_bytes_cuts": self.held.cuts,
            "ws_origins_refused": self.origins_refused,
            "jsonrpc_accepted": self.jsonrpc_accepted,
        }


def _header(headers: Any, name: str) -> str | None:
    """A header of a WebSocket upgrade request (trio-websocket gives (name, value) pairs)."""
    for key, value in headers:
        key = key.decode("latin-1") if isinstance(key, bytes) else key
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


class _ReadBatch:
    """The run of SENDs or of RECVACKs being gathered from one read; submitted when the kind changes."""

    def __init__(self, conn: Connection, sink: ev.EventSink) -> None:
        self._conn = conn
        self._sink = sink
        self._sends: list[ev.SendEvent] = []
        self._acks: list[ev.RecvackEvent] = []

    async def add_send(self, send: ev.SendEvent) -> None:
        if self._acks:
            await self.submit()
        self._sends.append(send)
        if len(self._sends) >= ev.SEND_BATCH_MAX:
            await self.submit()

    async def add_recvack(self, ack: ev.RecvackEvent) -> None:
        if self._sends:
            await self.submit()
        self._acks.append(ack)
        if len(self._acks) >= ev.SEND_BATCH_MAX:
            await self.submit()

    async def submit(self) -> None:
        uid = self._conn.uid
        if self._sends:
            sends, self._sends = self._sends, []
            await self._sink.submit(uid, ev.SEND_BATCH, ev.SendBatch(self._conn, sends))
        if self._acks:
            acks, self._acks = self._acks, []
            await self._sink.submit(uid, ev.RECVACK_BATCH, ev.RecvackBatch(self._conn, acks))


async def _close_quietly(transport: Transport) -> None:
    """Close a transport even while cancelled (shielded, bounded); a peer already gone is no error."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await transport.aclose()
        except TRANSPORT_ERRORS:
            pass
