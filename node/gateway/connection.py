"""One client connection: its identity, its bounded outbound queues, and the RECVs awaiting RECVACK.

The connection object never touches a socket itself. A transport (TCP or WebSocket, transports.py) runs two
tasks per connection: a reader that decodes frames into events for the user pool, and a writer that takes
everything queued (`take_frames`) and writes it. Everything else (pools, handlers) only calls
`send_packet` / `send_frame`, which never block: a connection whose RECV queue is full (in frames) or whose
queues together hold too many bytes is a client that stopped reading, and it is disconnected rather than
allowed to grow the node (its messages stay stored for sync). The RECVs kept for resending are bounded in
count and in bytes too. Over all connections, what they hold (queued and kept for resending) is counted in a
`HeldBytes` shared by the node: past its limit the connection holding most is cut, whoever it is.

Two queues: control frames (SENDACK, PONG, SUBACK, a refused CONNACK: everything `send_packet` queues but
RECV and DISCONNECT) and the rest (RECVs of fan-out, resends, the CONNACK, a closing DISCONNECT). The writer
takes control frames first, so a sender's SENDACK never waits behind a 500-member group's RECVs queued on
the same connection. Nothing orders a SENDACK against RECVs of other messages, and RECVs stay in the one
queue in the order they were queued (message_seq order per channel).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from node.trace import Trace
from node.wire import jsonrpc
from node.wire.crypto import Session
from node.wire.protocol import FLAG_DUP, LATEST_VERSION, Disconnect, Event, Packet, Recv, encode, takes_events

log = logging.getLogger("imnode.conn")


@dataclass
class InflightRecv:
    """A RECV written but not yet acknowledged: resent with DUP until RECVACK, a bounded number of times."""

    frame: bytes
    attempts: int
    due: float


class HeldBytes:
    """The bytes every connection of a node holds together: queued to write, and RECVs kept for resending.

    Each connection adds and subtracts its own changes (an integer add per frame: the send path never
    scans). Only a frame that would take the total past `limit` looks at the connections, and cuts the
    one holding most until the frame fits: one client that stops reading or acknowledging cannot make
    the node hold more, and everyone else is served. A cut connection's bytes stop counting at once (it
    is detached), so the frames queued right after it do not cut anyone else for bytes about to be freed.
    """

    def __init__(self, limit: int, connections: Callable[[], Iterable[Connection]]) -> None:
        self.limit = limit
        self.total = 0
        self.cuts = 0
        self._connections = connections

    @classmethod
    def unbounded(cls, total: int = 0) -> HeldBytes:
        """A connection's own, counting nothing shared (a test's, or a cut connection's)."""
        held = cls(1 << 62, tuple)
        held.total = total
        return held

    def make_room(self, needed: int) -> None:
        """Cut the connections holding most until `needed` more bytes fit (or nothing is left to cut)."""
        while self.total + needed > self.limit:
            holders = [c for c in self._connections() if c.held is self and c.holding()]
            if not holders:
                return
            largest = max(holders, key=Connection.holding)
            self.cuts += 1
            largest.cut(f"the node holds over {self.limit} bytes for its clients and this one holds most")


