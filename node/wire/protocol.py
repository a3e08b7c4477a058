"""The WuKongIM binary client protocol ("WKProto"): frames to frozen packets and back.

Pure: no sockets, no clocks, no randomness. The server and the client hand bytes to a
`FrameDecoder` and get typed packets out; they hand packets to `encode` and get bytes to write.
The layout follows /work/shared/PROTOCOL.md, itself checked against the JS and Go SDKs.

A connection's version decides the layout of CONNACK, SEND and RECV. Versions below
`MIN_VERSION` are laid out like `MIN_VERSION` and versions above `LATEST_VERSION` like
`LATEST_VERSION`, so any version a client announces can be encoded and decoded. Version 1 differs from
2 only in having no stream fields (WuKongIMGoProto reads them from version 2 on).
"""

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeAlias

LATEST_VERSION: Final = 5
MIN_VERSION: Final = 1

# Limits on decoded fields. Ids and keys this long are already far past what any SDK sends;
# the caps keep one client from making the server hold or hash large strings.
MAX_ID_BYTES: Final = 128
MAX_KEY_BYTES: Final = 1024
MAX_TEXT_BYTES: Final = 4096  # DISCONNECT reason and SUB param: free text, but still bounded
MAX_VARINT_BYTES: Final = 4
MAX_REMAINING_LENGTH: Final = (1 << (7 * MAX_VARINT_BYTES)) - 1
DEFAULT_MAX_REMAINING: Final = 1 << 20
I64_MIN: Final = -(1 << 63)
I64_MAX: Final = (1 << 63) - 1

# Header flags (low nibble of byte 0). For CONNACK bit0 means "a server_version byte follows".
FLAG_DUP: Final = 0x08
FLAG_SYNC_ONCE: Final = 0x04
FLAG_RED_DOT: Final = 0x02
FLAG_NO_PERSIST: Final = 0x01
_CONNACK_HAS_SERVER_VERSION: Final = 0x01

# Setting byte of SEND, RECV and SUB.
SETTING_RECEIPT: Final = 0x80
SETTING_SIGNAL: Final = 0x20
SETTING_NO_ENCRYPT: Final = 0x10
SETTING_TOPIC: Final = 0x08
SETTING_STREAM: Final = 0x02


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    SEND = 3
    SENDACK = 4
    RECV = 5
    RECVACK = 6
    PING = 7
    PONG = 8
    DISCONNECT = 9
    SUB = 10
    SUBACK = 11
    EVENT = 12


class Reason(IntEnum):
    UNKNOWN = 0
    SUCCESS = 1
    AUTH_FAIL = 2
    SUBSCRIBER_NOT_EXIST = 3
    IN_BLACKLIST = 4
    CHANNEL_NOT_EXIST = 5
    USER_NOT_ON_NODE = 6
    SENDER_OFFLINE = 7
    MSG_KEY_ERROR = 8
    PAYLOAD_DECODE_ERROR = 9
    FORWARD_SEND_PACKET_ERROR = 10
    NOT_ALLOW_SEND = 11
    CONNECT_KICK = 12
    NOT_IN_WHITELIST = 13
    QUERY_TOKEN_ERROR = 14
    SYSTEM_ERROR = 15
    CHANNEL_ID_ERROR = 16
    NODE_MATCH_ERROR = 17
    NODE_NOT_MATCH = 18
    BAN = 19
    NOT_SUPPORT_HEADER = 20
    CLIENT_KEY_IS_EMPTY = 21
    RATE_LIMIT = 22
    NOT_SUPPORT_CHANNEL_TYPE = 23
    DISBAND = 24
    SEND_BAN = 25


class ProtocolError(Exception):
    """Bytes that are not a valid frame, or a packet the wire format cannot carry."""

    def __init__(self, message: str, reason_code: int = Reason.UNKNOWN) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class FrameTooLarge(ProtocolError):
    """A frame declared a remaining length above the decoder's limit."""


@dataclass(frozen=True, slots=True)
class Connect:
    TYPE: ClassVar[PacketType] = PacketType.CONNECT
    version: int
    device_flag: int
    device_id: str
    uid: str
    token: str
    client_timestamp: int
    client_key: str


@dataclass(frozen=True, slots=True)
class Connack:
    """`server_version` is 0 after decoding a CONNACK that carried none (versions below 4)."""

    TYPE: ClassVar[PacketType] = PacketType.CONNACK
    time_diff: int
    reason_code: int
    server_key: str = ""
    salt: str = ""
    server_version: int = LATEST_VERSION
    node_id: int = 0


