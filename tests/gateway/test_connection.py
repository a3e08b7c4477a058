"""node/gateway/connection.py and the writer of listeners.py with a fake transport: queue order, bounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from node.config import Tuning
from node.gateway.connection import Connection
from node.gateway.listeners import Gateway
from node.gateway.registry import Registry
from node.trace import Tracer
from node.wire.protocol import Event, Pong, Sendack, encode


class RecordingTransport:
    """Records each `send` call's frames; `gate` holds a send until set (a slow socket)."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.gate = trio.Event()
        self.gate.set()

    async def receive(self) -> bytes:
        await trio.sleep_forever()

    async def send(self, frames: Sequence[bytes]) -> None:
        await self.gate.wait()
        self.writes.append(list(frames))

    async def aclose(self) -> None:
        pass


def connection(frames: int = 16, nbytes: int = 1 << 20) -> Connection:
    return Connection(
        1, "tcp", "127.0.0.1:1", outbound_frames=frames, outbound_bytes=nbytes, inflight_bytes=1 << 20
    )


def gateway() -> Gateway:
    no_events: Any = object()  # the writer never submits events
    return Gateway(Tuning(), Registry(), no_events, Tracer(0))


async def test_control_frames_go_first_and_everything_queued_goes_in_one_write() -> None:
    conn = connection()
    transport = RecordingTransport()
    ack = encode(Sendack(1, 1, 1, 1), conn.version)
    pong = encode(Pong(), conn.version)
    async with trio.open_nursery() as nursery:
        assert conn.send_frame(b"recv-1") and conn.send_frame(b"recv-2")
        assert conn.send_packet(Sendack(1, 1, 1, 1)) and conn.send_packet(Pong())
        nursery.start_soon(gateway()._write_loop, conn, transport, nursery.cancel_scope)
        await trio.testing.wait_all_tasks_blocked()
        assert transport.writes == [[ack, pong, b"recv-1", b"recv-2"]]
        assert conn.pending_bytes == 0
        # While a write is in progress, a SENDACK queued behind fan-out overtakes it in the next write.
        transport.gate = trio.Event()
        conn.send_frame(b"recv-3")
        await trio.testing.wait_all_tasks_blocked()
        conn.send_frame(b"recv-4")
        conn.send_packet(Sendack(2, 2, 2, 1))
        transport.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert transport.writes[1:] == [[b"recv-3"], [encode(Sendack(2, 2, 2, 1), conn.version), b"recv-4"]]
        # A close drains what is queued, the closing DISCONNECT last, and ends the writer.
        conn.send_packet(Pong())
        conn.close(1, "bye")
        await trio.testing.wait_all_tasks_blocked()
        assert transport.writes[-1][0] == pong and len(transport.writes[-1]) == 2
    assert conn.pending_bytes == 0


async def test_a_client_that_stops_reading_is_cut_by_either_queue() -> None:
    # A burst of control frames (one commit acknowledging a pipelined batch) is bounded in bytes, not count.
    conn = connection(frames=4)
    for _ in range(40):
        assert conn.send_packet(Pong())
    assert not conn.closed.is_set()

    conn = connection(frames=4)
    for _ in range(4):
        assert conn.send_frame(b"r")
    assert not conn.send_frame(b"r")
    assert "outbound queue full" in conn.close_reason

    conn = connection(nbytes=100)
    assert conn.send_frame(b"x" * 60)
    assert not conn.send_control(b"y" * 50)  # the byte bound counts both queues
    assert conn.closed.is_set() and "bytes" in conn.close_reason
    conn.release()
    assert conn.pending_bytes == 0 and not conn.control


async def test_events_go_only_to_clients_that_read_them_and_deltas_are_bounded_per_connection() -> None:
    delta = Event("d", "stream.delta", 1, b"{}")
    old = connection(frames=64)
    old.version = 2  # the 1.0.x JS SDK: no decoder for EVENT
    assert not old.send_event(delta, delta=False, deltas_max=10) and old.skipped_events == 1
    assert old.pending_bytes == 0
    conn = connection(frames=64)
    taken = [conn.send_event(delta, delta=True, deltas_max=3) for _ in range(5)]
    assert taken == [True, True, True, False, False] and conn.dropped_deltas == 2
    # A persisted event (a snapshot, the finish) is never dropped for the bound: it carries the text.
    assert conn.send_event(Event("f", "stream.finish", 2, b"{}"), delta=False, deltas_max=3)
    frames, nbytes, _ = conn.take_frames()
    assert frames == [encode(delta, 5)] * 3 + [encode(Event("f", "stream.finish", 2, b"{}"), 5)]
    conn.written(nbytes)  # the client read everything: deltas flow again
    assert conn.send_event(delta, delta=True, deltas_max=3)
    # Large deltas to a client that does not read: dropped at half the byte bound, the connection kept.
    big = Event("d", "stream.delta", 1, b"x" * 30)
    slow = connection(frames=64, nbytes=200)
    taken = [slow.send_event(big, delta=True, deltas_max=1000) for _ in range(10)]
    assert taken[0] and not all(taken) and slow.dropped_deltas > 0
    assert not slow.closed.is_set() and slow.pending_bytes <= 100
