"""The WKProto codec: layouts per version, exact bytes, stream reassembly, hostile input."""

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.wire.protocol import (
    FLAG_DUP,
    FLAG_RED_DOT,
    LATEST_VERSION,
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    MAX_REMAINING_LENGTH,
    SETTING_NO_ENCRYPT,
    SETTING_RECEIPT,
    SETTING_STREAM,
    SETTING_TOPIC,
    Connack,
    Connect,
    Disconnect,
    Event,
    FrameDecoder,
    FrameTooLarge,
    Packet,
    PacketType,
    Ping,
    Pong,
    ProtocolError,
    Reason,
    Recv,
    Recvack,
    Send,
    Sendack,
    Sub,
    Suback,
    decode_body,
    encode,
    negotiate_version,
    takes_events,
)

VERSIONS = [2, 3, 4, 5]


def _samples(v: int) -> list[Packet]:
    """One packet of each shape, carrying every field the version `v` puts on the wire."""
    expire = 3600 if v >= 3 else 0
    streams = 2 <= v < 5
    packets: list[Packet] = [
        Connect(v, 1, "d" * 32 + "W", "alice", "tok-en", 1_700_000_000_123, "Y2xpZW50IGtleQ=="),
        Connack(
            time_diff=-1234,
            reason_code=Reason.SUCCESS,
            server_key="c2VydmVyIGtleQ==",
            salt="0123456789abcdef",
            server_version=v if v >= 4 else 0,
            node_id=2**63 + 5 if v >= 4 else 0,
        ),
        Send(0, 1, "a" * 32 + "0", "bob", 1, b'{"content":"hi","type":1}', "f" * 32, flags=FLAG_RED_DOT),
        Send(
            SETTING_TOPIC | SETTING_RECEIPT,
            2**32 - 1,
            "n2",
            "group-1",
            2,
            b"",
            "",
            expire=expire,
            topic="news",
            flags=FLAG_RED_DOT | FLAG_DUP,
        ),
        Sendack(message_id=2**63 - 1, client_seq=7, message_seq=2**32 - 1, reason_code=Reason.SUCCESS),
        Sendack(message_id=-1, client_seq=0, message_seq=0, reason_code=Reason.MSG_KEY_ERROR),
        Recv(0, "k" * 32, "alice", "alice", 1, "n1", 123456789, 1, 1_700_000_000, b"\x00\xffbinary"),
        Recv(
            SETTING_TOPIC | SETTING_NO_ENCRYPT,
            "",
            "carol",
            "group-1",
            2,
            "n3",
            -5,
            2**32 - 1,
            -(2**31),
            "中文 payload".encode(),
            expire=expire,
            topic="t",
            flags=FLAG_DUP | FLAG_RED_DOT,
        ),
        Recvack(message_id=99, message_seq=3, flags=FLAG_RED_DOT),
        Ping(),
        Pong(),
        Disconnect(Reason.CONNECT_KICK, "logged in elsewhere"),
        Sub(0, "s1", "live-1", 9, 0, "param"),
        Suback("s1", "live-1", 9, 1, Reason.NOT_SUPPORT_CHANNEL_TYPE),
        Event("evt-1", "stream.delta", 1_700_000_000_123, b'{"client_msg_no":"n1","payload":{"delta":"hi"}}'),
    ]
    if streams:
        packets.append(
            Send(SETTING_STREAM, 3, "n4", "bob", 1, b"chunk", "m", stream_no="st-1", expire=expire)
        )
        packets.append(
            Recv(
                SETTING_STREAM,
                "m",
                "bob",
                "bob",
                1,
                "n4",
                10,
                11,
                12,
                b"chunk",
                expire=expire,
                stream_flag=1,
                stream_no="st-1",
                stream_id=2**64 - 1,
            )
        )
    return packets


