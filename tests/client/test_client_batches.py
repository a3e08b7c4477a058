"""The client's batch paths (what `imnode bench` runs on): RECVs handled a whole read at a time, SENDs
pipelined in one write, SENDACKs and RECVs handed to handlers. Against a scripted server on a real socket,
so each test decides exactly which bytes arrive in one read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from node.client import ClientError, open_client
from node.client.client import Client, RecvHandler, SendackHandler
from node.wire.crypto import Session, generate_keypair, random_salt
from node.wire.protocol import (
    LATEST_VERSION,
    Connack,
    Connect,
    FrameDecoder,
    Packet,
    Reason,
    Recv,
    Recvack,
    Send,
    Sendack,
    encode,
)

TIMEOUT_S = 10.0


@dataclass
class Peer:
    """The server's end of one logged-in client connection."""

    stream: trio.SocketStream
    session: Session
    decoder: FrameDecoder

    async def packets(self, count: int) -> list[Packet]:
        found: list[Packet] = []
        with trio.fail_after(TIMEOUT_S):
            while len(found) < count:
                while (packet := self.decoder.next_packet()) is not None:
                    found.append(packet)
                if len(found) < count:
                    data = await self.stream.receive_some(65536)
                    assert data, f"the client closed after {len(found)} of {count} packets"
                    self.decoder.feed(data)
        return found

    def recv_frame(self, message_id: int, plaintext: bytes, *, tamper: bool = False) -> bytes:
        payload = self.session.encrypt(plaintext)
        args = (message_id, message_id, f"cmn-{message_id}", 1700000000, "alice", "alice", 1, payload)
        msg_key = self.session.recv_msg_key(*args)
        if tamper:
            msg_key = ("0" if msg_key[0] != "0" else "1") + msg_key[1:]
        recv = Recv(
            0, msg_key, "alice", "alice", 1, f"cmn-{message_id}", message_id, message_id, 1700000000, payload
        )
        return encode(recv, LATEST_VERSION)


async def _serve_one(listener: trio.SocketListener, peers: trio.MemorySendChannel[Peer]) -> None:
    stream = await listener.accept()
    decoder = FrameDecoder()
    with trio.fail_after(TIMEOUT_S):
        while (hello := decoder.next_packet()) is None:
            decoder.feed(await stream.receive_some(65536))
    assert isinstance(hello, Connect)
    private_key, public_key = generate_keypair()
    salt = random_salt()
    session = Session.from_keys(private_key, hello.client_key, salt)
    await stream.send_all(encode(Connack(0, Reason.SUCCESS, public_key, salt), LATEST_VERSION))
    await peers.send(Peer(stream, session, decoder))


@asynccontextmanager
async def scripted(
    on_recv: RecvHandler | None = None, on_sendack: SendackHandler | None = None
) -> AsyncIterator[tuple[Client, Peer]]:
    """A client logged in to a server this test scripts byte by byte."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    send_peer, receive_peer = trio.open_memory_channel[Peer](1)
    async with listeners[0], trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, listeners[0], send_peer)
        async with open_client(
            "127.0.0.1", port, "bob", timeout_s=TIMEOUT_S, on_recv=on_recv, on_sendack=on_sendack
        ) as client:
            with trio.fail_after(TIMEOUT_S):
                peer = await receive_peer.receive()
            try:
                yield client, peer
            finally:
                await peer.stream.aclose()


async def test_a_tampered_recv_in_a_batch_is_dropped_counted_and_not_acknowledged() -> None:
    handled: list[Recv] = []
    async with scripted(on_recv=handled.append) as (client, peer):
        frames = [peer.recv_frame(i, f"hello {i}".encode(), tamper=i == 3) for i in range(1, 6)]
        await peer.stream.send_all(b"".join(frames))  # one write: the client reads them as one batch
        acks = await peer.packets(4)
        assert acks == [Recvack(i, i) for i in (1, 2, 4, 5)]
        assert [(r.message_id, r.payload) for r in handled] == [
            (i, f"hello {i}".encode()) for i in (1, 2, 4, 5)
        ]
        stats = client.statistics()
        assert (stats.recvs, stats.bad_msg_keys, stats.bad_payloads) == (4, 1, 0)
        # The tampered one is not acknowledged later either: the next RECVACK is the next RECV's.
        await peer.stream.send_all(peer.recv_frame(6, b"after"))
        assert await peer.packets(1) == [Recvack(6, 6)]
        assert client.statistics().queued_recvs == 0  # with a handler, nothing waits in the recv() queue


async def test_a_batch_without_a_handler_goes_through_the_queue() -> None:
    async with scripted() as (client, peer):
        frames = [peer.recv_frame(i, f"m{i}".encode(), tamper=i == 2) for i in range(1, 5)]
        await peer.stream.send_all(b"".join(frames))
        assert await peer.packets(3) == [Recvack(i, i) for i in (1, 3, 4)]
        got = [await client.recv(timeout_s=TIMEOUT_S) for _ in range(3)]
        assert [(r.message_id, r.payload) for r in got] == [(1, b"m1"), (3, b"m3"), (4, b"m4")]
        assert client.statistics().bad_msg_keys == 1


async def test_pipelined_sends_are_signed_and_their_acks_go_to_the_handler() -> None:
    acks: list[Sendack] = []
    async with scripted(on_sendack=acks.append) as (client, peer):
        items = [("carol", 1, f"payload {i}".encode()) for i in range(20)]
        seqs, frames = client.prepare_sends(items)
        assert seqs == list(range(1, 21))
        await client.write_frames(frames)
        sends = await peer.packets(20)
        for seq, send in zip(seqs, sends, strict=True):
            assert isinstance(send, Send) and send.client_seq == seq
            expected = peer.session.send_msg_key(
                seq, send.client_msg_no, send.channel_id, send.channel_type, send.payload
            )
            assert send.msg_key == expected  # signed as the SDKs sign
            assert peer.session.decrypt(send.payload) == items[seq - 1][2]  # and encrypted
        assert len({send.client_msg_no for send in sends if isinstance(send, Send)}) == 20
        # A send() awaiting its own SENDACK still gets it; the handler gets only the others.
        async with trio.open_nursery() as nursery:
            results: list[Sendack] = []

            async def awaited() -> None:
                results.append(await client.send("carol", 1, b"waits", timeout_s=TIMEOUT_S))

            nursery.start_soon(awaited)
            (single,) = await peer.packets(1)
            assert isinstance(single, Send) and single.client_seq == 21
            replies = [Sendack(100 + s, s, s, Reason.SUCCESS) for s in [*seqs, 21]]
            await peer.stream.send_all(b"".join(encode(r, LATEST_VERSION) for r in replies))
        assert results == [replies[-1]]
        assert acks == replies[:-1]


async def test_prepare_sends_needs_a_sendack_handler() -> None:
    async with scripted() as (client, _peer):
        with pytest.raises(ClientError, match="on_sendack"):
            client.prepare_sends([("carol", 1, b"x")])
