"""What the gateway hands to the user pool: one typed event per client packet, keyed by uid.

The SENDs of one socket read travel together, as one `SendBatch` (event type `send_batch`), and so do its
RECVACKs (`RecvackBatch`, `recvack_batch`): one queue slot and one task switch for the lot. The user pool
runs its `send` (`recvack`) chain on each event inside it.

Defined here, beside the connections they carry, so the gateway needs nothing of the pools: it submits to
whatever takes `submit`/`try_submit` (the user pool, in server.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from node.gateway.connection import Connection
from node.trace import Trace
from node.wire.protocol import Connect, Recvack, Send

CONNECT = "connect"
SEND = "send"
SEND_BATCH = "send_batch"
# A read of many small frames becomes several batches past this: a bound on one event's work.
SEND_BATCH_MAX = 256
RECVACK = "recvack"
RECVACK_BATCH = "recvack_batch"
PING = "ping"
CLOSE = "close"


@dataclass(slots=True)
class ConnectEvent:
    conn: Connection
    packet: Connect


@dataclass(slots=True)
class SendEvent:
    conn: Connection
    packet: Send
    payload: bytes = b""  # plaintext, once the decrypt step has run
    trace: Trace | None = None  # a sampled send's latency trace (node/trace.py)
    # Inside a SendBatch: where the `forward` step collects the sends it accepted (node.pools.channel
    # ChannelSend), so they reach the channel pool as one submit per channel after the whole batch.
    forwarded: list[Any] | None = None


@dataclass(slots=True)
class SendBatch:
    """The complete SENDs of one socket read (at most `SEND_BATCH_MAX`), in the order they were read."""

    conn: Connection
    sends: list[SendEvent] = field(default_factory=list)


@dataclass(slots=True)
class RecvackEvent:
    conn: Connection
    packet: Recvack


@dataclass(slots=True)
class RecvackBatch:
    """The consecutive RECVACKs of one socket read (at most `SEND_BATCH_MAX`), in the order they were read."""

    conn: Connection
    acks: list[RecvackEvent] = field(default_factory=list)


@dataclass(slots=True)
class ConnEvent:
    """ping and close carry nothing but the connection."""

    conn: Connection


class EventSink(Protocol):
    """Where client events go (the user pool): `submit` waits while the key's shard is full."""

    async def submit(self, key: str, event_type: str, event: Any) -> None: ...

    def try_submit(self, key: str, event_type: str, event: Any) -> bool: ...
