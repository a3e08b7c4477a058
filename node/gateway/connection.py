"""One client connection: its identity, its bounded outbound queue, and the RECVs awaiting RECVACK.

The connection object never touches a socket itself. A transport (TCP or WebSocket, transports.py) runs two
tasks per connection: a reader that decodes frames into events for the user pool, and a writer that drains
`outbound`. Everything else (pools, handlers) only calls `send_packet` / `send_frame`, which never block:
a connection whose queue is full is a client that stopped reading, and it is disconnected rather than
allowed to grow the node (its messages stay stored for sync).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

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

    def __init__(self, conn_id: int, transport: str, remote: str, *, outbound_frames: int) -> None:
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
        self.cancel_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.transport} uid={self.uid!r} flag={self.device_flag}>"

    def send_packet(self, packet: Packet) -> bool:
        """Encode at the version this client connected with and queue it; False if the connection is gone."""
        return self.send_frame(encode(packet, self.version))

    def send_frame(self, frame: bytes) -> bool:
        if self.closed.is_set():
            return False
        try:
            self._outbound_send.send_nowait(frame)
        except trio.WouldBlock:
            self.abort("outbound queue full: the client is not reading")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.sent_frames += 1
        return True

    def track_recv(self, message_id: int, frame: bytes, due: float, max_inflight: int) -> None:
        if len(self.inflight) >= max_inflight:
            # Bounded: the oldest unacknowledged RECV stops being resent; it stays stored for sync.
            oldest = next(iter(self.inflight))
            del self.inflight[oldest]
            self.dropped_recvs += 1
        self.inflight[message_id] = InflightRecv(bytes((frame[0] | FLAG_DUP,)) + frame[1:], 0, due)

    def close(self, reason_code: int | None = None, reason: str = "") -> None:
        """Close gracefully: queue a DISCONNECT (if a reason is given), then let the writer drain and stop."""
        if self.closed.is_set():
            return
        if reason_code is not None:
            try:
                self._outbound_send.send_nowait(encode(Disconnect(reason_code, reason), self.version))
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