def _decode_all(decoder: FrameDecoder) -> list[Packet]:
    out = []
    while (packet := decoder.next_packet()) is not None:
        out.append(packet)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_every_packet_round_trips(version: int) -> None:
    for packet in _samples(version):
        frame = encode(packet, version)
        decoder = FrameDecoder(version=version)
        decoder.feed(frame)
        assert decoder.next_packet() == packet, type(packet).__name__
        assert decoder.next_packet() is None
        assert decoder.buffered() == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_body_matches_frame_decoder(version: int) -> None:
    for packet in _samples(version):
        frame = encode(packet, version)
        if len(frame) == 1:
            continue
        # Every sample body is shorter than 128 bytes: one varint byte.
        assert frame[1] < 0x80
        assert decode_body(frame[0] >> 4, frame[0] & 0x0F, frame[2:], version) == packet


def test_fields_a_version_cannot_carry_are_dropped() -> None:
    send = Send(SETTING_STREAM, 1, "n", "c", 1, b"p", "k", stream_no="s", expire=60)
    got = _round_trip(send, 2)
    assert isinstance(got, Send)
    assert (got.expire, got.stream_no) == (0, "s")
    got = _round_trip(send, 5)
    assert isinstance(got, Send)
    assert (got.expire, got.stream_no) == (60, "")

    recv = Recv(SETTING_STREAM, "k", "u", "c", 1, "n", 1, 2, 3, b"p", 9, 1, "s", 4)
    got = _round_trip(recv, 5)
    assert isinstance(got, Recv)
    assert (got.expire, got.stream_flag, got.stream_no, got.stream_id) == (9, 0, "", 0)

    connack = Connack(0, 1, "k", "s", server_version=5, node_id=42)
    assert _round_trip(connack, 3) == Connack(0, 1, "k", "s", server_version=0, node_id=0)
    assert _round_trip(connack, 4) == connack


def _round_trip(packet: Packet, version: int) -> Packet | None:
    decoder = FrameDecoder(version=version)
    decoder.feed(encode(packet, version))
    return decoder.next_packet()


def test_versions_outside_the_supported_range_use_the_nearest_layout() -> None:
    send = Send(0, 1, "n", "c", 1, b"p", "k", expire=7)
    assert encode(send, 0) == encode(send, 1) == encode(send, 2)
    assert encode(send, 9) == encode(send, LATEST_VERSION)
    assert encode(send, 2) != encode(send, 3)


def test_a_connection_runs_at_the_announced_version_capped_at_the_latest() -> None:
    """WuKongIM's event_connect.go: ProtoVersion = min(announced, latest); nothing is rounded down."""
    assert [negotiate_version(v) for v in (1, 2, 3, 4, 5, 6, 200)] == [1, 2, 3, 4, 5, 5, 5]


def test_version_1_has_no_stream_fields() -> None:
    """WuKongIMGoProto reads stream_no (SEND) and stream_flag/no/id (RECV) from version 2 on only."""
    send = Send(SETTING_STREAM, 1, "n", "c", 1, b"p", "k", stream_no="s")
    assert encode(send, 1)[3:] == encode(Send(0, 1, "n", "c", 1, b"p", "k"), 1)[3:]  # all but the setting
    got = _round_trip(send, 1)
    assert isinstance(got, Send) and got.stream_no == "" and got.payload == b"p"
    assert len(encode(send, 1)) < len(encode(send, 2))
    recv = Recv(SETTING_STREAM, "k", "u", "c", 1, "n", 1, 2, 3, b"p", 0, 1, "s", 4)
    got = _round_trip(recv, 1)
    assert isinstance(got, Recv) and (got.stream_flag, got.stream_no, got.stream_id) == (0, "", 0)
    assert got.payload == b"p" and got.message_seq == 2


