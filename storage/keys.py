"""Key encodings for the LMDB keyspace.

Every variable-length part is length-prefixed so that two different tuples never encode to the same bytes
(``ab``+``c`` must not equal ``a``+``bc``) and a prefix scan over one channel never returns another
channel's rows. Integers are big-endian so that LMDB's bytewise order is numeric order.
"""

from __future__ import annotations

import struct

# LMDB keys stop at 511 bytes; every identifier is capped well below that at decode time.
MAX_PART_BYTES = 255

_U64 = struct.Struct(">Q")


class KeyError_(ValueError):
    """A key part is too long or of the wrong kind (raised before anything is written)."""


def part(text: str) -> bytes:
    """One length-prefixed string part."""
    raw = text.encode()
    if len(raw) > MAX_PART_BYTES:
        raise KeyError_(f"key part longer than {MAX_PART_BYTES} bytes")
    return bytes((len(raw),)) + raw


def channel_key(channel_id: str, channel_type: int) -> bytes:
    """The key of a channel: its type first, so that the same id in two types stays two channels."""
    if not 0 <= channel_type <= 255:
        raise KeyError_("channel type out of range")
    return bytes((channel_type,)) + part(channel_id)


def split_channel_key(key: bytes) -> tuple[str, int, int]:
    """Inverse of `channel_key` at the start of `key`: (channel_id, channel_type, bytes consumed)."""
    length = key[1]
    return key[2 : 2 + length].decode(), key[0], 2 + length


def message_key(chan: bytes, seq: int) -> bytes:
    return chan + _U64.pack(seq)


def seq_of_message_key(key: bytes) -> int:
    return int(_U64.unpack_from(key, len(key) - 8)[0])


def member_key(chan: bytes, uid: str) -> bytes:
    """Subscribers, blacklist and whitelist rows: channel first, so a prefix scan lists one channel."""
    return chan + part(uid)


def uid_of_member_key(chan: bytes, key: bytes) -> str:
    return key[len(chan) + 1 :].decode()


def user_channel_key(uid: str, chan: bytes) -> bytes:
    """Index from a user to the channels they are in (conversation sync)."""
    return part(uid) + chan


def dedup_key(chan: bytes, sender: str, client_msg_no: str) -> bytes:
    return chan + part(sender) + part(client_msg_no)


def split_dedup_key(chan: bytes, key: bytes) -> tuple[str, str]:
    """(sender, client_msg_no) of a dedup key of the channel `chan`."""
    rest = key[len(chan) :]
    n = rest[0]
    sender = rest[1 : 1 + n].decode()
    m = rest[1 + n]
    return sender, rest[2 + n : 2 + n + m].decode()


def u64(value: int) -> bytes:
    return _U64.pack(value)


_U16 = struct.Struct(">H")


def presence_key(uid: str, node: int, conn: int) -> bytes:
    """One online connection: uid first, so "is this user online anywhere" is one prefix scan."""
    return part(uid) + _U16.pack(node) + _U64.pack(conn)


def split_presence_key(key: bytes) -> tuple[str, int, int]:
    length = key[0]
    uid = key[1 : 1 + length].decode()
    (node,) = _U16.unpack_from(key, 1 + length)
    (conn,) = _U64.unpack_from(key, 3 + length)
    return uid, int(node), int(conn)


def msg_event_key(chan: bytes, sender: str, client_msg_no: str) -> bytes:
    """The persisted event state of one streamed message in one channel: its anchor's sender and
    client_msg_no (client_msg_nos are unique per sender only, as dedup keeps them)."""
    return chan + part(sender) + part(client_msg_no)