@dataclass(frozen=True, slots=True)
class Send:
    TYPE: ClassVar[PacketType] = PacketType.SEND
    setting: int
    client_seq: int
    client_msg_no: str
    channel_id: str
    channel_type: int
    payload: bytes
    msg_key: str = ""
    stream_no: str = ""
    expire: int = 0
    topic: str = ""
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Sendack:
    TYPE: ClassVar[PacketType] = PacketType.SENDACK
    message_id: int
    client_seq: int
    message_seq: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class Recv:
    TYPE: ClassVar[PacketType] = PacketType.RECV
    setting: int
    msg_key: str
    from_uid: str
    channel_id: str
    channel_type: int
    client_msg_no: str
    message_id: int
    message_seq: int
    timestamp: int
    payload: bytes
    expire: int = 0
    stream_flag: int = 0
    stream_no: str = ""
    stream_id: int = 0
    topic: str = ""
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Recvack:
    TYPE: ClassVar[PacketType] = PacketType.RECVACK
    message_id: int
    message_seq: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[PacketType] = PacketType.PING


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[PacketType] = PacketType.PONG


@dataclass(frozen=True, slots=True)
class Disconnect:
    TYPE: ClassVar[PacketType] = PacketType.DISCONNECT
    reason_code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Sub:
    TYPE: ClassVar[PacketType] = PacketType.SUB
    setting: int
    sub_no: str
    channel_id: str
    channel_type: int
    action: int
    param: str = ""


@dataclass(frozen=True, slots=True)
class Suback:
    TYPE: ClassVar[PacketType] = PacketType.SUBACK
    sub_no: str
    channel_id: str
    channel_type: int
    action: int
    reason_code: int


@dataclass(frozen=True, slots=True)
class Event:
    """A message event (WuKongIMGoProto `event.go`, server to client): `data` is the rest of the frame, in
    clear (never encrypted), a JSON object naming the stream (`client_msg_no`, `event_key`...). Only
    clients that can read type 12 may be sent one: the JS SDK before 1.3 throws on it and reconnects
    (see `takes_events`)."""

    TYPE: ClassVar[PacketType] = PacketType.EVENT
    id: str
    type: str
    timestamp: int
    data: bytes = b""


# The lowest CONNECT version whose official SDKs read EVENT: the JS SDK announces 5 from 1.3.2, and decodes
# type 12 from the same release on; the 1.0.x JS SDK (version 2) has no decoder for it, and its read loop
# answers the TypeError by dropping the connection (connect_manager.js `unpacket` -> `reConnect`). The
# Android, iOS and Flutter SDKs announce 4. WuKongIM itself writes EVENT to every connection.
EVENT_MIN_VERSION: Final = 5


def takes_events(version: int) -> bool:
    """Whether a connection that announced `version` in CONNECT can be sent an EVENT packet."""
    return version >= EVENT_MIN_VERSION


Packet: TypeAlias = (
    Connect | Connack | Send | Sendack | Recv | Recvack | Ping | Pong | Disconnect | Sub | Suback | Event
)

PING_FRAME: Final = b"\x70"
PONG_FRAME: Final = b"\x80"
_PING: Final = Ping()
_PONG: Final = Pong()

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_U8_U8 = struct.Struct(">BB")
_U8_U16 = struct.Struct(">BH")
_U8_U32 = struct.Struct(">BI")
_U8_U32_U16 = struct.Struct(">BIH")
_I64_U8 = struct.Struct(">qB")
_I64_U32 = struct.Struct(">qI")
_I64_U32_U32_U8 = struct.Struct(">qIIB")
_I64_U32_I32 = struct.Struct(">qIi")
_U8_U8_U8 = struct.Struct(">BBB")
_RECVACK_FRAME = struct.Struct(">BBqI")  # header byte, remaining length 12, message_id, message_seq


def negotiate_version(client_version: int) -> int:
    """The version a connection runs at, given the one its CONNECT announced: that version, capped at the
    latest this module lays out, exactly as WuKongIM (`user/handler/event_connect.go`) sets the
    connection's `ProtoVersion`. Every packet to the client is encoded at it.

    CONNACK carries the server's version byte only for clients that announced more than 3 (`_enc_connack`),
    so a client announcing 3 gets v3 layouts (RECV with `expire`) without being told: WuKongIM does the
    same, and no official SDK announces 3 (JS 2 or 5, Android/iOS/Flutter 4, uniapp 1).
    """
    return max(1, min(client_version, LATEST_VERSION))