def test_connack_carries_the_server_version_only_above_3() -> None:
    connack = Connack(0, 1, "k", "s", server_version=5, node_id=7)
    for version in (1, 2, 3):
        frame = encode(connack, version)
        assert frame[0] == 0x20, version  # bit0 clear: no version byte, time_diff first
        assert frame == encode(connack, 2)
    for version in (4, 5):
        frame = encode(connack, version)
        assert frame[0] == 0x21 and frame[2] == 5, version


# --- exact bytes --------------------------------------------------------------------------------


def test_ping_and_pong_are_single_bytes() -> None:
    for version in VERSIONS:
        assert encode(Ping(), version) == b"\x70"
        assert encode(Pong(), version) == b"\x80"


def test_connack_v2_has_no_server_version_byte() -> None:
    frame = encode(Connack(-5, Reason.SUCCESS, "k", "salt", server_version=5, node_id=9), 2)
    body = struct.pack(">qB", -5, 1) + b"\x00\x01k" + b"\x00\x04salt"
    assert frame == bytes((0x20, len(body))) + body


def test_connack_v5_sets_bit0_and_leads_with_server_version() -> None:
    frame = encode(Connack(-5, Reason.SUCCESS, "k", "salt", server_version=5, node_id=9), 5)
    body = b"\x05" + struct.pack(">qB", -5, 1) + b"\x00\x01k" + b"\x00\x04salt" + struct.pack(">Q", 9)
    assert frame == bytes((0x21, len(body))) + body


def test_send_bytes_match_the_js_sdk_layout() -> None:
    send = Send(0, 1, "n", "c", 1, b"p", "k", flags=FLAG_RED_DOT)
    head = b"\x00" + b"\x00\x00\x00\x01" + b"\x00\x01n" + b"\x00\x01c" + b"\x01"
    tail = b"\x00\x01k" + b"p"
    v2 = head + tail
    v5 = head + b"\x00\x00\x00\x00" + tail  # expire u32 after channel_type from v3 on
    # The SDK sets RedDot on SEND: the first byte is 0x32.
    assert encode(send, 2) == bytes((0x32, len(v2))) + v2
    assert encode(send, 5) == bytes((0x32, len(v5))) + v5


def test_recv_bytes_v5() -> None:
    recv = Recv(SETTING_TOPIC, "k", "u", "c", 2, "n", 1, 2, 3, b"xy", expire=4, topic="t", flags=FLAG_DUP)
    body = (
        b"\x08"
        + b"\x00\x01k"
        + b"\x00\x01u"
        + b"\x00\x01c"
        + b"\x02"
        + struct.pack(">I", 4)
        + b"\x00\x01n"
        + struct.pack(">qIi", 1, 2, 3)
        + b"\x00\x01t"
        + b"xy"
    )
    assert encode(recv, 5) == bytes((0x58, len(body))) + body


def test_sendack_and_recvack_bytes() -> None:
    assert encode(Sendack(1, 2, 3, 1), 5) == b"\x40\x11" + struct.pack(">qIIB", 1, 2, 3, 1)
    assert encode(Recvack(1, 2, flags=FLAG_RED_DOT), 2) == b"\x62\x0c" + struct.pack(">qI", 1, 2)


def test_remaining_length_uses_a_multibyte_varint() -> None:
    payload = b"x" * 300
    frame = encode(Send(0, 1, "", "", 1, payload), 2)
    body_len = 1 + 4 + 2 + 2 + 1 + 2 + 300
    assert frame[:3] == bytes((0x30, (body_len & 0x7F) | 0x80, body_len >> 7))
    assert len(frame) == 3 + body_len


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ProtocolError):
        encode(Send(0, 1, "n", "c", 256, b""), 5)
    with pytest.raises(ProtocolError):
        encode(Sendack(1, -1, 0, 1), 5)
    with pytest.raises(ProtocolError):
        encode(Disconnect(1, "x" * 70_000), 5)
    with pytest.raises(ProtocolError):
        encode(Send(0, 1, "\ud800", "c", 1, b""), 5)


