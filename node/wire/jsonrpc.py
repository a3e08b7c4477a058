"""WuKongIM's JSON-RPC 2.0 light-client protocol (the EasySDKs'): WebSocket messages <-> the same packets.

A JSON-RPC connection is an ordinary connection: the gateway and the pools see the same `Connect`, `Send`,
`Recvack`, `Ping` and `Disconnect` packets as from a binary client, and hand the same `Connack`,
`Sendack`, `Recv`, `Pong` and `Disconnect` packets back. Only this codec differs. It is per connection,
because a response must carry the `id` of its request: the codec keeps the id of `connect`, the ids of
the `ping`s in order (the user pool answers a connection's pings in order), and the id of every `send`
under the client_seq it gives the SEND (a SENDACK names its client_seq).

Inbound (`feed`, then `next_packet`, like `FrameDecoder`): one WebSocket message holds one or more JSON
objects (or arrays of them). Requests: `connect`, `send`, `ping`, `disconnect` (with an `id`, a string or
an integer, echoed as given); notification: `recvack`. `"jsonrpc": "2.0"` is optional. A bad object gets
an error response through `reply` and the connection goes on; before `connect` any bad input is answered
and then raises `ProtocolError` (the gateway closes the connection).

Outbound (`encode`): responses `{"jsonrpc","id","result"}` / `{"jsonrpc","id","error":{"code","message"}}`
and notifications `{"jsonrpc","method","params"}` (`recv`, `disconnect`, `event`; `notification` builds
any other). Shapes follow wukong-easy-sdk 0.1.0 where WuKongIM v2.2.5 differs (README).

Pure: no sockets, no clocks.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import uuid
from collections.abc import Callable
from typing import Any, Final

from node.wire.protocol import (
    FLAG_DUP,
    FLAG_NO_PERSIST,
    FLAG_RED_DOT,
    FLAG_SYNC_ONCE,
    I64_MAX,
    I64_MIN,
    LATEST_VERSION,
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    SETTING_RECEIPT,
    SETTING_SIGNAL,
    SETTING_STREAM,
    SETTING_TOPIC,
    Connack,
    Connect,
    Disconnect,
    Event,
    Packet,
    Ping,
    Pong,
    ProtocolError,
    Recv,
    Recvack,
    Send,
    Sendack,
)

# JSON-RPC 2.0's error codes.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
# A server error (JSON-RPC's -32000..-32099): more requests awaiting their answer than a connection may have.
TOO_MANY_PENDING: Final = -32000

# Requests awaiting their answer on one connection (sends awaiting their commit, pings their turn).
MAX_PENDING: Final = 16384
U32_MAX: Final = (1 << 32) - 1

_HEADER_FLAGS: Final = (
    ("noPersist", FLAG_NO_PERSIST),
    ("redDot", FLAG_RED_DOT),
    ("syncOnce", FLAG_SYNC_ONCE),
)
_SETTING_BITS: Final = (
    ("receipt", SETTING_RECEIPT),
    ("signal", SETTING_SIGNAL),
    ("stream", SETTING_STREAM),
    ("topic", SETTING_TOPIC),
)
# Every `recv` notification starts with this, its header first: a resend marks it DUP by inserting a
# key right here (`dup`), without parsing the frame again.
_RECV_PREFIX: Final = b'{"jsonrpc":"2.0","method":"recv","params":{"header":{'
_WHITESPACE: Final = " \t\n\r"


class _BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def looks_like_jsonrpc(data: bytes) -> bool:
    """Whether a connection's first bytes are JSON (first non-whitespace byte `{` or `[`), not a frame.

    A binary frame starts with its type nibble: CONNECT is 0x1_, never `{` (0x7b) or `[` (0x5b).
    """
    stripped = data.lstrip(b" \t\n\r")
    return stripped[:1] in (b"{", b"[")


def _dumps(value: Any) -> bytes:
    # ASCII with \u escapes: a string from a client's JSON may hold a lone surrogate ("\ud800"), which
    # has no UTF-8; escaped, every message the node writes is valid text.
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def response(request_id: str | int | None, result: Any) -> bytes:
    return _dumps({"jsonrpc": "2.0", "id": request_id, "result": result})


def error_response(request_id: str | int | None, code: int, message: str) -> bytes:
    return _dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


def notification(method: str, params: dict[str, Any]) -> bytes:
    """A server notification (`recv`, `disconnect`, `event`...): no id, so the client sends no answer."""
    return _dumps({"jsonrpc": "2.0", "method": method, "params": params})


def header_of(flags: int) -> dict[str, bool]:
    return {name: True for name, bit in _HEADER_FLAGS if flags & bit}


def recv_notification(packet: Recv) -> bytes:
    """A RECV as the SDK parses it: `header` always an object (it echoes it in `recvack`), ids as text."""
    params: dict[str, Any] = {
        "header": header_of(packet.flags),
        "messageId": str(packet.message_id),
        "messageSeq": packet.message_seq,
        "clientMsgNo": packet.client_msg_no,
        "timestamp": packet.timestamp,
        "channelId": packet.channel_id,
        "channelType": packet.channel_type,
        "fromUid": packet.from_uid,
        "payload": base64.b64encode(packet.payload).decode("ascii"),
    }
    if packet.setting:
        setting = {name: True for name, bit in _SETTING_BITS if packet.setting & bit}
        if setting:
            params["setting"] = setting
    if packet.expire:
        params["expire"] = packet.expire
    if packet.topic:
        params["topic"] = packet.topic
    frame = notification("recv", params)
    assert frame.startswith(_RECV_PREFIX)  # `dup` relies on it
    return frame


def dup(frame: bytes) -> bytes:
    """The resend of a `recv` notification: its header with `"dup":true`."""
    if not frame.startswith(_RECV_PREFIX):
        return frame
    rest = frame[len(_RECV_PREFIX) :]
    return _RECV_PREFIX + (b'"dup":true' if rest.startswith(b"}") else b'"dup":true,') + rest


class JsonRpcCodec:
    """One connection's JSON-RPC state. `reply` queues a frame to the client (error responses)."""

    def __init__(self, reply: Callable[[bytes], object], max_pending: int = MAX_PENDING) -> None:
        self._reply = reply
        self.max_pending = max_pending
        self.version = LATEST_VERSION  # set by the gateway from CONNECT, as on a FrameDecoder
        self.errors = 0  # error responses sent
        self._ready: collections.deque[Packet] = collections.deque()
        self._connected = False
        self._connect_id: str | int | None = None
        self._ping_ids: collections.deque[str | int | None] = collections.deque()
        self._send_ids: dict[int, str | int | None] = {}
        self._next_seq = 0

    # -- inbound -----------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Decode one WebSocket message: its objects become packets (`next_packet`) or error responses."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(None, PARSE_ERROR, "not UTF-8 text")
            return
        decoder = json.JSONDecoder()
        pos, end = 0, len(text)
        while True:
            while pos < end and text[pos] in _WHITESPACE:
                pos += 1
            if pos >= end:
                return
            try:
                value, pos = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError):
                # The rest of the message cannot be resynchronised: it is dropped with this answer.
                self._fail(None, PARSE_ERROR, f"not JSON at character {pos}")
                return
            if value == []:
                self._fail(None, INVALID_REQUEST, "an empty batch")  # JSON-RPC 2.0 answers it so
                continue
            for item in value if isinstance(value, list) else [value]:
                self._take(item)

    def next_packet(self) -> Packet | None:
        return self._ready.popleft() if self._ready else None

    def _take(self, message: Any) -> None:
        request_id: str | int | None = None
        try:
            if not isinstance(message, dict):
                raise _BadRequest(INVALID_REQUEST, "a request must be a JSON object")
            raw_id = message.get("id")
            if isinstance(raw_id, str) or (type(raw_id) is int):
                request_id = raw_id
            elif raw_id is not None:
                raise _BadRequest(INVALID_REQUEST, "id must be a string or an integer")
            if message.get("jsonrpc", "2.0") != "2.0":
                raise _BadRequest(INVALID_REQUEST, 'jsonrpc must be "2.0"')
            method = message.get("method")
            if not isinstance(method, str):
                raise _BadRequest(INVALID_REQUEST, "method must be a string")
            params = message.get("params", {})
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise _BadRequest(INVALID_PARAMS, "params must be an object")
            if not self._connected and method != "connect":
                raise _BadRequest(INVALID_REQUEST, f"{method}: the first request must be connect")
            if method in ("connect", "send", "ping") and request_id is None:
                raise _BadRequest(INVALID_REQUEST, f"{method} is a request: it needs an id")
            if method == "connect":
                if self._connected:
                    raise _BadRequest(INVALID_REQUEST, "already connected")
                self._ready.append(_connect(params))
                self._connected = True
                self._connect_id = request_id
            elif method == "send":
                self._check_room()
                self._next_seq = (self._next_seq + 1) & U32_MAX
                self._ready.append(_send(params, self._next_seq))
                self._send_ids[self._next_seq] = request_id
            elif method == "recvack":
                self._ready.append(_recvack(params))
            elif method == "ping":
                self._check_room()
                self._ready.append(Ping())
                self._ping_ids.append(request_id)
            elif method == "disconnect":
                if request_id is not None:
                    self._reply(response(request_id, None))
                self._ready.append(Disconnect(0))
            else:
                raise _BadRequest(METHOD_NOT_FOUND, f"unknown method {method!r}")
        except _BadRequest as exc:
            self._fail(request_id, exc.code, exc.message)

    def _check_room(self) -> None:
        if len(self._send_ids) + len(self._ping_ids) >= self.max_pending:
            raise _BadRequest(TOO_MANY_PENDING, f"over {self.max_pending} requests awaiting their answer")

    def _fail(self, request_id: str | int | None, code: int, message: str) -> None:
        """Answer a bad request; before `connect` nothing else may follow (the gateway closes)."""
        self.errors += 1
        self._reply(error_response(request_id, code, message))
        if not self._connected:
            raise ProtocolError(f"JSON-RPC before connect: {message}")

    # -- outbound ----------------------------------------------------------------------------------------
    def encode(self, packet: Packet) -> bytes:
        """The JSON-RPC message for a packet the node sends this connection."""
        if isinstance(packet, Recv):
            return recv_notification(packet)
        if isinstance(packet, Sendack):
            result = {
                "messageId": str(packet.message_id),
                "messageSeq": packet.message_seq,
                "reasonCode": packet.reason_code,
            }
            return response(self._send_ids.pop(packet.client_seq, None), result)
        if isinstance(packet, Connack):
            connack: dict[str, Any] = {
                "reasonCode": packet.reason_code,
                "nodeId": packet.node_id,
                "timeDiff": packet.time_diff,
                "serverVersion": packet.server_version,
            }
            return response(self._connect_id, connack)
        if isinstance(packet, Pong):
            return response(self._ping_ids.popleft() if self._ping_ids else None, None)
        if isinstance(packet, Disconnect):
            return notification("disconnect", {"reasonCode": packet.reason_code, "reason": packet.reason})
        if isinstance(packet, Event):
            # WuKongIM's EventNotificationParams: `data` as text (the event's JSON object, which the SDK
            # parses). No `header`: an event has no flags (WuKongIM leaves it out when empty too).
            params = {"id": packet.id, "type": packet.type, "timestamp": packet.timestamp}
            return notification("event", {**params, "data": packet.data.decode("utf-8", "replace")})
        raise ProtocolError(f"{type(packet).__name__} has no JSON-RPC form")


