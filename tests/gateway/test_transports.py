"""TcpTransport writes plain TCP on the socket itself: no scheduler round when the kernel takes the bytes,
every byte still written when it has to wait, a closed connection still a transport error."""

from __future__ import annotations

import pytest
import trio

from node.gateway.transports import TRANSPORT_ERRORS, TcpTransport


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_a_write_the_kernel_takes_costs_no_scheduler_round() -> None:
    ours, peer = await socket_pair()
    async with ours, peer:
        transport = TcpTransport(ours)
        # A cancelled scope makes every checkpoint raise: the write goes through without one.
        with trio.CancelScope() as scope:
            scope.cancel()
            await transport.send([b"one", b"two"])
        assert not scope.cancelled_caught
        assert await peer.receive_some(100) == b"onetwo"


async def test_a_write_larger_than_the_socket_buffer_waits_and_arrives_whole() -> None:
    ours, peer = await socket_pair()
    transport = TcpTransport(ours)
    frames = [bytes([i]) * 1_000_000 for i in range(4)]
    received = bytearray()

    async def read_all() -> None:
        while len(received) < 4_000_000:
            received.extend(await peer.receive_some(1 << 16))

    async with ours, peer:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await transport.send(frames)
        assert bytes(received) == b"".join(frames)


async def test_writing_to_a_gone_peer_or_a_closed_transport_is_a_transport_error() -> None:
    ours, peer = await socket_pair()
    transport = TcpTransport(ours)
    await peer.aclose()
    with pytest.raises(TRANSPORT_ERRORS):
        for _ in range(100):  # the first write may still be taken before the peer's close is seen
            await transport.send([b"x" * 65536])
    await transport.aclose()
    with pytest.raises(TRANSPORT_ERRORS):
        await transport.send([b"after close"])
