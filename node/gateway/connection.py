"""One client connection: its identity, its bounded outbound queue, and the RECVs awaiting RECVACK.

The connection object never touches a socket itself. A transport (TCP or WebSocket, transports.py) runs two
tasks per connection: a reader that decodes frames into events for the user pool, and a writer that drains
`outbound`. Everything else (pools, handlers) only calls `send_packet` / `send_frame`, which never block:
a connection whose queue is full (in frames or in bytes) is a client that stopped reading, and it is
disconnected rather than allowed to grow the node (its messages stay stored for sync). The RECVs kept for
resending are bounded in count and in bytes too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from node.trace import Trace
from node.wire.crypto import Session
from node.wire.protocol import FLAG_DUP, LATEST_VERSION, Disconnect, Packet, encode

log = logging.getLogger("imnode.conn")


@dataclass
class InflightRecv:
    """A RECV written but not yet acknowledged: resent with DUP until RECVACK, a bounded number of times."""

    frame: bytes
    attempts: int
    due: float


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
        # Frames of a few hundred KB make a bound in frames alone worth hundreds of MB per connection.
        # Invariant: pending_bytes = bytes queued in `outbound` or being written by the writer.
        self.outbound_bytes_max = outbound_bytes
        self.pending_bytes = 0
        self.inflight_bytes_max = inflight_bytes
        self.inflight_bytes = 0  # Invariant: the sum of len(frame) over `inflight`
        self.cancel_scope: trio.CancelScope | None = None
        # Sampled latency traces waiting for the frames queued before them to reach the socket.
        self.write_traces: list[tuple[Trace, str]] = []
        self.read_at = 0.0  # time.perf_counter() of the last read from the socket

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.transport} uid={self.uid!r} flag={self.device_flag}>"

    def send_packet(self, packet: Packet) -> bool:
        """Encode at the version this client connected with and queue it; False if the connection is gone."""
        return self.send_frame(encode(packet, self.version))

    def send_frame(self, frame: bytes) -> bool:
        if self.closed.is_set():
            return False
        if self.pending_bytes + len(frame) > self.outbound_bytes_max:
            self.abort(f"outbound queue over {self.outbound_bytes_max} bytes: the client is not reading")
            return False
        try:
            self._outbound_send.send_nowait(frame)
        except trio.WouldBlock:
            self.abort("outbound queue full: the client is not reading")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.pending_bytes += len(frame)
        self.sent_frames += 1
        return True

    def trace_next_write(self, trace: Trace, stage: str) -> None:
        """End `stage` of `trace` once everything queued so far has been handed to the socket."""
        self.write_traces.append((trace, stage))

    def written(self, nbytes: int) -> None:
        """The writer has handed `nbytes` of queued frames to the transport: they no longer count."""
        self.pending_bytes -= nbytes

    def track_recv(self, message_id: int, frame: bytes, due: float, max_inflight: int) -> None:
        self.untrack_recv(message_id)
        dup = bytes((frame[0] | FLAG_DUP,)) + frame[1:]
        while self.inflight and (
            len(self.inflight) >= max_inflight or self.inflight_bytes + len(dup) > self.inflight_bytes_max
        ):
            # Bounded: the oldest unacknowledged RECV stops being resent; it stays stored for sync.
            self.untrack_recv(next(iter(self.inflight)))
            self.dropped_recvs += 1
        self.inflight[message_id] = InflightRecv(dup, 0, due)
        self.inflight_bytes += len(dup)

    def untrack_recv(self, message_id: int) -> None:
        """Stop resending a RECV (acknowledged, given up, or replaced)."""
        item = self.inflight.pop(message_id, None)
        if item is not None:
            self.inflight_bytes -= len(item.frame)

    def release(self) -> None:
        """Drop what a finished connection still holds: queued frames and RECVs awaiting RECVACK.

        Events in flight (a SEND awaiting its commit) may keep this object alive a while; what it buffered
        must not live that long.
        """
        self.outbound.close()  # the last receive side closed: trio drops the buffered frames
        self.pending_bytes = 0
        self.inflight.clear()
        self.inflight_bytes = 0

    def close(self, reason_code: int | None = None, reason: str = "") -> None:
        """Close gracefully: queue a DISCONNECT (if a reason is given), then let the writer drain and stop."""
        if self.closed.is_set():
            return
        if reason_code is not None:
            frame = encode(Disconnect(reason_code, reason), self.version)
            try:
                self._outbound_send.send_nowait(frame)
                self.pending_bytes += len(frame)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        self.close_reason = reason or self.close_reason or "closed"
        self.closed.set()
        self._outbound_send.close()

    def abort(self, reason: str) -> None:
        """Close at once, without draining (a peer that does not read would never let the writer finish)."""
        log.info("%r aborted: %s", self, reason)
        self.close_reason = reason
        self.closed.set()
        self._outbound_send.close()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