# -- params ----------------------------------------------------------------------------------------------
def _text(params: dict[str, Any], key: str, limit: int, *, required: bool = False, default: str = "") -> str:
    value = params.get(key)
    if value is None:
        if required:
            raise _BadRequest(INVALID_PARAMS, f"params.{key} is missing")
        return default
    if not isinstance(value, str):
        raise _BadRequest(INVALID_PARAMS, f"params.{key} must be a string")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise _BadRequest(INVALID_PARAMS, f"params.{key} is not valid Unicode") from None
    if size > limit:
        raise _BadRequest(INVALID_PARAMS, f"params.{key} is over {limit} bytes")
    return value


def _int(params: dict[str, Any], key: str, low: int, high: int, *, required: bool = False) -> int:
    value = params.get(key)
    if value is None:
        if required:
            raise _BadRequest(INVALID_PARAMS, f"params.{key} is missing")
        return 0
    if type(value) is not int or not low <= value <= high:
        raise _BadRequest(INVALID_PARAMS, f"params.{key} must be an integer in {low}..{high}")
    return value


def _bits(params: dict[str, Any], key: str, names: tuple[tuple[str, int], ...]) -> int:
    value = params.get(key)
    if value is None:
        return 0
    if not isinstance(value, dict) or any(type(v) is not bool for v in value.values()):
        raise _BadRequest(INVALID_PARAMS, f"params.{key} must be an object of booleans")
    return sum(bit for name, bit in names if value.get(name))