# --- FrameDecoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_frames_split_byte_by_byte(version: int) -> None:
    packets = _samples(version)
    stream = b"".join(encode(p, version) for p in packets)
    decoder = FrameDecoder(version=version)
    got: list[Packet] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got += _decode_all(decoder)
    assert got == packets
    assert decoder.buffered() == 0


def test_many_frames_coalesced_in_one_feed() -> None:
    packets = [Sendack(i, i, i, 1) if i % 3 else Ping() for i in range(5000)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode(p, 5) for p in packets))
    assert _decode_all(decoder) == packets
    assert decoder.buffered() == 0


def test_buffered_counts_the_unfinished_frame() -> None:
    frame = encode(Sendack(1, 2, 3, 1), 5)
    decoder = FrameDecoder()
    decoder.feed(frame + frame[:5])
    assert decoder.next_packet() == Sendack(1, 2, 3, 1)
    assert decoder.next_packet() is None
    assert decoder.buffered() == 5
    decoder.feed(frame[5:])
    assert decoder.next_packet() == Sendack(1, 2, 3, 1)
    assert decoder.buffered() == 0


def test_compaction_keeps_a_split_frame_intact() -> None:
    # Enough consumed bytes to trigger compaction while a frame is half received.
    frame = encode(Recv(0, "k", "u", "c", 1, "n", 1, 2, 3, b"z" * 1000), 5)
    decoder = FrameDecoder()
    count = 0
    for _ in range(300):
        decoder.feed(frame[:700])
        count += len(_decode_all(decoder))
        decoder.feed(frame[700:])
        count += len(_decode_all(decoder))
    assert count == 300
    assert decoder.buffered() == 0


def test_frame_at_the_limit_is_accepted() -> None:
    payload_len = 1000 - (1 + 4 + 2 + 2 + 1 + 4 + 2)
    frame = encode(Send(0, 1, "", "", 1, b"p" * payload_len), 5)
    decoder = FrameDecoder(max_remaining=1000)
    decoder.feed(frame)
    packet = decoder.next_packet()
    assert isinstance(packet, Send)
    assert len(packet.payload) == payload_len


def test_frame_too_large_is_refused_before_its_body_arrives() -> None:
    decoder = FrameDecoder(max_remaining=1000)
    decoder.feed(bytes((0x30, 0xE9, 0x07)))  # declares 1001 bytes, sends none of them
    with pytest.raises(FrameTooLarge):
        decoder.next_packet()


def test_varint_longer_than_four_bytes_is_refused() -> None:
    decoder = FrameDecoder(max_remaining=1 << 40)
    decoder.feed(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError) as info:
        decoder.next_packet()
    assert type(info.value) is ProtocolError


def test_four_byte_varint_is_accepted() -> None:
    decoder = FrameDecoder(max_remaining=MAX_REMAINING_LENGTH)
    decoder.feed(b"\x30\xff\xff\xff\x7f")
    assert decoder.next_packet() is None  # waiting for 256 MiB of body, not an error
    decoder = FrameDecoder(max_remaining=MAX_REMAINING_LENGTH)
    decoder.feed(b"\x30\xff\xff")
    assert decoder.next_packet() is None  # varint incomplete


def test_a_malformed_body_is_consumed_so_the_stream_stays_in_sync() -> None:
    truncated_sendack = bytes((0x40, 3)) + b"\x00\x00\x00"
    decoder = FrameDecoder()
    decoder.feed(truncated_sendack + encode(Sendack(1, 2, 3, 1), 5))
    with pytest.raises(ProtocolError):
        decoder.next_packet()
    assert decoder.next_packet() == Sendack(1, 2, 3, 1)


@pytest.mark.parametrize("packet_type", [0, 13, 14, 15])
def test_unknown_packet_type_is_refused(packet_type: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes((packet_type << 4, 0)))
    with pytest.raises(ProtocolError):
        decoder.next_packet()
    with pytest.raises(ProtocolError):
        decode_body(packet_type, 0, b"", 5)


