"""Raft commands: what a log entry holds, and the checks every field passes before it may be applied.

A log entry is one CBOR list of operations ("ops"), each a map with a type tag ``t``. The proposer merges the
ready work of many channels (and of the HTTP API) into one entry, because PySyncObj commits a few thousand
entries per second but well over a hundred thousand small messages per second when they share entries.

Every op is built by one constructor below (`send_op`, `token_op`...), and each constructor ends in
`check_op`, the same check apply runs: so bad input gets a clear BadCommand before it is proposed and never
reaches the log, and an entry hand-crafted or corrupted on the way still becomes an error result inside
apply, never an exception (an apply that raises stalls the whole cluster). The constructors return `Op`, the
only type the proposer takes, so mypy finds an op assembled by hand anywhere else.

What belongs in the log is what every node needs to apply and push the same way. Node-local facts (which
connection of which node sent a message, to skip echoing it back) stay on that node, keyed by message id.
Older journals may carry such extra keys (`node`, `conn` on sends): apply ignores keys it does not use.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NewType

import cbor2

# Reason codes of the WuKongIM protocol that apply can return (node.protocol.Reason has them all; a test
# checks that the two agree). raft/ may not import node/, so the few it needs are named here.
R_SUCCESS = 1
R_SUBSCRIBER_NOT_EXIST = 3
R_IN_BLACKLIST = 4
R_CHANNEL_NOT_EXIST = 5
R_NOT_ALLOW_SEND = 11
R_NOT_IN_WHITELIST = 13
R_SYSTEM_ERROR = 15
R_CHANNEL_ID_ERROR = 16
R_BAN = 19
R_NOT_SUPPORT_CHANNEL_TYPE = 23
R_DISBAND = 24
R_SEND_BAN = 25

CHANNEL_PERSON = 1
CHANNEL_GROUP = 2
# WuKongIM's temporary channel: `/message/send` with `subscribers`, a command to an explicit uid list.
# Only the business server sends to one (clients get reason 23), and only as a command (sync_once).
CHANNEL_TEMP = 8
# WuKongIM's agent channel (GoProto's ChannelTypeAgent): a user talking to an agent uid. Like a person channel
# it has two parties named in its stored id, but that id is `sender@addressed` (`agent_channel_id`), and
# nobody gets msg.offline for it.
CHANNEL_AGENT = 11
SUPPORTED_CHANNEL_TYPES = (CHANNEL_PERSON, CHANNEL_GROUP, CHANNEL_AGENT)
# Channels of exactly two parties, the sender and the addressed uid (a send op's `from` and `to`): both are
# the recipients and the subscribers, no member list decides.
PAIR_CHANNEL_TYPES = (CHANNEL_PERSON, CHANNEL_AGENT)

# Header flags of a message, as the fixed header's low bits carry them (node.wire.protocol has the same
# values; a test checks that they agree). Stored in a send op as `hf`, absent when 0.
HF_NO_PERSIST = 0x01
HF_RED_DOT = 0x02
HF_SYNC_ONCE = 0x04
HF_ALL = HF_NO_PERSIST | HF_RED_DOT | HF_SYNC_ONCE
# The setting bit of a streamed message (node.wire.protocol.SETTING_STREAM; a test checks they agree): only
# a message sent with it takes message events.
SETTING_STREAM = 0x02
# A command message (sync_once) is stored in the channel's command channel, WuKongIM's cmd channel: the
# stored id plus this suffix. Its seqs never count as unread, it is in no conversation, and every
# recipient finds it in their command queue (`/message/sync`).
CMD_SUFFIX = "____cmd"
# The command queue of one user keeps at most this many commands not yet acknowledged; the oldest go.
CMD_QUEUE_MAX = 1000
MAX_TOPIC_BYTES = 255

# Identifier caps keep every LMDB key (511 bytes at most) in range: the longest, a dedup key, is
# channel (2 + 129) + sender (1 + 64) + client_msg_no (1 + 128) bytes.
MAX_UID_BYTES = 64
MAX_ID_BYTES = 128  # group channel ids, client_msg_no
MAX_CHANNEL_ID_BYTES = 2 * MAX_UID_BYTES + 1  # a person channel's stored id is "uid@uid"
MAX_TOKEN_BYTES = 1024
MAX_PAYLOAD_BYTES = 1 << 20
MAX_UIDS_PER_OP = 10_000
# A person channel is stored as `uid@uid` (WuKongIM's fake channel id, which sync and webhooks show). With
# `@` inside a uid two pairs could share one stored channel (`eve` + `mail.com@bob` and `eve@mail.com` +
# `bob` both give `eve@mail.com@bob`), so no uid may hold it: WuKongIM refuses it too (`IsSpecialChar`).
PERSON_SEPARATOR = "@"
UID_RULE = f"must not contain {PERSON_SEPARATOR!r} (it joins the two uids of a person channel)"
MEMBER_LISTS = ("subscribers", "blacklist", "whitelist")
# A channel's flags. allow_stranger (person channels): senders outside the user's whitelist may write to it.
CHANNEL_FLAGS = ("ban", "disband", "send_ban", "large", "allow_stranger")
MEMBER_ACTIONS = ("add", "set", "remove")

OP_SEND = "send"
OP_TOKEN = "token"
OP_CHANNEL = "channel"
OP_MEMBERS = "members"
OP_CHANNEL_DELETE = "channel_delete"
OP_PRESENCE = "presence"
OP_NODE_EPOCH = "node_epoch"
OP_NODE_DOWN = "node_down"
MAX_PRESENCE_CHANGES = 10_000
OP_HANDLER_STATE = "handler_state"
OP_SYSTEM_UIDS = "system_uids"
OP_DEVICE_QUIT = "device_quit"
OP_CONVERSATION = "conversation"
OP_WEBHOOK_CONFIG = "webhook_config"
OP_WEBHOOK_ADVANCE = "webhook_advance"
OP_WEBHOOK_DEADLETTER = "webhook_deadletter"
OP_DEADLETTER_REMOVE = "deadletter_remove"
# /message/sync hands out a user's queued commands (`cmd_sync` records how far), /message/syncack drops
# what the last sync handed out (`cmd_ack`): both replicated, so any node may answer either.
OP_CMD_SYNC = "cmd_sync"
OP_CMD_ACK = "cmd_ack"
# A persisted event of a streamed message (WuKongIM's `/message/event`, every type but stream.delta, which
# never enters the log): raft/msgevents.py applies it.
OP_MSG_EVENT = "msg_event"
# Message events (WuKongIM `pkg/wkdb/message_event.go`).
EVENT_STREAM_DELTA = "stream.delta"
EVENT_STREAM_SNAPSHOT = "stream.snapshot"
EVENT_STREAM_CLOSE = "stream.close"
EVENT_STREAM_ERROR = "stream.error"
EVENT_STREAM_CANCEL = "stream.cancel"
EVENT_STREAM_FINISH = "stream.finish"
EVENT_KEY_MAIN = "main"
EVENT_KEY_FINISH = "__finish__"  # stream.finish always lands on this key (WuKongIM's message-level end)
STATUS_OPEN, STATUS_CLOSED, STATUS_ERROR, STATUS_CANCELLED = "open", "closed", "error", "cancelled"
TERMINAL_STATUS_OF = {
    EVENT_STREAM_CLOSE: STATUS_CLOSED,
    EVENT_STREAM_ERROR: STATUS_ERROR,
    EVENT_STREAM_CANCEL: STATUS_CANCELLED,
    EVENT_STREAM_FINISH: STATUS_CLOSED,
}
MAX_EVENT_TYPE_BYTES = 64
MAX_EVENT_KEY_BYTES = 64
MAX_EVENT_KEYS = 64  # event keys of one streamed message (its parallel lanes)
MAX_VISIBILITY_BYTES = 16
MAX_EVENT_ERROR_BYTES = 1024
# Persisted events of one streamed message: each keeps its event_id for idempotency in the message's one
# state row, so the row stays bounded (deltas, the bulk of a stream, are never persisted).
MAX_PERSISTED_EVENTS = 4096
# The webhook streams and the event name each one posts as: the one table that the config, apply and
# delivery read.
WEBHOOK_EVENT_OF_STREAM = {"notify": "msg.notify", "offline": "msg.offline", "online": "user.onlinestatus"}
WEBHOOK_STREAMS = tuple(WEBHOOK_EVENT_OF_STREAM)
WEBHOOK_EVENTS = tuple(WEBHOOK_EVENT_OF_STREAM.values())
CONVERSATION_ACTIONS = ("clear", "set_unread", "delete")
MAX_URL_BYTES = 2048
# The sender of a message the business server sends without a from_uid; WuKongIM shows it as "".
SYSTEM_UID = "____system"

Op = NewType("Op", dict[str, Any])
"""A checked op, ready to propose: only `check_op` (through the constructors below) makes one."""


class BadCommand(ValueError):
    """A command failed validation; the message names the field."""


# -- the message row, pre-encoded by the proposer ---------------------------------------------------------
# A send op travels in the entry as a CBOR byte string holding the message's stored row: a map whose first
# key is `seq`, written as an 8-byte integer (0 in the log), then every field of the op but `t`. Apply copies
# the row, writes the seq it assigns into those 8 bytes and stores it: no decode-then-re-encode on any node,
# and every node stores the bytes the proposer built. The row is an ordinary CBOR map, so readers take it
# as they take the rows apply encoded itself before (`seq` sits in it as it always did; `to` and `api`,
# the receiver and "sent by the business server", come along). A send op that is a map in the entry (what
# earlier versions proposed) is still stored the old way, byte for byte, so replaying an old journal gives
# every node the store it gave before.
ROW = "row"  # the key under which `decode_entry` hands apply a send op's pre-encoded row
_SEQ_SLOT = b"\x63seq\x1b"  # text(3) "seq", then the head of an 8-byte unsigned integer
SEQ_AT = 1 + len(_SEQ_SLOT)  # where the 8 seq bytes start (after a one-byte map head)
_ROW_MAX_FIELDS = 22  # seq plus these must fit a one-byte CBOR map head (at most 23 pairs)
_T_SEND = cbor2.dumps({"t": OP_SEND})[1:]  # the first pair of a send op as cbor2 writes it
_BAD_ROW: dict[str, Any] = {"t": OP_SEND, ROW: b""}  # an unreadable row: check_op refuses it by name


def message_row(op: dict[str, Any]) -> bytes | None:
    """The stored row of a send op with its seq slot zeroed (None: too many fields to pre-encode)."""
    if len(op) <= _ROW_MAX_FIELDS + 1 and ROW not in op:
        # The common case, an op from `send_op` (its `t` first): its own encoding with the `t` pair
        # swapped for the seq slot, one field out and one in, so the map head stays as it is.
        raw = cbor2.dumps(op)
        if raw[1 : 1 + len(_T_SEND)] == _T_SEND:
            return b"".join((raw[:1], _SEQ_SLOT, bytes(8), raw[1 + len(_T_SEND) :]))
    fields = {name: value for name, value in op.items() if name != "t" and name != ROW}
    if len(fields) > _ROW_MAX_FIELDS:
        return None
    # cbor2 writes a map of fewer than 24 pairs behind a one-byte head: swap it for ours, seq in front.
    return bytes((0xA0 + len(fields) + 1,)) + _SEQ_SLOT + bytes(8) + cbor2.dumps(fields)[1:]


def encode_entry(ops: Sequence[Op]) -> bytes:
    """One entry: send ops as their pre-encoded rows (once, here on the proposing node), others as maps."""
    items: list[Any] = []
    for op in ops:
        row = message_row(op) if isinstance(op, dict) and op.get("t") == OP_SEND else None
        items.append(op if row is None else row)
    return cbor2.dumps(items)


def _send_of_row(raw: bytes) -> dict[str, Any]:
    """The send op a pre-encoded row carries, with the row itself under ROW. A row that is not exactly
    what `message_row` makes (not a map, seq not first or not zero, a key twice, a `t` or ROW of its own)
    becomes an op that check_op refuses, so apply answers it with an error and stores nothing."""
    try:
        op = cbor2.loads(raw)
    except Exception:  # cbor2 raises several types on garbage
        return dict(_BAD_ROW)
    if (
        type(op) is not dict
        or raw[1:SEQ_AT] != _SEQ_SLOT
        or raw[0] != 0xA0 + len(op)  # fewer keys than pairs: one came twice (a second seq, say)
        or op.pop("seq", None) != 0
        or "t" in op
        or ROW in op
    ):
        return dict(_BAD_ROW)
    op["t"] = OP_SEND
    op[ROW] = raw
    return op


def decode_entry(data: bytes) -> list[Any]:
    """Decode one log entry; raises BadCommand on anything that is not a list.

    A send op that came as a pre-encoded row is returned as its op map holding the row under ROW. A map
    op may not bring a ROW of its own (it is dropped): apply stores a row only where it is the op."""
    try:
        ops = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise BadCommand(f"entry is not CBOR: {exc}") from exc
    if not isinstance(ops, list):
        raise BadCommand("entry is not a list of ops")
    for at, item in enumerate(ops):
        if type(item) is bytes:
            ops[at] = _send_of_row(item)
        elif type(item) is dict and ROW in item:
            del item[ROW]
    return ops


def utf8_size(value: str, field: str) -> int:
    """Byte length of `value` in UTF-8; a lone surrogate (JSON can carry one) is a BadCommand."""
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise BadCommand(f"{field} is not valid UTF-8 text") from None


def _id(op: dict[str, Any], field: str, *, allow_empty: bool = False, max_bytes: int = MAX_ID_BYTES) -> None:
    value = op.get(field)
    if not isinstance(value, str):
        raise BadCommand(f"{field} must be a string")
    if not value and not allow_empty:
        raise BadCommand(f"{field} must not be empty")
    if utf8_size(value, field) > max_bytes:
        raise BadCommand(f"{field} longer than {max_bytes} bytes")


def valid_uid(uid: str) -> bool:
    """Whether `uid` may name a user: see PERSON_SEPARATOR (length is checked where it is decoded)."""
    return PERSON_SEPARATOR not in uid


def _uid(op: dict[str, Any], field: str, *, allow_empty: bool = False, rule: bool = True) -> None:
    _id(op, field, allow_empty=allow_empty, max_bytes=MAX_UID_BYTES)
    if rule and not valid_uid(op[field]):
        raise BadCommand(f"{field} {UID_RULE}")


def _int(op: dict[str, Any], field: str, low: int, high: int) -> None:
    value = op.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadCommand(f"{field} must be an integer in [{low}, {high}]")


def _bool(op: dict[str, Any], field: str) -> None:
    if field in op and not isinstance(op[field], bool):
        raise BadCommand(f"{field} must be a boolean")


def _uids(op: dict[str, Any], field: str = "uids", *, rule: bool = True) -> None:
    uids = op.get(field)
    if not isinstance(uids, list) or len(uids) > MAX_UIDS_PER_OP:
        raise BadCommand(f"{field} must be a list of at most {MAX_UIDS_PER_OP} uids")
    for uid in uids:
        if not isinstance(uid, str) or not uid or utf8_size(uid, field) > MAX_UID_BYTES:
            raise BadCommand(
                f"every entry of {field} must be a non-empty string of at most {MAX_UID_BYTES} bytes"
            )
        if rule and not valid_uid(uid):
            raise BadCommand(f"every entry of {field} {UID_RULE}")


def _channel(op: dict[str, Any]) -> None:
    _id(op, "cid", max_bytes=MAX_CHANNEL_ID_BYTES)
    _int(op, "ct", 0, 255)


def _plain_send(op: dict[str, Any], uid_rule: bool) -> bool:
    """True for an ordinary message whose every field is certainly fine: a shortcut past `_check_send`
    that apply takes on every node for every message. ASCII ids are measured by their length (a byte per
    character); anything else (expire, topic, subscribers, other text, a field out of range) takes
    the full check, which decides and names the field, so both give the same answer."""
    try:
        cid, sender, cmn, ct = op["cid"], op["from"], op["cmn"], op["ct"]
        mid, ts, setting, payload = op["mid"], op["ts"], op["setting"], op["payload"]
    except KeyError:
        return False
    receiver = op.get("to", "")
    header = op.get("hf", 1)  # the SDKs set RedDot on every message: flags must not leave the shortcut
    return (
        type(cid) is str
        and 0 < len(cid) <= MAX_CHANNEL_ID_BYTES
        and cid.isascii()
        and type(sender) is str
        and 0 < len(sender) <= MAX_UID_BYTES
        and sender.isascii()
        and type(cmn) is str
        and 0 < len(cmn) <= MAX_ID_BYTES
        and cmn.isascii()
        and type(receiver) is str
        and len(receiver) <= MAX_UID_BYTES
        and receiver.isascii()
        and (not uid_rule or (PERSON_SEPARATOR not in sender and PERSON_SEPARATOR not in receiver))
        and ct in SUPPORTED_CHANNEL_TYPES
        and type(ct) is int
        and type(mid) is int
        and 0 <= mid < 1 << 63
        and type(ts) is int
        and 0 <= ts < 1 << 32
        and type(setting) is int
        and 0 <= setting <= 255
        and type(payload) is bytes
        and len(payload) <= MAX_PAYLOAD_BYTES
        and type(op.get("api", False)) is bool
        and type(header) is int
        and 1 <= header <= HF_ALL
        and "exp" not in op
        and "tp" not in op
        and "subs" not in op
    )


def _check_send(op: dict[str, Any], uid_rule: bool) -> None:
    _channel(op)
    _uid(op, "from", rule=uid_rule)
    _id(op, "cmn")
    _int(op, "mid", 0, (1 << 63) - 1)
    _int(op, "ts", 0, (1 << 32) - 1)
    _int(op, "setting", 0, 255)
    payload = op.get("payload")
    if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD_BYTES:
        raise BadCommand(f"payload must be bytes of at most {MAX_PAYLOAD_BYTES}")
    if "to" in op:
        _uid(op, "to", allow_empty=True, rule=uid_rule)
    _bool(op, "api")
    # Header flags, expire and topic came later: an older entry has none of them (all zero).
    if "hf" in op:
        _int(op, "hf", 1, HF_ALL)
    if "exp" in op:
        _int(op, "exp", 1, (1 << 32) - 1)
    if "tp" in op:
        _id(op, "tp", max_bytes=MAX_TOPIC_BYTES)
    if "subs" in op:
        if op["ct"] != CHANNEL_TEMP or not op.get("api"):
            raise BadCommand("subs is only for a temporary channel sent by the business server")
        _uids(op, "subs", rule=uid_rule)
    if op["ct"] == CHANNEL_TEMP and ("subs" not in op or not int(op.get("hf", 0)) & HF_SYNC_ONCE):
        raise BadCommand("a temporary channel message needs subs and the sync_once flag")


def check_op(op: Any, *, uid_rule: bool = True) -> Op:
    """Validate one op and return it; raises BadCommand naming the first bad field.

    `uid_rule=False` (apply) leaves out the rule that a uid holds no `@`: it came after ops were already
    committed, and apply must give every entry the result it gave when first applied, on every node and
    version (a node catching up from the log would otherwise refuse what the others stored). The rule is
    enforced where uids enter (CONNECT, SEND, HTTP) and in every constructor below.
    """
    if not isinstance(op, dict):
        raise BadCommand("op must be a map")
    kind = op.get("t")
    if kind == OP_SEND:
        if ROW in op and (type(op[ROW]) is not bytes or op[ROW][1:SEQ_AT] != _SEQ_SLOT):
            raise BadCommand("row is not a pre-encoded message row")
        if not _plain_send(op, uid_rule):
            _check_send(op, uid_rule)
    elif kind == OP_TOKEN:
        _uid(op, "uid", rule=uid_rule)
        _int(op, "flag", 0, 255)
        _int(op, "level", 0, 255)
        token = op.get("token")
        if not isinstance(token, str) or utf8_size(token, "token") > MAX_TOKEN_BYTES:
            raise BadCommand(f"token must be a string of at most {MAX_TOKEN_BYTES} bytes")
    elif kind == OP_CHANNEL:
        _channel(op)
        for flag in CHANNEL_FLAGS:
            if flag in op:
                _int(op, flag, 0, 1)
        if "subs" in op:
            _uids(op, "subs", rule=uid_rule)
        _bool(op, "reset")
    elif kind == OP_MEMBERS:
        _channel(op)
        if op.get("list") not in MEMBER_LISTS:
            raise BadCommand(f"list must be one of {', '.join(MEMBER_LISTS)}")
        if op.get("action") not in MEMBER_ACTIONS:
            raise BadCommand(f"action must be one of {', '.join(MEMBER_ACTIONS)}")
        _uids(op, rule=uid_rule)
    elif kind == OP_CHANNEL_DELETE:
        _channel(op)
    elif kind == OP_PRESENCE:
        _int(op, "node", 0, 1023)
        _int(op, "epoch", 0, (1 << 63) - 1)
        changes = op.get("changes")
        if not isinstance(changes, list) or len(changes) > MAX_PRESENCE_CHANGES:
            raise BadCommand(f"changes must be a list of at most {MAX_PRESENCE_CHANGES}")
        for change in changes:
            if not isinstance(change, dict):
                raise BadCommand("every presence change must be a map")
            _uid(change, "uid", rule=uid_rule)
            _int(change, "conn", 0, (1 << 63) - 1)
            _int(change, "flag", 0, 255)
            _int(change, "level", 0, 255)
            if "dev" in change:  # the device id (the login rules compare it); absent in older entries
                _id(change, "dev", allow_empty=True)
            if not isinstance(change.get("online"), bool):
                raise BadCommand("online must be a boolean")
    elif kind == OP_SYSTEM_UIDS:
        if op.get("action") not in ("add", "remove"):
            raise BadCommand("action must be add or remove")
        _uids(op, rule=uid_rule)
    elif kind == OP_DEVICE_QUIT:
        _uid(op, "uid", rule=uid_rule)
        _int(op, "flag", -1, 255)
    elif kind == OP_CONVERSATION:
        _channel(op)
        _uid(op, "uid", rule=uid_rule)
        if op.get("action") not in CONVERSATION_ACTIONS:
            raise BadCommand(f"action must be one of {', '.join(CONVERSATION_ACTIONS)}")
        if op["action"] == "set_unread":
            _int(op, "unread", 0, (1 << 32) - 1)
    elif kind == OP_WEBHOOK_CONFIG:
        url = op.get("url")
        if not isinstance(url, str) or utf8_size(url, "url") > MAX_URL_BYTES:
            raise BadCommand(f"url must be a string of at most {MAX_URL_BYTES} bytes")
        events = op.get("events")
        if not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events):
            raise BadCommand(f"events must be a list of {', '.join(WEBHOOK_EVENTS)}")
        for cap in ("outbox_max", "deadletters_max"):
            if cap in op:
                _int(op, cap, 1, 1 << 40)
    elif kind in (OP_WEBHOOK_ADVANCE, OP_WEBHOOK_DEADLETTER):
        if op.get("stream") not in WEBHOOK_STREAMS:
            raise BadCommand(f"stream must be one of {', '.join(WEBHOOK_STREAMS)}")
        _int(op, "from", 0, (1 << 63) - 1)
        _int(op, "to", 0, (1 << 63) - 1)
        if kind == OP_WEBHOOK_DEADLETTER:
            error = op.get("error")
            if not isinstance(error, str) or utf8_size(error, "error") > 1024:
                raise BadCommand("error must be a string of at most 1024 bytes")
            _int(op, "attempts", 0, 1 << 20)
    elif kind == OP_DEADLETTER_REMOVE:
        if op.get("stream") not in WEBHOOK_STREAMS:
            raise BadCommand(f"stream must be one of {', '.join(WEBHOOK_STREAMS)}")
        seqs = op.get("seqs")
        if not isinstance(seqs, list) or len(seqs) > MAX_UIDS_PER_OP:
            raise BadCommand("seqs must be a list")
        for seq in seqs:
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise BadCommand("every seq must be a non-negative integer")
    elif kind in (OP_CMD_SYNC, OP_CMD_ACK):
        _uid(op, "uid", rule=uid_rule)
        if kind == OP_CMD_SYNC:
            _int(op, "upto", 0, (1 << 63) - 1)
    elif kind == OP_MSG_EVENT:
        _check_msg_event(op, uid_rule)
    elif kind == OP_HANDLER_STATE:
        _id(op, "name")
        if not isinstance(op.get("enabled"), bool):
            raise BadCommand("enabled must be a boolean")
    elif kind in (OP_NODE_EPOCH, OP_NODE_DOWN):
        _int(op, "node", 0, 1023)
        _int(op, "epoch", 0, (1 << 63) - 1)
    else:
        raise BadCommand(f"unknown op type {kind!r}")
    return Op(op)


def _payload_bytes(op: dict[str, Any], field: str) -> None:
    value = op.get(field)
    if not isinstance(value, bytes) or len(value) > MAX_PAYLOAD_BYTES:
        raise BadCommand(f"{field} must be bytes of at most {MAX_PAYLOAD_BYTES}")


def _check_msg_event(op: dict[str, Any], uid_rule: bool) -> None:
    _channel(op)
    _uid(op, "from", rule=uid_rule)
    _id(op, "cmn")
    _id(op, "eid")
    _id(op, "key", max_bytes=MAX_EVENT_KEY_BYTES)
    _id(op, "et", max_bytes=MAX_EVENT_TYPE_BYTES)
    if op["et"] == EVENT_STREAM_DELTA:
        raise BadCommand("stream.delta events are not persisted")
    _id(op, "vis", allow_empty=True, max_bytes=MAX_VISIBILITY_BYTES)
    _int(op, "at", 0, (1 << 63) - 1)
    _payload_bytes(op, "payload")
    snaps = op.get("snaps", {})
    if not isinstance(snaps, dict) or len(snaps) > MAX_EVENT_KEYS:
        raise BadCommand(f"snaps must be a map of at most {MAX_EVENT_KEYS} event keys")
    for key, snap in snaps.items():
        _id({"key": key}, "key", max_bytes=MAX_EVENT_KEY_BYTES)
        _payload_bytes({"snap": snap}, "snap")
    _int(op, "er", 0, 255)
    err = op.get("err", "")
    if not isinstance(err, str) or utf8_size(err, "err") > MAX_EVENT_ERROR_BYTES:
        raise BadCommand(f"err must be a string of at most {MAX_EVENT_ERROR_BYTES} bytes")


# -- constructors: the one place each op is assembled ------------------------------------------------------
def send_op(
    *,
    channel_id: str,
    channel_type: int,
    sender: str,
    receiver: str,
    client_msg_no: str,
    message_id: int,
    timestamp: int,
    setting: int,
    payload: bytes,
    api: bool = False,
    header: int = 0,
    expire: int = 0,
    topic: str = "",
    subscribers: list[str] | None = None,
) -> Op:
    """A message. `channel_id` is the stored id (`person_channel_id` for a person channel, whose other
    party is `receiver`; "" for a group). `api`: sent by the business server (channel-level checks only).

    `header`: the HF_* flag bits, `expire` and `topic` travel to every RECV; each is left out of the op
    when zero or empty, so an ordinary message costs no more log bytes than before. `subscribers`: the
    uid list of a temporary channel (CHANNEL_TEMP)."""
    op: dict[str, Any] = {
        "t": OP_SEND,
        "cid": channel_id,
        "ct": channel_type,
        "from": sender,
        "to": receiver,
        "cmn": client_msg_no,
        "mid": message_id,
        "ts": timestamp,
        "setting": setting,
        "payload": payload,
    }
    if api:
        op["api"] = True
    if header:
        op["hf"] = header
    if expire:
        op["exp"] = expire
    if topic:
        op["tp"] = topic
    if subscribers is not None:
        op["subs"] = subscribers
    return check_op(op)


def msg_event_op(
    *,
    channel_id: str,
    channel_type: int,
    sender: str,
    client_msg_no: str,
    event_id: str,
    event_key: str,
    event_type: str,
    visibility: str,
    occurred_at: int,
    payload: bytes,
    snapshots: dict[str, bytes] | None = None,
    end_reason: int = 0,
    error: str = "",
) -> Op:
    """A persisted event of the streamed message `client_msg_no` sent by `sender` to the stored channel
    `channel_id`. `snapshots`: the text each event key holds in the memory of the node that took the
    stream's deltas, per key this event ends (a terminal event's merged snapshot). `end_reason` and
    `error` come from the payload of stream.close and stream.error."""
    op: dict[str, Any] = {
        "t": OP_MSG_EVENT,
        "cid": channel_id,
        "ct": channel_type,
        "from": sender,
        "cmn": client_msg_no,
        "eid": event_id,
        "key": event_key,
        "et": event_type,
        "vis": visibility,
        "at": occurred_at,
        "payload": payload,
        "er": end_reason,
        "err": error,
    }
    if snapshots:
        op["snaps"] = snapshots
    return check_op(op)


def cmd_sync_op(uid: str, upto: int) -> Op:
    """/message/sync handed `uid` its queued commands up to queue position `upto`."""
    return check_op({"t": OP_CMD_SYNC, "uid": uid, "upto": upto})


def cmd_ack_op(uid: str) -> Op:
    """/message/syncack: drop the commands the last /message/sync of `uid` handed out."""
    return check_op({"t": OP_CMD_ACK, "uid": uid})


def token_op(uid: str, token: str, device_flag: int, device_level: int) -> Op:
    return check_op({"t": OP_TOKEN, "uid": uid, "token": token, "flag": device_flag, "level": device_level})


def device_quit_op(uid: str, device_flag: int) -> Op:
    """Log a device out (-1: every device of the user)."""
    return check_op({"t": OP_DEVICE_QUIT, "uid": uid, "flag": device_flag})


def system_uids_op(action: str, uids: list[str]) -> Op:
    return check_op({"t": OP_SYSTEM_UIDS, "action": action, "uids": uids})


def channel_op(
    channel_id: str,
    channel_type: int,
    *,
    ban: int,
    disband: int,
    send_ban: int,
    large: int,
    allow_stranger: int = 0,
    subscribers: list[str] | None = None,
    reset: bool | None = None,
) -> Op:
    """Create or update a channel: every flag is written; `subscribers`/`reset` only when given."""
    op: dict[str, Any] = {
        "t": OP_CHANNEL,
        "cid": channel_id,
        "ct": channel_type,
        "ban": ban,
        "disband": disband,
        "send_ban": send_ban,
        "large": large,
        "allow_stranger": allow_stranger,
    }
    if subscribers is not None:
        op["subs"] = subscribers
    if reset is not None:
        op["reset"] = reset
    return check_op(op)


def channel_delete_op(channel_id: str, channel_type: int) -> Op:
    return check_op({"t": OP_CHANNEL_DELETE, "cid": channel_id, "ct": channel_type})


def members_op(member_list: str, action: str, channel_id: str, channel_type: int, uids: list[str]) -> Op:
    """Add, set or remove uids of a channel's subscribers, blacklist or whitelist."""
    return check_op(
        {
            "t": OP_MEMBERS,
            "list": member_list,
            "action": action,
            "cid": channel_id,
            "ct": channel_type,
            "uids": uids,
        }
    )


