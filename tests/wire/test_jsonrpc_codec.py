"""The JSON-RPC codec on arbitrary input: packets or error answers, never another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from node.wire.jsonrpc import JsonRpcCodec
from node.wire.protocol import Connack, Disconnect, Pong, ProtocolError, Recv, Sendack

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# Values a client may get wrong in a way plain JSON generation rarely hits: a lone surrogate (no UTF-8), a
# non-ASCII digit, base64, a number as text.
tricky = st.sampled_from(["aGk=", "1", "12345678901234567890", "\ud800", "\u00b2", "", "%%"])
FIELDS = [
    "uid", "token", "deviceId", "deviceFlag", "clientTimestamp", "version", "channelId", "channelType",
    "payload", "clientMsgNo", "header", "setting", "expire", "topic", "messageId", "messageSeq",
]  # fmt: skip
params = st.fixed_dictionaries({}, optional={key: tricky | json_values for key in FIELDS})
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["connect", "send", "recvack", "ping", "disconnect", "x"])
        | st.text(max_size=5)
    },
    optional={"id": json_values, "params": params | json_values, "jsonrpc": json_values},
)


def fed(codec: JsonRpcCodec, data: bytes) -> bool:
    """Feed, as the gateway does: a ProtocolError (bad input before connect) closes the connection; whether
    it did."""
    try:
        codec.feed(data)
    except ProtocolError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.lists(requests | json_values, min_size=1, max_size=6), st.booleans())
def test_any_json_gets_packets_or_error_answers(messages: list[Any], connect_first: bool) -> None:
    replies: list[bytes] = []
    codec = JsonRpcCodec(replies.append)
    if connect_first:
        codec.feed(b'{"id":"c","method":"connect","params":{"uid":"u"}}')
    for message in messages:
        fed(codec, json.dumps(message).encode())
        while (packet := codec.next_packet()) is not None:
            # What the node would answer encodes too, whatever the request held.
            if isinstance(packet, Disconnect):
                continue
            for answer in (Sendack(1, 1, 1, 1), Pong(), Connack(0, 1)):
                replies.append(codec.encode(answer))
    replies.append(codec.encode(Recv(0, "", "\ud800", "c", 1, "\ud800", 1, 1, 1, b"x")))
    for reply in replies:
        parsed = json.loads(reply)  # valid JSON text, ASCII-escaped
        assert parsed["jsonrpc"] == "2.0"
        if "error" in parsed:
            assert type(parsed["error"]["code"]) is int


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_get_an_answer_or_a_close(data: bytes, connect_first: bool) -> None:
    replies: list[bytes] = []
    codec = JsonRpcCodec(replies.append)
    if connect_first:
        codec.feed(b'{"id":"c","method":"connect","params":{"uid":"u"}}')
        codec.next_packet()
    answered_before = len(replies)
    closed = fed(codec, data)
    # Random bytes are never a whole valid request: each message gets an error answer, or a close.
    assert closed or len(replies) > answered_before or not data.strip()
    for reply in replies:
        parsed = json.loads(reply)
        assert parsed["jsonrpc"] == "2.0" and ("result" in parsed or type(parsed["error"]["code"]) is int)