def test_decoder_version_selects_the_layout() -> None:
    send = Send(0, 1, "n", "c", 1, b"payload", "k", expire=0)
    decoder = FrameDecoder(version=2)
    decoder.feed(encode(send, 2))
    assert decoder.next_packet() == send
    # The same v2 bytes read at v5 misplace every field after channel_type.
    decoder = FrameDecoder(version=5)
    decoder.feed(encode(send, 2))
    with pytest.raises(ProtocolError):
        decoder.next_packet()


# --- field checks -----------------------------------------------------------------------------------


def _connect_frame(**fields: object) -> bytes:
    base: dict[str, object] = {
        "version": 5,
        "device_flag": 0,
        "device_id": "d",
        "uid": "u",
        "token": "t",
        "client_timestamp": 0,
        "client_key": "k",
    }
    base.update(fields)
    return encode(Connect(**base), 5)  # type: ignore[arg-type]


def _decode_one(frame: bytes, version: int = 5) -> Packet | None:
    decoder = FrameDecoder(version=version)
    decoder.feed(frame)
    return decoder.next_packet()


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("uid", MAX_ID_BYTES),
        ("device_id", MAX_ID_BYTES),
        ("token", MAX_KEY_BYTES),
        ("client_key", MAX_KEY_BYTES),
    ],
)
def test_connect_string_limits(field: str, limit: int) -> None:
    packet = _decode_one(_connect_frame(**{field: "é" * (limit // 2)}))
    assert isinstance(packet, Connect)
    assert len(getattr(packet, field).encode()) == limit
    with pytest.raises(ProtocolError, match=field):
        _decode_one(_connect_frame(**{field: "x" * (limit + 1)}))


def test_send_id_limits() -> None:
    ok = Send(SETTING_TOPIC, 1, "n" * 128, "c" * 128, 1, b"", "k" * 1024, topic="t" * 128)
    assert _decode_one(encode(ok, 5)) == ok
    for field in ("client_msg_no", "channel_id", "topic"):
        bad = dataclasses.replace(ok, **{field: "x" * 129})  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match=field):
            _decode_one(encode(bad, 5))
    with pytest.raises(ProtocolError, match="msg_key"):
        _decode_one(encode(Send(0, 1, "n", "c", 1, b"", "k" * 1025), 5))


def test_invalid_utf8_is_a_protocol_error() -> None:
    body = b"\x00\x02\xc3\x28" + b"\x00\x01c" + b"\x01\x00\x00"  # sub_no is not UTF-8
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        decode_body(PacketType.SUBACK, 0, body, 5)


def test_connect_version_zero_is_refused_but_any_other_is_accepted() -> None:
    with pytest.raises(ProtocolError, match="version 0"):
        _decode_one(_connect_frame(version=0))
    for version in (1, 2, 5, 6, 255):
        packet = _decode_one(_connect_frame(version=version))
        assert isinstance(packet, Connect)
        assert packet.version == version


def test_trailing_bytes_after_a_fixed_packet_are_ignored() -> None:
    for packet in (
        Sendack(1, 2, 3, 1),
        Recvack(1, 2),
        Connect(4, 0, "d", "u", "t", 1, "k"),
        Disconnect(1, "bye"),
        Suback("s", "c", 1, 0, 1),
        Sub(0, "s", "c", 1, 0, "p"),
    ):
        frame = encode(packet, 5)
        body = frame[2:] + b"future fields"
        assert decode_body(frame[0] >> 4, frame[0] & 0x0F, body, 5) == packet


def test_disconnect_without_reason_text_is_accepted() -> None:
    assert decode_body(PacketType.DISCONNECT, 0, b"\x0c", 5) == Disconnect(Reason.CONNECT_KICK)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_truncated_body_is_a_protocol_error(version: int) -> None:
    for packet in _samples(version):
        frame = encode(packet, version)
        if len(frame) == 1:
            continue
        body = frame[2:]
        packet_type, flags = frame[0] >> 4, frame[0] & 0x0F
        # SEND and RECV end in an unframed payload, EVENT in its data: only cuts before it are detectable.
        fixed_len = len(body) - len(packet.payload) if isinstance(packet, Send | Recv) else len(body)
        if isinstance(packet, Event):
            fixed_len = len(body) - len(packet.data)
        for cut in range(fixed_len):
            if isinstance(packet, Disconnect) and cut == 1:
                continue  # a bare reason code is a valid DISCONNECT
            with pytest.raises(ProtocolError):
                decode_body(packet_type, flags, body[:cut], version)


# --- hostile input (hypothesis) ---------------------------------------------------------------------


def _drain(decoder: FrameDecoder) -> list[Packet]:
    """All packets up to the first ProtocolError (the connection would close there)."""
    out: list[Packet] = []
    try:
        while (packet := decoder.next_packet()) is not None:
            out.append(packet)
    except ProtocolError:
        pass
    return out


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), version=st.integers(1, 6), cut=st.integers(1, 50))
def test_random_bytes_yield_packets_or_protocol_error(data: bytes, version: int, cut: int) -> None:
    decoder = FrameDecoder(max_remaining=4096, version=version)
    got: list[Packet] = []
    try:
        for i in range(0, len(data), cut):
            decoder.feed(data[i : i + cut])
            while (packet := decoder.next_packet()) is not None:
                got.append(packet)
    except ProtocolError:
        pass
    for packet in got:
        assert encode(packet, version)  # whatever decodes can be written back


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@settings(max_examples=400, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.integers(1, 11), st.integers(0, 15), st.binary(max_size=120)), min_size=1, max_size=8
    ),
    version=st.integers(1, 6),
)
def test_random_bodies_in_well_formed_frames_yield_packets_or_protocol_error(
    frames: list[tuple[int, int, bytes]], version: int
) -> None:
    # Random bytes rarely form a header and a length that fit; these always do, so every body
    # decoder meets garbage.
    stream = b""
    for packet_type, flags, body in frames:
        first = bytes((packet_type << 4 | flags,))
        if packet_type in (PacketType.PING, PacketType.PONG):
            stream += first
        else:
            stream += first + _varint_bytes(len(body)) + body
    decoder = FrameDecoder(version=version)
    decoder.feed(stream)
    for _ in frames:
        try:
            assert decoder.next_packet() is not None
        except ProtocolError:
            pass
    # A bad body is consumed with its error, so the stream never loses sync.
    assert decoder.buffered() == 0