def conversation_op(
    action: str, uid: str, channel_id: str, channel_type: int, *, unread: int | None = None
) -> Op:
    """clear, set_unread (with `unread`) or delete one conversation of `uid` (stored channel id)."""
    op: dict[str, Any] = {
        "t": OP_CONVERSATION,
        "action": action,
        "uid": uid,
        "cid": channel_id,
        "ct": channel_type,
    }
    if unread is not None:
        op["unread"] = unread
    return check_op(op)


def presence_change(
    uid: str, conn: int, device_flag: int, device_level: int, online: bool, device_id: str = ""
) -> dict[str, Any]:
    """One connection coming or going, for `presence_op` (which checks it). `dev`, the device id, rides
    along so other nodes apply the login rules by device (apply does not store it)."""
    change = {"uid": uid, "conn": conn, "flag": device_flag, "level": device_level, "online": online}
    if online:
        change["dev"] = device_id
    return change


def presence_op(node: int, epoch: int, changes: list[dict[str, Any]]) -> Op:
    return check_op({"t": OP_PRESENCE, "node": node, "epoch": epoch, "changes": changes})


def node_epoch_op(node: int, epoch: int) -> Op:
    return check_op({"t": OP_NODE_EPOCH, "node": node, "epoch": epoch})


def node_down_op(node: int, epoch: int) -> Op:
    return check_op({"t": OP_NODE_DOWN, "node": node, "epoch": epoch})


