"""What the gateway hands to the user pool: one typed event per client packet, keyed by uid.

Defined here, beside the connections they carry, so the gateway needs nothing of the pools: it submits to
whatever takes `submit`/`try_submit` (the user pool, in server.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from node.gateway.connection import Connection
from node.trace import Trace
from node.wire.protocol import Connect, Recvack, Send

CONNECT = "connect"
SEND = "send"
RECVACK = "recvack"
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


@dataclass(slots=True)
class RecvackEvent:
    conn: Connection
    packet: Recvack


@dataclass(slots=True)
class ConnEvent:
    """ping and close carry nothing but the connection."""

    conn: Connection


class EventSink(Protocol):
    """Where client events go (the user pool): `submit` waits while the key's shard is full."""

    async def submit(self, key: str, event_type: str, event: Any) -> None: ...

    def try_submit(self, key: str, event_type: str, event: Any) -> bool: ...