_ALL_SAMPLE_FRAMES = [(v, encode(p, v)) for v in VERSIONS for p in _samples(v)]


@settings(max_examples=400, deadline=None)
@given(
    sample=st.sampled_from(_ALL_SAMPLE_FRAMES),
    read_version=st.integers(1, 6),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("sid")), max_size=6
    ),
    truncate=st.integers(0, 10_000),
)
def test_mutated_frames_yield_packets_or_protocol_error(
    sample: tuple[int, bytes], read_version: int, edits: list[tuple[int, int, str]], truncate: int
) -> None:
    _, frame = sample
    data = bytearray(frame)
    for pos, value, kind in edits:
        i = pos % (len(data) + 1)
        if kind == "s" and i < len(data):
            data[i] = value
        elif kind == "i":
            data.insert(i, value)
        elif kind == "d" and i < len(data):
            del data[i]
    if truncate % 3 == 0:
        data = data[: truncate % (len(data) + 1)]
    decoder = FrameDecoder(max_remaining=4096, version=read_version)
    decoder.feed(bytes(data) + bytes(data))
    # Anything but a ProtocolError escapes _drain and fails the test; what decodes must be a packet.
    packets = _drain(decoder)
    assert all(type(p).__module__ == "node.wire.protocol" and hasattr(p, "TYPE") for p in packets)
    assert decoder.buffered() <= 2 * len(data)