def handler_state_op(name: str, enabled: bool) -> Op:
    return check_op({"t": OP_HANDLER_STATE, "name": name, "enabled": enabled})


def webhook_config_op(url: str, events: list[str], outbox_max: int, deadletters_max: int | None = None) -> Op:
    """`deadletters_max`: dead letters kept per stream (None: apply's default)."""
    op = {"t": OP_WEBHOOK_CONFIG, "url": url, "events": events, "outbox_max": outbox_max}
    if deadletters_max is not None:
        op["deadletters_max"] = deadletters_max
    return check_op(op)


def webhook_advance_op(stream: str, start: int, end: int) -> Op:
    """Compare-and-set: the stream's cursor moves from `start` to `end` only if it is still at `start`."""
    return check_op({"t": OP_WEBHOOK_ADVANCE, "stream": stream, "from": start, "to": end})


def webhook_deadletter_op(stream: str, start: int, end: int, error: str, attempts: int) -> Op:
    """Compare-and-set like an advance; the events (start, end] move to the dead letters."""
    return check_op(
        {
            "t": OP_WEBHOOK_DEADLETTER,
            "stream": stream,
            "from": start,
            "to": end,
            "error": error,
            "attempts": attempts,
        }
    )


def deadletter_remove_op(stream: str, seqs: list[int]) -> Op:
    return check_op({"t": OP_DEADLETTER_REMOVE, "stream": stream, "seqs": seqs})


