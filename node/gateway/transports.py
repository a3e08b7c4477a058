"""Byte transports under a connection, TCP and WebSocket: the gateway's and the client library's alike.

A transport moves whole frames out and some bytes in; it knows nothing of packets (the decoder in
node/wire does that). WebSocket carries exactly one frame per message, in both directions: the JS SDK
mishandles several frames in one message, and imnode's own client does the same as the SDKs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final, Protocol

import trio
import trio_websocket

from node.wire.protocol import ProtocolError

READ_BYTES: Final = 64 << 10

# What a transport raises when its peer goes away or breaks the framing: a connection's end, not a bug.
TRANSPORT_ERRORS: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    trio_websocket.ConnectionClosed,
)


class Transport(Protocol):
    async def receive(self) -> bytes:
        """Some bytes, or b"" once the peer has closed."""
        ...

    async def send(self, frames: Sequence[bytes]) -> None: ...

    async def aclose(self) -> None: ...


class TcpTransport:
    """TCP, or TLS over TCP (a trio.SSLStream)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # Plain TCP is written on the socket itself: trio's SocketStream passes two checkpoints (a
        # scheduler round at least) around every write, even one the kernel takes at once, and that
        # round cost more Python calls than the frames' own work. The writer yields while it waits for
        # its next frames anyway. TLS goes through its stream. Reads stay on the stream: a reader that
        # never yields merges a client's large sends into fewer entries, whose RECVs then arrive at once.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def receive(self) -> bytes:
        return bytes(await self.stream.receive_some(READ_BYTES))

    async def send(self, frames: Sequence[bytes]) -> None:
        # Coalesced: one write for a batch of frames (the stream has no message boundaries anyway).
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        sock = self._socket
        if sock is None:
            await self.stream.send_all(data)
            return
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += os.write(sock.fileno(), view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)

    async def aclose(self) -> None:
        await self.stream.aclose()


class WebSocketTransport:
    """`stream`: the byte stream under `ws`, when closing the transport must close it too (the client's:
    trio-websocket leaves it open when the peer closed the TCP connection without a closing handshake)."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        stream: trio.abc.Stream | None = None,
        *,
        text_allowed: bool = False,
    ) -> None:
        self.ws = ws
        self.stream = stream
        # JSON-RPC (node/wire/jsonrpc.py) comes in text messages: allowed until the gateway has found
        # the connection binary; `text`: frames go out as text messages (the JSON-RPC clients parse text).
        self.text_allowed = text_allowed
        self.text = False
        self.received_text = False

    async def receive(self) -> bytes:
        try:
            message = await self.ws.get_message()
        except trio_websocket.ConnectionClosed:
            return b""
        if isinstance(message, str):
            if not self.text_allowed:
                raise ProtocolError("text WebSocket message: the protocol is binary")
            self.received_text = True
            return message.encode()
        return bytes(message)

    async def send(self, frames: Sequence[bytes]) -> None:
        for frame in frames:
            await self.ws.send_message(frame.decode() if self.text else frame)

    async def aclose(self) -> None:
        try:
            await self.ws.aclose()
        finally:
            if self.stream is not None:
                await trio.aclose_forcefully(self.stream)
