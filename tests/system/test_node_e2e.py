"""One real node (real PySyncObj, real LMDB, real sockets): the protocol end to end, good and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from node.client import ClientError, ConnectRefused, open_client
from node.wire.crypto import Session, generate_keypair
from node.wire.protocol import (
    FLAG_DUP,
    Connack,
    Connect,
    Disconnect,
    FrameDecoder,
    Packet,
    Reason,
    Send,
    Sendack,
    encode,
)
from raft.commands import person_channel_id
from storage.keys import channel_key
from tests.conftest import RunningNode, http_json, running_node, single_node_config, wait_for

TEXT = b'{"content":"hello","type":1}'


class RawConn:
    """A hand-driven protocol connection, for input the real client would never send."""

    def __init__(self, stream: trio.SocketStream, version: int = 5) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(version=version)
        self.version = version
        self.session: Session | None = None

    @classmethod
    async def open(cls, node: RunningNode) -> RawConn:
        return cls(await trio.open_tcp_stream(*node.tcp))

    async def connect(self, uid: str, token: str = "", device_flag: int = 0) -> Connack:
        private, public = generate_keypair()
        await self.write(
            encode(
                Connect(self.version, device_flag, "dev-" + uid, uid, token, int(time.time() * 1000), public),
                5,
            )
        )
        connack = await self.read()
        assert isinstance(connack, Connack)
        if connack.reason_code == Reason.SUCCESS:
            self.session = Session.from_keys(private, connack.server_key, connack.salt)
        return connack

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read(self, timeout_s: float = 5.0) -> Packet | None:
        """The next packet, or None when the server closed the connection."""
        with trio.fail_after(timeout_s):
            while True:
                packet = self.decoder.next_packet()
                if packet is not None:
                    return packet
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.decoder.feed(data)

    async def read_until_closed(self, timeout_s: float = 5.0) -> list[Packet]:
        packets = []
        with trio.fail_after(timeout_s):
            while (packet := await self.read(timeout_s)) is not None:
                packets.append(packet)
        return packets

    def send_frame(
        self,
        channel_id: str,
        channel_type: int,
        payload: bytes,
        *,
        seq: int = 1,
        cmn: str = "cmn-1",
        msg_key: str | None = None,
        raw_payload: bool = False,
    ) -> bytes:
        assert self.session is not None
        wire = payload if raw_payload else self.session.encrypt(payload)
        key = (
            msg_key
            if msg_key is not None
            else self.session.send_msg_key(seq, cmn, channel_id, channel_type, wire)
        )
        return encode(Send(0, seq, cmn, channel_id, channel_type, wire, key), self.version)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def make_group(node: RunningNode, channel_id: str, members: list[str]) -> None:
    status, body = await http_json(
        node.http, "POST", "/channel", {"channel_id": channel_id, "channel_type": 2, "subscribers": members}
    )
    assert status == 200, body


def stored_count(node: RunningNode, channel_id: str, channel_type: int) -> int:
    with node.node.store.read() as txn:
        return len(txn.messages(channel_key(channel_id, channel_type), 1, 0, 1_000_000))


# -- the happy paths ----------------------------------------------------------------------------------------
async def test_person_and_group_messages_reach_tcp_and_v2_websocket_clients(node: RunningNode) -> None:
    host, port = node.tcp
    ws_host, ws_port = node.ws
    await make_group(node, "g1", ["alice", "bob", "carol"])
    async with (
        open_client(host, port, "alice") as alice,
        open_client(host, port, "bob") as bob,
        open_client(ws_host, ws_port, "carol", websocket=True, version=2, device_flag=1) as carol,
    ):
        ack = await alice.send("bob", 1, TEXT)
        assert ack.reason_code == Reason.SUCCESS and ack.message_seq == 1 and ack.message_id > 0
        got = await bob.recv()
        assert got.from_uid == "alice" and got.channel_id == "alice" and got.channel_type == 1
        assert json.loads(got.payload) == json.loads(TEXT)
        assert (got.message_id, got.message_seq) == (ack.message_id, 1)

        reply = await bob.send("alice", 1, b'{"content":"hi alice","type":1}')
        assert reply.message_seq == 2  # same person channel, whoever sends
        assert (await alice.recv()).channel_id == "bob"

        for expected_seq in (1, 2, 3):
            group_ack = await alice.send("g1", 2, TEXT)
            assert group_ack.reason_code == Reason.SUCCESS and group_ack.message_seq == expected_seq
            for member in (bob, carol):
                message = await member.recv()
                assert (message.channel_id, message.channel_type, message.message_seq) == (
                    "g1",
                    2,
                    expected_seq,
                )
                assert json.loads(message.payload) == json.loads(TEXT)
        assert alice.statistics().bad_msg_keys == 0 and carol.statistics().bad_msg_keys == 0
        with pytest.raises(ClientError):
            await alice.recv(timeout_s=0.3)  # the sender's own device gets no echo


async def test_resend_of_a_client_msg_no_gets_the_original_ids_and_stores_nothing(node: RunningNode) -> None:
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:
        first = await alice.send("bob", 1, TEXT, client_msg_no="fixed-no-1")
        again = await alice.send("bob", 1, b"different bytes", client_msg_no="fixed-no-1")
        assert (again.message_id, again.message_seq) == (first.message_id, first.message_seq)
        assert again.reason_code == Reason.SUCCESS
        await bob.recv()
        with pytest.raises(ClientError):
            await bob.recv(timeout_s=0.3)  # the resend is not delivered a second time
    assert stored_count(node, person_channel_id("alice", "bob"), 1) == 1


async def test_pipelined_sends_keep_their_order_in_message_seq(node: RunningNode) -> None:
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:
        acks = await alice.send_many([("bob", 1, f"m{i}".encode()) for i in range(300)])
        assert [a.message_seq for a in acks] == list(range(1, 301))
        received = [await bob.recv() for _ in range(300)]
        assert [r.payload for r in received] == [f"m{i}".encode() for i in range(300)]


async def test_unacked_recv_is_resent_with_dup_until_recvack(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", recv_resend_interval_s=0.2, recv_resend_attempts=3)
    async with running_node(config) as node:
        host, port = node.tcp
        async with (
            open_client(host, port, "alice") as alice,
            open_client(host, port, "bob", auto_ack=False) as bob,
        ):
            ack = await alice.send("bob", 1, TEXT)
            first = await bob.recv()
            resent = await bob.recv(timeout_s=3)
            assert resent.message_id == first.message_id == ack.message_id
            assert resent.flags & FLAG_DUP and not first.flags & FLAG_DUP
            await bob.ack(resent)
            conn = node.node.registry.of_uid("bob")[0]
            await wait_for(lambda: not conn.inflight, 5)


async def test_without_token_auth_a_login_replaces_only_its_own_device_id(node: RunningNode) -> None:
    """Without token auth every device is a slave (WuKongIM): a new login of the same uid, flag and device
    id closes the older connection without DISCONNECT; another device id (a second tab) keeps its own."""
    host, port = node.tcp
    async with (
        open_client(host, port, "alice", device_flag=1, device_id="tab-1") as first,
        open_client(host, port, "alice", device_flag=1, device_id="tab-2") as second_tab,
        open_client(host, port, "alice", device_flag=1, device_id="tab-1"),
    ):
        with trio.fail_after(5):
            await first.disconnected.wait()
        assert first.disconnect_reason is None  # closed, not kicked: the SDK reconnects
        await second_tab.ping()
        assert len(node.node.registry.of_uid("alice")) == 2


async def test_token_auth_on_rejects_a_bad_token_and_accepts_the_set_one(tmp_path: Path) -> None:
    async with running_node(single_node_config(tmp_path / "n1", token_auth=True)) as node:
        host, port = node.tcp
        status, _ = await http_json(
            node.http, "POST", "/user/token", {"uid": "alice", "token": "s3cret", "device_flag": 0}
        )
        assert status == 200
        with pytest.raises(ConnectRefused) as refused:
            async with open_client(host, port, "alice", token="wrong"):
                pass
        assert refused.value.reason_code == Reason.AUTH_FAIL
        async with open_client(host, port, "alice", token="s3cret") as alice:
            await alice.ping()


async def test_group_permissions_give_the_right_reason_codes(node: RunningNode) -> None:
    host, port = node.tcp
    await make_group(node, "g1", ["alice"])
    async with open_client(host, port, "alice") as alice, open_client(host, port, "mallory") as mallory:
        assert (await alice.send("nope", 2, TEXT)).reason_code == Reason.CHANNEL_NOT_EXIST
        assert (await mallory.send("g1", 2, TEXT)).reason_code == Reason.SUBSCRIBER_NOT_EXIST
        assert (await alice.send("x", 9, TEXT)).reason_code == Reason.NOT_SUPPORT_CHANNEL_TYPE
        status, _ = await http_json(
            node.http,
            "POST",
            "/channel/subscriber_add",
            {"channel_id": "g1", "channel_type": 2, "subscribers": ["mallory"]},
        )
        assert status == 200
        assert (await mallory.send("g1", 2, TEXT)).reason_code == Reason.SUCCESS
        status, _ = await http_json(
            node.http,
            "POST",
            "/channel/subscriber_remove",
            {"channel_id": "g1", "channel_type": 2, "subscribers": ["mallory"]},
        )
        assert status == 200
        assert (await mallory.send("g1", 2, TEXT)).reason_code == Reason.SUBSCRIBER_NOT_EXIST
        await http_json(node.http, "POST", "/channel", {"channel_id": "g1", "channel_type": 2, "disband": 1})
        assert (await alice.send("g1", 2, TEXT)).reason_code == Reason.DISBAND
    assert stored_count(node, "g1", 2) == 1


# -- bad input: a clear answer, and everyone else keeps being served -----------------------------------------
async def test_bad_msg_key_and_undecryptable_payload_get_reasons_8_and_9(node: RunningNode) -> None:
    raw = await RawConn.open(node)
    assert (await raw.connect("alice")).reason_code == Reason.SUCCESS
    await raw.write(raw.send_frame("bob", 1, TEXT, seq=1, msg_key="0" * 32))
    ack = await raw.read()
    assert isinstance(ack, Sendack) and ack.reason_code == Reason.MSG_KEY_ERROR
    await raw.write(raw.send_frame("bob", 1, b"not base64 at all!", seq=2, raw_payload=True))
    ack = await raw.read()
    assert isinstance(ack, Sendack) and ack.reason_code == Reason.PAYLOAD_DECODE_ERROR
    await raw.write(raw.send_frame("bob", 1, TEXT, seq=3, cmn="ok-1"))
    ack = await raw.read()
    assert isinstance(ack, Sendack) and ack.reason_code == Reason.SUCCESS and ack.message_seq == 1
    await raw.aclose()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xff\xff\xff\xff\xff\xff", id="bad-varint"),
        pytest.param(b"\x30\x03abc", id="short-send-before-connect"),
        pytest.param(b"\xf0\x00", id="unknown-type"),
        pytest.param(b"\x10\xff\xff\xff\x7f", id="over-size-limit"),
    ],
)
async def test_garbage_gets_a_close_and_the_node_serves_others(node: RunningNode, garbage: bytes) -> None:
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice, open_client(host, port, "bob") as bob:
        raw = await RawConn.open(node)
        await raw.write(garbage)
        packets = await raw.read_until_closed()
        assert not any(isinstance(p, Disconnect) for p in packets)  # a DISCONNECT is for a kick only
        await raw.aclose()
        ack = await alice.send("bob", 1, TEXT)
        assert ack.reason_code == Reason.SUCCESS
        assert (await bob.recv()).message_id == ack.message_id


async def test_send_before_connect_closes_the_connection(node: RunningNode) -> None:
    raw = await RawConn.open(node)
    raw.session = Session(b"k" * 16, b"i" * 16)
    await raw.write(raw.send_frame("bob", 1, TEXT))
    packets = await raw.read_until_closed()
    await raw.aclose()
    assert not any(isinstance(p, Sendack) for p in packets)
    assert node.node.channel_ctx.acked == 0


async def test_connection_without_connect_is_closed_after_the_timeout(tmp_path: Path) -> None:
    async with running_node(single_node_config(tmp_path / "n1", connect_timeout_s=0.3)) as node:
        raw = await RawConn.open(node)
        started = trio.current_time()
        await raw.read_until_closed(timeout_s=5)
        await raw.aclose()
        assert trio.current_time() - started < 3
        assert node.node.gateway.connect_timeouts == 1


async def test_frame_split_byte_by_byte_and_frames_coalesced_are_both_understood(node: RunningNode) -> None:
    raw = await RawConn.open(node)
    assert (await raw.connect("alice")).reason_code == Reason.SUCCESS
    frames = [raw.send_frame("bob", 1, TEXT, seq=i, cmn=f"c{i}") for i in range(1, 4)]
    for byte in frames[0]:
        await raw.write(bytes((byte,)))
    await raw.write(frames[1] + frames[2])
    seqs = []
    for _ in range(3):
        ack = await raw.read()
        assert isinstance(ack, Sendack) and ack.reason_code == Reason.SUCCESS
        seqs.append(ack.message_seq)
    assert seqs == [1, 2, 3]
    await raw.aclose()


async def test_malformed_http_bodies_get_400_with_a_json_error(node: RunningNode) -> None:
    cases = [
        ("/channel", b"{not json"),
        ("/channel", b"[1, 2]"),
        ("/channel", json.dumps({"channel_id": "g", "channel_type": "two"}).encode()),
        ("/channel/subscriber_add", json.dumps({"channel_id": "", "channel_type": 2}).encode()),
        ("/user/token", json.dumps({"uid": "a" * 500, "token": "t"}).encode()),
        (
            "/channel/subscriber_add",
            json.dumps({"channel_id": "g", "channel_type": 2, "subscribers": [1]}).encode(),
        ),
    ]
    before = node.node.raft.proposed
    for path, raw in cases:
        status, body = await http_json(node.http, "POST", path, raw=raw)
        assert status == 400, (path, raw, body)
        assert body["status"] == 400 and isinstance(body["msg"], str) and body["msg"]
    assert node.node.raft.proposed == before  # nothing malformed reached Raft
    status, body = await http_json(node.http, "GET", "/health")
    assert status == 200 and body == {"status": "ok"}


async def test_messagesync_reads_back_what_was_acked(node: RunningNode) -> None:
    host, port = node.tcp
    async with open_client(host, port, "alice") as alice:
        acks = [await alice.send("bob", 1, f"m{i}".encode()) for i in range(5)]
    status, body = await http_json(
        node.http,
        "POST",
        "/channel/messagesync",
        {
            "login_uid": "bob",
            "channel_id": "alice",
            "channel_type": 1,
            "start_message_seq": 1,
            "limit": 3,
            "pull_mode": 1,
        },
    )
    assert status == 200
    assert [m["message_seq"] for m in body["messages"]] == [1, 2, 3] and body["more"] == 1
    assert [m["message_id"] for m in body["messages"]] == [a.message_id for a in acks[:3]]
    # WuKongIM's rule for a person message: channel_id is the half of the stored id that is not the sender.
    assert body["messages"][0]["channel_id"] == "bob" and body["messages"][0]["from_uid"] == "alice"


async def test_an_over_long_uid_is_refused_at_connect(node: RunningNode) -> None:
    host, port = node.tcp
    with pytest.raises(ConnectRefused) as refused:
        async with open_client(host, port, "u" * 65):
            pass
    assert refused.value.reason_code == Reason.AUTH_FAIL
    async with open_client(host, port, "u" * 64) as longest, open_client(host, port, "v" * 64) as other:
        ack = await longest.send("v" * 64, 1, TEXT)
        assert ack.reason_code == Reason.SUCCESS
        assert (await other.recv()).from_uid == "u" * 64