def _layout(version: int) -> int:
    if version < MIN_VERSION:
        return MIN_VERSION
    if version > LATEST_VERSION:
        return LATEST_VERSION
    return version


# --- encoding -------------------------------------------------------------------------------
# Each encoder builds a list whose slot 0 is reserved for the header, so the whole frame is
# joined once: the payload is copied exactly once on the way out.


def _varint(n: int) -> bytes:
    if n > MAX_REMAINING_LENGTH:
        raise ProtocolError(f"remaining length {n} does not fit a {MAX_VARINT_BYTES}-byte varint")
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _frame(first: int, parts: list[bytes]) -> bytes:
    n = sum(map(len, parts))
    parts[0] = bytes((first, n)) if n < 0x80 else bytes((first,)) + _varint(n)
    return b"".join(parts)


def _str(s: str) -> tuple[bytes, bytes]:
    b = s.encode()
    return _U16.pack(len(b)), b


def _enc_connect(p: Connect, v: int) -> bytes:
    parts = [b"", _U8_U8.pack(p.version, p.device_flag)]
    parts += _str(p.device_id)
    parts += _str(p.uid)
    parts += _str(p.token)
    parts.append(_I64.pack(p.client_timestamp))
    parts += _str(p.client_key)
    return _frame(0x10, parts)


def _enc_connack(p: Connack, v: int) -> bytes:
    # The v2 JS SDK ignores header bit0 and reads time_diff first, so the server_version byte
    # must only reach clients that announced a version able to read it (WuKongIM: above 3).
    if v > 3:
        first = 0x20 | _CONNACK_HAS_SERVER_VERSION
        parts = [b"", _U8.pack(p.server_version), _I64_U8.pack(p.time_diff, p.reason_code)]
    else:
        first = 0x20
        parts = [b"", _I64_U8.pack(p.time_diff, p.reason_code)]
    parts += _str(p.server_key)
    parts += _str(p.salt)
    if v >= 4:
        parts.append(_U64.pack(p.node_id))
    return _frame(first, parts)


def _enc_send(p: Send, v: int) -> bytes:
    setting = p.setting
    cm = p.client_msg_no.encode()
    ch = p.channel_id.encode()
    mk = p.msg_key.encode()
    parts = [b"", _U8_U32_U16.pack(setting, p.client_seq, len(cm)), cm]
    if setting & SETTING_STREAM and 2 <= v < 5:
        parts += _str(p.stream_no)
    parts += (_U16.pack(len(ch)), ch)
    if v >= 3:
        parts.append(_U8_U32_U16.pack(p.channel_type, p.expire, len(mk)))
    else:
        parts.append(_U8_U16.pack(p.channel_type, len(mk)))
    parts.append(mk)
    if setting & SETTING_TOPIC:
        parts += _str(p.topic)
    parts.append(p.payload)
    return _frame(0x30 | (p.flags & 0x0F), parts)


def _enc_sendack(p: Sendack, v: int) -> bytes:
    # Fixed 17-byte body: no varint work needed.
    return b"\x40\x11" + _I64_U32_U32_U8.pack(p.message_id, p.client_seq, p.message_seq, p.reason_code)


def _enc_recv(p: Recv, v: int) -> bytes:
    setting = p.setting
    mk = p.msg_key.encode()
    fu = p.from_uid.encode()
    ch = p.channel_id.encode()
    cm = p.client_msg_no.encode()
    parts = [b"", _U8_U16.pack(setting, len(mk)), mk, _U16.pack(len(fu)), fu, _U16.pack(len(ch)), ch]
    if v >= 3:
        parts.append(_U8_U32_U16.pack(p.channel_type, p.expire, len(cm)))
    else:
        parts.append(_U8_U16.pack(p.channel_type, len(cm)))
    parts.append(cm)
    if setting & SETTING_STREAM and 2 <= v < 5:
        sn = p.stream_no.encode()
        parts += (_U8_U16.pack(p.stream_flag, len(sn)), sn, _U64.pack(p.stream_id))
    parts.append(_I64_U32_I32.pack(p.message_id, p.message_seq, p.timestamp))
    if setting & SETTING_TOPIC:
        parts += _str(p.topic)
    parts.append(p.payload)
    return _frame(0x50 | (p.flags & 0x0F), parts)


def _enc_recvack(p: Recvack, v: int) -> bytes:
    return _RECVACK_FRAME.pack(0x60 | (p.flags & 0x0F), 12, p.message_id, p.message_seq)