_text = st.text(max_size=32)  # at most 128 bytes of UTF-8
_u32 = st.integers(0, 2**32 - 1)
_i64 = st.integers(-(2**63), 2**63 - 1)
_setting = st.sampled_from(
    [0, SETTING_TOPIC, SETTING_STREAM, SETTING_TOPIC | SETTING_STREAM | SETTING_RECEIPT]
)


def _carried(packet: Packet, version: int) -> Packet:
    """`packet` with the fields `version` does not put on the wire reset to their defaults."""
    changes: dict[str, object] = {}
    if isinstance(packet, Send | Recv):
        if version < 3:
            changes["expire"] = 0
        if not (packet.setting & SETTING_STREAM and version < 5):
            changes["stream_no"] = ""
            if isinstance(packet, Recv):
                changes["stream_flag"] = changes["stream_id"] = 0
        if not packet.setting & SETTING_TOPIC:
            changes["topic"] = ""
    return dataclasses.replace(packet, **changes)  # type: ignore[arg-type]


_sends = st.builds(
    Send,
    setting=_setting,
    client_seq=_u32,
    client_msg_no=_text,
    channel_id=_text,
    channel_type=st.integers(0, 255),
    payload=st.binary(max_size=300),
    msg_key=_text,
    stream_no=_text,
    expire=_u32,
    topic=_text,
    flags=st.integers(0, 15),
)
_recvs = st.builds(
    Recv,
    setting=_setting,
    msg_key=_text,
    from_uid=_text,
    channel_id=_text,
    channel_type=st.integers(0, 255),
    client_msg_no=_text,
    message_id=_i64,
    message_seq=_u32,
    timestamp=st.integers(-(2**31), 2**31 - 1),
    payload=st.binary(max_size=300),
    expire=_u32,
    stream_flag=st.integers(0, 255),
    stream_no=_text,
    stream_id=st.integers(0, 2**64 - 1),
    topic=_text,
    flags=st.integers(0, 15),
)


@settings(max_examples=300, deadline=None)
@given(packet=st.one_of(_sends, _recvs), version=st.sampled_from(VERSIONS))
def test_generated_send_and_recv_round_trip(packet: Send | Recv, version: int) -> None:
    decoder = FrameDecoder(version=version)
    decoder.feed(encode(packet, version))
    assert decoder.next_packet() == _carried(packet, version)
    assert decoder.buffered() == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_samples_cover_every_packet_type(version: int) -> None:
    # Guards the sample table the other tests rely on.
    assert {type(p) for p in _samples(version)} == {
        Connect,
        Connack,
        Send,
        Sendack,
        Recv,
        Recvack,
        Ping,
        Pong,
        Disconnect,
        Sub,
        Suback,
        Event,
    }


def test_event_bytes_match_wukongim_go_proto() -> None:
    """WuKongIMGoProto `event.go`: id str, type str, timestamp i64, then the data to the end of the frame."""
    frame = encode(Event("e1", "stream.delta", 7, b'{"a":1}'), LATEST_VERSION)
    body = b"\x00\x02e1" + b"\x00\x0cstream.delta" + struct.pack(">q", 7) + b'{"a":1}'
    assert frame == bytes((0xC0, len(body))) + body
    assert decode_body(PacketType.EVENT, 0, body, 2) == Event("e1", "stream.delta", 7, b'{"a":1}')


def test_only_clients_announcing_version_5_take_events() -> None:
    """The JS SDK 1.0.x announces 2 and drops its connection on a type-12 frame; 1.3.x announces 5 and
    reads it; Android/iOS/Flutter announce 4."""
    assert [takes_events(v) for v in (1, 2, 3, 4, 5, 6)] == [False, False, False, False, True, True]