def _connect(params: dict[str, Any]) -> Connect:
    uid = _text(params, "uid", MAX_ID_BYTES, required=True)
    if not uid:
        raise _BadRequest(INVALID_PARAMS, "params.uid is empty")
    return Connect(
        version=_int(params, "version", 0, 255) or LATEST_VERSION,
        device_flag=_int(params, "deviceFlag", 0, 255),
        device_id=_text(params, "deviceId", MAX_ID_BYTES),
        uid=uid,
        token=_text(params, "token", MAX_KEY_BYTES),
        client_timestamp=_int(params, "clientTimestamp", I64_MIN, I64_MAX),
        client_key="",  # no key exchange on this path (TLS via wss)
    )


def _send(params: dict[str, Any], client_seq: int) -> Send:
    channel_id = _text(params, "channelId", MAX_ID_BYTES, required=True)
    encoded = params.get("payload")
    if not isinstance(encoded, str):
        raise _BadRequest(INVALID_PARAMS, "params.payload must be a base64 string")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest(INVALID_PARAMS, "params.payload is not valid base64") from None
    topic = _text(params, "topic", MAX_ID_BYTES)
    setting = _bits(params, "setting", _SETTING_BITS) | (SETTING_TOPIC if topic else 0)
    return Send(
        setting=setting,
        client_seq=client_seq,
        # WuKongIM gives a send without one a fresh number too: the number dedups retries of one send.
        client_msg_no=_text(params, "clientMsgNo", MAX_ID_BYTES) or uuid.uuid4().hex,
        channel_id=channel_id,
        channel_type=_int(params, "channelType", 0, 255, required=True),
        payload=payload,
        expire=_int(params, "expire", 0, U32_MAX),
        topic=topic,
        flags=_bits(params, "header", _HEADER_FLAGS) & ~FLAG_DUP,
    )


def _recvack(params: dict[str, Any]) -> Recvack:
    message_id = params.get("messageId")
    if (
        isinstance(message_id, str)
        and message_id.isascii()
        and message_id.isdigit()
        and len(message_id) <= 19
    ):
        message_id = int(message_id)
    if type(message_id) is not int or not 0 <= message_id <= I64_MAX:
        raise _BadRequest(INVALID_PARAMS, "params.messageId must be a decimal message id")
    return Recvack(message_id, _int(params, "messageSeq", 0, U32_MAX, required=True))