def recvack_frame(message_id: int, message_seq: int) -> bytes:
    """The RECVACK frame of one RECV (no flags), the same at every version: what `encode(Recvack(...))`
    gives, without the packet object, for clients acknowledging many RECVs at once."""
    return _RECVACK_FRAME.pack(0x60, 12, message_id, message_seq)


def _enc_ping(p: Ping, v: int) -> bytes:
    return PING_FRAME


def _enc_pong(p: Pong, v: int) -> bytes:
    return PONG_FRAME


def _enc_disconnect(p: Disconnect, v: int) -> bytes:
    parts = [b"", _U8.pack(p.reason_code)]
    parts += _str(p.reason)
    return _frame(0x90, parts)


def _enc_sub(p: Sub, v: int) -> bytes:
    parts = [b"", _U8.pack(p.setting)]
    parts += _str(p.sub_no)
    parts += _str(p.channel_id)
    parts.append(_U8_U8.pack(p.channel_type, p.action))
    parts += _str(p.param)
    return _frame(0xA0, parts)


def _enc_suback(p: Suback, v: int) -> bytes:
    parts = [b""]
    parts += _str(p.sub_no)
    parts += _str(p.channel_id)
    parts.append(_U8_U8_U8.pack(p.channel_type, p.action, p.reason_code))
    return _frame(0xB0, parts)


def _enc_event(p: Event, v: int) -> bytes:
    parts = [b""]
    parts += _str(p.id)
    parts += _str(p.type)
    parts.append(_I64.pack(p.timestamp))
    parts.append(p.data)
    return _frame(0xC0, parts)


# Keyed by the exact class: packets are final dataclasses, and an exact lookup beats isinstance chains.
_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _enc_connect,
    Connack: _enc_connack,
    Send: _enc_send,
    Sendack: _enc_sendack,
    Recv: _enc_recv,
    Recvack: _enc_recvack,
    Ping: _enc_ping,
    Pong: _enc_pong,
    Disconnect: _enc_disconnect,
    Sub: _enc_sub,
    Suback: _enc_suback,
    Event: _enc_event,
}