# -- person channels ---------------------------------------------------------------------------------------
def person_channel_id(uid_a: str, uid_b: str) -> str:
    """The stored id of the person channel between two users, the same whoever sends (WuKongIM's rule).

    `a@b` when (crc32(a), a) > (crc32(b), b), else `b@a`: the crc decides, bytes break a tie.
    Invariant: for uids that pass `valid_uid`, two different pairs never get the same id.
    """
    key_a = (zlib.crc32(uid_a.encode()), uid_a.encode())
    key_b = (zlib.crc32(uid_b.encode()), uid_b.encode())
    return f"{uid_a}@{uid_b}" if key_a > key_b else f"{uid_b}@{uid_a}"


def agent_channel_id(sender: str, addressed: str) -> str:
    """The stored id of what `sender` sends to `addressed` on an agent channel (type 11): `sender@addressed`,
    WuKongIM's `GetAgentChannelIDWith(fromUID, channelId)` on every path (SEND, /message/send,
    /message/event). So a user's messages to an agent (`user@agent`) and the agent's replies (`agent@user`)
    are two channels, each with both as parties; README "Streamed messages for AI chat" says why."""
    return f"{sender}@{addressed}"


def person_peer(channel_id: str, viewer: str) -> str:
    """The id under which `viewer` sees a stored person channel: the other party (WuKongIM shows a person
    channel as the person). The inverse of `person_channel_id`. Matched whole, so a uid that holds an "@"
    itself still splits right; an id the viewer is no party of shows its first half, as it always did."""
    if channel_id.startswith(viewer + "@"):
        return channel_id[len(viewer) + 1 :]
    if channel_id.endswith("@" + viewer):
        return channel_id[: -len(viewer) - 1]
    return channel_id.partition("@")[0]