class Connection:
    """State of one client connection, owned by the trio thread."""

    def __init__(
        self,
        conn_id: int,
        transport: str,
        remote: str,
        *,
        outbound_frames: int,
        outbound_bytes: int,
        inflight_bytes: int,
        held: HeldBytes | None = None,
    ) -> None:
        self.id = conn_id
        self.transport = transport
        self.remote = remote
        self.uid = ""
        self.device_flag = 0
        self.device_id = ""
        self.device_level = 0
        self.version = LATEST_VERSION
        self.session: Session | None = None
        # A JSON-RPC connection's codec (set by the gateway from its first message); None: the binary
        # protocol. Everything the node sends goes through `encode`, so nothing else tells them apart.
        self.jsonrpc: jsonrpc.JsonRpcCodec | None = None
        self.authenticated = False
        self.auth_done = trio.Event()
        self.closed = trio.Event()
        self.close_reason = ""
        self.inflight: dict[int, InflightRecv] = {}
        self.connected_at = trio.current_time()
        self.last_activity = self.connected_at
        self.sent_frames = 0
        self.received_frames = 0
        self.dropped_recvs = 0
        # Token bucket for SEND rate limiting (reason 22).
        self.rate_tokens = 0.0
        self.rate_stamp = self.connected_at
        self._outbound_send, self.outbound = trio.open_memory_channel[bytes](outbound_frames)
        # Bounded in bytes only (with `outbound`, by outbound_bytes): control frames answer the client's own
        # packets, and one commit answers a whole pipelined batch of its SENDs at once, so a count bound
        # would cut a client that reads. A client that stops reading still meets the byte bound.
        self.control: collections.deque[bytes] = collections.deque()
        # Set whenever a frame is queued or the connection closes: the writer waits on it when idle.
        self._writable = trio.Event()
        # Frames of a few hundred KB make a bound in frames alone worth hundreds of MB per connection.
        # Invariant: pending_bytes = bytes queued in `control` or `outbound`, or being written by the writer.
        self.outbound_bytes_max = outbound_bytes
        self.pending_bytes = 0
        self.inflight_bytes_max = inflight_bytes
        self.inflight_bytes = 0  # Invariant: the sum of len(frame) over `inflight`
        # Invariant: pending_bytes + inflight_bytes are counted in `held` (the node's, until cut).
        self.held = held if held is not None else HeldBytes.unbounded()
        self.cancel_scope: trio.CancelScope | None = None
        # Sampled latency traces waiting for the frames queued before them to reach the socket.
        self.write_traces: list[tuple[Trace, str]] = []
        self.read_at = 0.0  # time.perf_counter() of the last read from the socket
        # Message events (node/streams.py) not sent: deltas past the bound, events to a client that cannot
        # read them.
        self.dropped_deltas = 0
        self.skipped_events = 0

    def __repr__(self) -> str:
        kind = f"{self.transport}/{self.protocol}"
        return f"<Connection {self.id} {kind} uid={self.uid!r} flag={self.device_flag}>"

    @property
    def protocol(self) -> str:
        """The client protocol: binary (WuKongIM's WKProto) or jsonrpc (its JSON-RPC for light clients)."""
        return "binary" if self.jsonrpc is None else "jsonrpc"

    @property
    def has_key_exchange(self) -> bool:
        """Whether this connection's protocol encrypts payloads (binary); JSON-RPC relies on wss."""
        return self.jsonrpc is None

    @property
    def takes_events(self) -> bool:
        """Whether message events may be sent here: always over JSON-RPC; a binary client only if its
        CONNECT version can read EVENT (the 1.0.x JS SDK drops its connection on an unknown type)."""
        return self.jsonrpc is not None or takes_events(self.version)

    def encode(self, packet: Packet, version: int | None = None) -> bytes:
        """The frame of `packet` in this connection's protocol (binary: at `version`, default its own)."""
        if self.jsonrpc is not None:
            return self.jsonrpc.encode(packet)
        return encode(packet, self.version if version is None else version)

    def holding(self) -> int:
        """The bytes this connection holds: queued to write, and RECVs kept for resending."""
        return self.pending_bytes + self.inflight_bytes

    def send_packet(self, packet: Packet) -> bool:
        """Encode at the version this client connected with and queue it; False if the connection is gone.

        Everything but a RECV or a DISCONNECT is a control frame and goes ahead of queued RECVs.
        """
        frame = self.encode(packet)
        if isinstance(packet, Recv | Disconnect):
            return self.send_frame(frame)
        return self.send_control(frame)

    def send_event(self, event: Event, *, delta: bool, deltas_max: int) -> bool:
        """Queue a message event behind the RECVs already queued; False if it was not queued.

        The one way an event reaches a client: a JSON-RPC client gets it as an `event` notification (the
        EasySDKs' `customevent`), a binary client as the EVENT packet, only if it can read one
        (`takes_events`). A stream.delta is dropped (and counted) while the connection already has
        `deltas_max` frames or half its byte bound waiting to be written: a slow reader loses deltas, never
        its connection (the bounds that cut one stay out of reach of deltas), and the next snapshot or the
        terminal event carries the whole text.
        """
        if not self.takes_events:
            self.skipped_events += 1
            return False
        frame = self.encode(event)
        if delta:
            waiting = self.outbound.statistics()
            if (
                waiting.current_buffer_used >= min(deltas_max, int(waiting.max_buffer_size) // 2)
                or self.pending_bytes + len(frame) > self.outbound_bytes_max // 2
            ):
                self.dropped_deltas += 1
                return False
        return self.send_frame(frame)

    def send_control(self, frame: bytes) -> bool:
        """Queue a control frame (SENDACK, PONG...): written before any RECV already queued."""
        if not self._has_room(frame):
            return False
        self.control.append(frame)
        self._queued(frame)
        return True

    def send_frame(self, frame: bytes) -> bool:
        """Queue a frame behind the ones already queued (RECVs: their order is the order of delivery)."""
        if not self._has_room(frame):
            return False
        try:
            self._outbound_send.send_nowait(frame)
        except trio.WouldBlock:
            self.abort("outbound queue full: the client is not reading")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self._queued(frame)
        return True

    def _has_room(self, frame: bytes) -> bool:
        if self.closed.is_set():
            return False
        if self.pending_bytes + len(frame) > self.outbound_bytes_max:
            self.abort(f"outbound queue over {self.outbound_bytes_max} bytes: the client is not reading")
            return False
        if self.held.total + len(frame) > self.held.limit:
            self.held.make_room(len(frame))
            return not self.closed.is_set()  # this one may have been the one holding most
        return True

    def _queued(self, frame: bytes) -> None:
        self.pending_bytes += len(frame)
        self.held.total += len(frame)
        self.sent_frames += 1
        self._writable.set()

    def take_frames(self) -> tuple[list[bytes], int, bool]:
        """Everything queued, control frames first: (frames, their bytes, finished).

        `finished`: the connection is closed and nothing is left to write; the writer stops. Taking all
        of it makes every frame queued between two writes go out in one write (the bytes are bounded by
        `outbound_bytes_max`).
        """
        frames = list(self.control)
        self.control.clear()
        finished = False
        while True:
            try:
                frames.append(self.outbound.receive_nowait())
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                finished = True  # closed and drained (or released): whatever is in `frames` is the last
                break
        return frames, sum(map(len, frames)), finished and not frames

    async def wait_writable(self) -> None:
        """Wait until a frame is queued or the connection closes (for the writer, after `take_frames`).

        No await separates the writer's `take_frames` from this check, so a frame queued or a close in
        between cannot be missed: both set `_writable` after the event is replaced here.
        """
        if self.control or self.outbound.statistics().current_buffer_used:
            return
        self._writable = trio.Event()
        await self._writable.wait()

    def trace_next_write(self, trace: Trace, stage: str) -> None:
        """End `stage` of `trace` once everything queued so far has been handed to the socket."""
        self.write_traces.append((trace, stage))

    def written(self, nbytes: int) -> None:
        """The writer has handed `nbytes` of queued frames to the transport: they no longer count."""
        self.pending_bytes -= nbytes
        self.held.total -= nbytes

    def track_recv(self, message_id: int, frame: bytes, due: float, max_inflight: int) -> None:
        self.untrack_recv(message_id)
        dup = bytes((frame[0] | FLAG_DUP,)) + frame[1:] if self.jsonrpc is None else jsonrpc.dup(frame)
        while self.inflight and (
            len(self.inflight) >= max_inflight or self.inflight_bytes + len(dup) > self.inflight_bytes_max
        ):
            # Bounded: the oldest unacknowledged RECV stops being resent; it stays stored for sync.
            self.untrack_recv(next(iter(self.inflight)))
            self.dropped_recvs += 1
        if self.held.total + len(dup) > self.held.limit:
            self.held.make_room(len(dup))
            if self.closed.is_set():
                return  # cut for holding most: nothing to resend on a closed connection
        self.inflight[message_id] = InflightRecv(dup, 0, due)
        self.inflight_bytes += len(dup)
        self.held.total += len(dup)

    def untrack_recv(self, message_id: int) -> None:
        """Stop resending a RECV (acknowledged, given up, or replaced)."""
        item = self.inflight.pop(message_id, None)
        if item is not None:
            self.inflight_bytes -= len(item.frame)
            self.held.total -= len(item.frame)

    def release(self) -> None:
        """Drop what a finished connection still holds: queued frames and RECVs awaiting RECVACK.

        Events in flight (a SEND awaiting its commit) may keep this object alive a while; what it buffered
        must not live that long.
        """
        self.outbound.close()  # the last receive side closed: trio drops the buffered frames
        self.control.clear()
        self.held.total -= self.holding()
        self.pending_bytes = 0
        self.inflight.clear()
        self.inflight_bytes = 0

    def close(self, reason_code: int | None = None, reason: str = "") -> None:
        """Close gracefully: queue a DISCONNECT (if a reason is given), then let the writer drain and stop."""
        if self.closed.is_set():
            return
        if reason_code is not None:
            frame = self.encode(Disconnect(reason_code, reason))
            try:
                self._outbound_send.send_nowait(frame)
                self.pending_bytes += len(frame)
                self.held.total += len(frame)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        self.close_reason = reason or self.close_reason or "closed"
        self.closed.set()
        self._outbound_send.close()
        self._writable.set()

    def cut(self, reason: str) -> None:
        """Abort, and stop counting what this connection holds in the node's total at once: it is freed
        when the connection's task ends, a few scheduling steps later (`release`)."""
        self.held.total -= self.holding()
        self.held = HeldBytes.unbounded(self.holding())
        self.abort(reason)

    def abort(self, reason: str) -> None:
        """Close at once, without draining (a peer that does not read would never let the writer finish)."""
        log.info("%r aborted: %s", self, reason)
        self.close_reason = reason
        self.closed.set()
        self._outbound_send.close()
        self._writable.set()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