def encode(packet: Packet, version: int) -> bytes:
    """One complete frame (header byte, varint remaining length, body) for `packet`.

    `version` is the connection's protocol version. Only what the wire format cannot carry is
    checked here (an integer out of its field's range, a string over 65535 bytes): the decode
    limits are for input from peers, and our own packets are built from decoded input.
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise ProtocolError(f"not a packet: {type(packet).__name__}")
    try:
        return encoder(packet, _layout(version))
    except (struct.error, UnicodeEncodeError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {type(packet).__name__}: {exc}") from exc


# --- decoding -------------------------------------------------------------------------------
# Decoders read with struct.unpack_from at explicit offsets: a short body raises struct.error,
# which decode_body turns into ProtocolError, so no decoder needs its own length checks for
# fixed-size fields.


def _read_str(body: bytes, off: int, limit: int, field: str) -> tuple[str, int]:
    (n,) = _U16.unpack_from(body, off)
    off += 2
    end = off + n
    if n > limit:
        raise ProtocolError(f"{field} is {n} bytes, over the limit of {limit}")
    if end > len(body):
        raise ProtocolError(f"{field} is truncated")
    try:
        return body[off:end].decode(), end
    except UnicodeDecodeError:
        raise ProtocolError(f"{field} is not valid UTF-8") from None


def _dec_connect(flags: int, b: bytes, v: int) -> Connect:
    version, device_flag = _U8_U8.unpack_from(b, 0)
    if version == 0:
        # Every SDK sends 1 or more; 0 means the sender does not speak this protocol.
        raise ProtocolError("CONNECT with protocol version 0")
    device_id, off = _read_str(b, 2, MAX_ID_BYTES, "device_id")
    uid, off = _read_str(b, off, MAX_ID_BYTES, "uid")
    token, off = _read_str(b, off, MAX_KEY_BYTES, "token")
    (client_timestamp,) = _I64.unpack_from(b, off)
    client_key, _ = _read_str(b, off + 8, MAX_KEY_BYTES, "client_key")
    return Connect(version, device_flag, device_id, uid, token, client_timestamp, client_key)


def _dec_connack(flags: int, b: bytes, v: int) -> Connack:
    off = 0
    server_version = 0
    if flags & _CONNACK_HAS_SERVER_VERSION:
        (server_version,) = _U8.unpack_from(b, 0)
        off = 1
    time_diff, reason_code = _I64_U8.unpack_from(b, off)
    server_key, off = _read_str(b, off + 9, MAX_KEY_BYTES, "server_key")
    salt, off = _read_str(b, off, MAX_KEY_BYTES, "salt")
    node_id = 0
    if v >= 4:
        (node_id,) = _U64.unpack_from(b, off)
    return Connack(time_diff, reason_code, server_key, salt, server_version, node_id)


def _dec_send(flags: int, b: bytes, v: int) -> Send:
    setting, client_seq = _U8_U32.unpack_from(b, 0)
    client_msg_no, off = _read_str(b, 5, MAX_ID_BYTES, "client_msg_no")
    stream_no = ""
    if setting & SETTING_STREAM and 2 <= v < 5:
        stream_no, off = _read_str(b, off, MAX_ID_BYTES, "stream_no")
    channel_id, off = _read_str(b, off, MAX_ID_BYTES, "channel_id")
    expire = 0
    if v >= 3:
        channel_type, expire = _U8_U32.unpack_from(b, off)
        off += 5
    else:
        (channel_type,) = _U8.unpack_from(b, off)
        off += 1
    msg_key, off = _read_str(b, off, MAX_KEY_BYTES, "msg_key")
    topic = ""
    if setting & SETTING_TOPIC:
        topic, off = _read_str(b, off, MAX_ID_BYTES, "topic")
    return Send(
        setting,
        client_seq,
        client_msg_no,
        channel_id,
        channel_type,
        b[off:],
        msg_key,
        stream_no,
        expire,
        topic,
        flags,
    )


def _dec_sendack(flags: int, b: bytes, v: int) -> Sendack:
    return Sendack(*_I64_U32_U32_U8.unpack_from(b, 0))


def _dec_recv(flags: int, b: bytes, v: int) -> Recv:
    (setting,) = _U8.unpack_from(b, 0)
    msg_key, off = _read_str(b, 1, MAX_KEY_BYTES, "msg_key")
    from_uid, off = _read_str(b, off, MAX_ID_BYTES, "from_uid")
    channel_id, off = _read_str(b, off, MAX_ID_BYTES, "channel_id")
    expire = 0
    if v >= 3:
        channel_type, expire = _U8_U32.unpack_from(b, off)
        off += 5
    else:
        (channel_type,) = _U8.unpack_from(b, off)
        off += 1
    client_msg_no, off = _read_str(b, off, MAX_ID_BYTES, "client_msg_no")
    stream_flag = stream_id = 0
    stream_no = ""
    if setting & SETTING_STREAM and 2 <= v < 5:
        (stream_flag,) = _U8.unpack_from(b, off)
        stream_no, off = _read_str(b, off + 1, MAX_ID_BYTES, "stream_no")
        (stream_id,) = _U64.unpack_from(b, off)
        off += 8
    message_id, message_seq, timestamp = _I64_U32_I32.unpack_from(b, off)
    off += 16
    topic = ""
    if setting & SETTING_TOPIC:
        topic, off = _read_str(b, off, MAX_ID_BYTES, "topic")
    return Recv(
        setting,
        msg_key,
        from_uid,
        channel_id,
        channel_type,
        client_msg_no,
        message_id,
        message_seq,
        timestamp,
        b[off:],
        expire,
        stream_flag,
        stream_no,
        stream_id,
        topic,
        flags,
    )


def _dec_recvack(flags: int, b: bytes, v: int) -> Recvack:
    message_id, message_seq = _I64_U32.unpack_from(b, 0)
    return Recvack(message_id, message_seq, flags)


def _dec_ping(flags: int, b: bytes, v: int) -> Ping:
    return _PING


def _dec_pong(flags: int, b: bytes, v: int) -> Pong:
    return _PONG


def _dec_disconnect(flags: int, b: bytes, v: int) -> Disconnect:
    (reason_code,) = _U8.unpack_from(b, 0)
    # A peer saying goodbye with only a reason code is still saying goodbye.
    if len(b) == 1:
        return Disconnect(reason_code)
    reason, _ = _read_str(b, 1, MAX_TEXT_BYTES, "reason")
    return Disconnect(reason_code, reason)


def _dec_sub(flags: int, b: bytes, v: int) -> Sub:
    (setting,) = _U8.unpack_from(b, 0)
    sub_no, off = _read_str(b, 1, MAX_ID_BYTES, "sub_no")
    channel_id, off = _read_str(b, off, MAX_ID_BYTES, "channel_id")
    channel_type, action = _U8_U8.unpack_from(b, off)
    param, _ = _read_str(b, off + 2, MAX_TEXT_BYTES, "param")
    return Sub(setting, sub_no, channel_id, channel_type, action, param)


def _dec_suback(flags: int, b: bytes, v: int) -> Suback:
    sub_no, off = _read_str(b, 0, MAX_ID_BYTES, "sub_no")
    channel_id, off = _read_str(b, off, MAX_ID_BYTES, "channel_id")
    channel_type, action, reason_code = _U8_U8_U8.unpack_from(b, off)
    return Suback(sub_no, channel_id, channel_type, action, reason_code)


def _dec_event(flags: int, b: bytes, v: int) -> Event:
    event_id, off = _read_str(b, 0, MAX_ID_BYTES, "event id")
    event_type, off = _read_str(b, off, MAX_ID_BYTES, "event type")
    (timestamp,) = _I64.unpack_from(b, off)
    return Event(event_id, event_type, timestamp, b[off + 8 :])


_DECODERS: Final[dict[int, Callable[[int, bytes, int], Packet]]] = {
    PacketType.CONNECT: _dec_connect,
    PacketType.CONNACK: _dec_connack,
    PacketType.SEND: _dec_send,
    PacketType.SENDACK: _dec_sendack,
    PacketType.RECV: _dec_recv,
    PacketType.RECVACK: _dec_recvack,
    PacketType.PING: _dec_ping,
    PacketType.PONG: _dec_pong,
    PacketType.DISCONNECT: _dec_disconnect,
    PacketType.SUB: _dec_sub,
    PacketType.SUBACK: _dec_suback,
    PacketType.EVENT: _dec_event,
}


def decode_body(packet_type: int, flags: int, body: bytes, version: int) -> Packet:
    """The packet in one frame body. CONNECT reads its own version from the body.

    Trailing bytes after the last field of a fixed packet are ignored, so newer peers can
    append fields. Raises ProtocolError for an unknown type or a malformed body.
    """
    decoder = _DECODERS.get(packet_type)
    if decoder is None:
        raise ProtocolError(f"unknown packet type {packet_type}")
    try:
        return decoder(flags, body, _layout(version))
    except struct.error:
        raise ProtocolError(f"truncated {PacketType(packet_type).name} body") from None


class FrameDecoder:
    """Turns a byte stream (any split, any coalescing) into packets.

    The owner sets `version` once CONNECT has fixed the connection's version. A frame whose
    body does not decode is consumed before its ProtocolError is raised, so the stream stays in
    sync; after an error in the header (unknown type, bad or oversized length) it does not, and
    the connection must be closed.
    """

    # Consumed bytes are dropped from the buffer front only past this point, so many small
    # frames cost one compaction, not one copy each.
    _COMPACT_BYTES: Final = 64 * 1024

    def __init__(self, max_remaining: int = DEFAULT_MAX_REMAINING, version: int = LATEST_VERSION) -> None:
        self.max_remaining = max_remaining
        self.version = version
        self._buf = bytearray()
        # Invariant: bytes before _pos belong to frames already returned.
        self._pos = 0

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if self._pos:
            if self._pos == len(buf):
                buf.clear()
                self._pos = 0
            elif self._pos >= self._COMPACT_BYTES:
                del buf[: self._pos]
                self._pos = 0
        buf += data

    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buf) - self._pos

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None until more bytes are fed."""
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if pos >= size:
            return None
        first = buf[pos]
        packet_type = first >> 4
        if packet_type == PacketType.PING:
            self._pos = pos + 1
            return _PING
        if packet_type == PacketType.PONG:
            self._pos = pos + 1
            return _PONG
        if packet_type not in _DECODERS:
            raise ProtocolError(f"unknown packet type {packet_type}")
        remaining = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= size:
                return None
            byte = buf[i]
            i += 1
            remaining |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 7 * MAX_VARINT_BYTES:
                raise ProtocolError(f"remaining length varint longer than {MAX_VARINT_BYTES} bytes")
        if remaining > self.max_remaining:
            raise FrameTooLarge(f"frame of {remaining} bytes exceeds the limit of {self.max_remaining}")
        end = i + remaining
        if end > size:
            return None
        with memoryview(buf) as view:
            body = view[i:end].tobytes()
        self._pos = end
        return decode_body(packet_type, first & 0x0F, body, self.version)
