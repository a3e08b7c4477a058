"""The webhook outbox: events written by apply, delivered by the leader, advanced through Raft.

Every event has a stable id (stream, seq), so a receiver can deduplicate what at-least-once delivery may
repeat. Streams: `notify` (msg.notify), `offline` (msg.offline), `online` (user.onlinestatus). Apply
appends only while a webhook is configured (replicated state, so every node writes the same rows). The
leader reads from the stream's cursor, posts, and proposes `advance(stream, from, to)`: a compare-and-set,
so a deposed leader's late advance changes nothing. After the configured attempts it proposes
`deadletter(stream, from, to, error)`, which moves the events to the dead-letter list (also replicated).
The outbox is capped: an event pushed past the cap goes to the dead letters instead of growing the store.
The dead letters are capped too, per stream (`deadletters_max` of the replicated settings): past it the
oldest of the stream are dropped and counted (`deadletters_dropped:<stream>`), so a receiver that never
answers cannot grow the store either. Apply keeps the count (`deadletters_count:<stream>`) so the cap costs
no scan; a store written before it was kept is counted once, the same rows on every node.

Events hold references, not copies: a message event is (channel key, seq); the leader builds the JSON
when it sends. A msg.offline event also holds the entry's Raft index, so the leader's `to_uids` are the
subscribers offline at that point of the log (presence rows, and `presence_left` for who left since).
"""

from __future__ import annotations

import struct
from typing import Any

from raft import commands as c
from raft.view import EntryView, Result
from storage.store import Txn

# Each stream's code is the first byte of its stored keys: streams may be added, never reordered.
STREAMS = {stream: code for code, stream in enumerate(c.WEBHOOK_STREAMS, start=1)}
DEFAULT_OUTBOX_MAX = 100_000
DEFAULT_DEADLETTERS_MAX = 10_000
_KEY = struct.Struct(">BQ")


def key(stream: str, seq: int) -> bytes:
    return _KEY.pack(STREAMS[stream], seq)


def seq_of(raw: bytes) -> int:
    return int(_KEY.unpack(raw)[1])


def config(view: EntryView | Txn) -> dict[str, Any] | None:
    value = view.meta("webhook")
    return value if isinstance(value, dict) and value.get("url") else None


def wants(view: EntryView, stream: str) -> bool:
    hook = config(view)
    return hook is not None and c.WEBHOOK_EVENT_OF_STREAM[stream] in hook.get("events", [])


def head(view: EntryView | Txn, stream: str) -> int:
    return int(view.meta(f"outbox_head:{stream}") or 0)


def cursor(view: EntryView | Txn, stream: str) -> int:
    return int(view.meta(f"outbox_cursor:{stream}") or 0)


def append(view: EntryView, stream: str, event: dict[str, Any]) -> None:
    seq = head(view, stream) + 1
    view.set_meta(f"outbox_head:{stream}", seq)
    view.txn.put("outbox", key(stream, seq), event)
    limit = int((config(view) or {}).get("outbox_max", DEFAULT_OUTBOX_MAX))
    done = cursor(view, stream)
    if seq - done > limit:
        # Capped: the oldest undelivered event moves to the dead letters rather than grow the store.
        _move_to_deadletters(view, stream, done, done + 1, "outbox full", 0)


def deadletter_count(view: EntryView | Txn, stream: str) -> int:
    """How many dead letters the stream holds now."""
    counted = view.meta(f"deadletters_count:{stream}")
    if counted is None:  # a store written before the count was kept
        txn = view.txn if isinstance(view, EntryView) else view
        return len(txn.scan("deadletters", bytes((STREAMS[stream],))))
    return int(counted)


def deadletters_dropped(view: EntryView | Txn, stream: str) -> int:
    """How many of the stream's dead letters the cap dropped, oldest first, since the store began."""
    return int(view.meta(f"deadletters_dropped:{stream}") or 0)


def _keep_deadletters_capped(view: EntryView, stream: str, count: int) -> None:
    """Record `count` (the stream's dead letters now), first dropping the oldest beyond the cap."""
    limit = int((config(view) or {}).get("deadletters_max", DEFAULT_DEADLETTERS_MAX))
    if count > limit:
        oldest = view.txn.scan("deadletters", bytes((STREAMS[stream],)), limit=count - limit)
        for raw, _value in oldest:
            view.txn.delete("deadletters", raw)
        count -= len(oldest)
        view.set_meta(f"deadletters_dropped:{stream}", deadletters_dropped(view, stream) + len(oldest))
    view.set_meta(f"deadletters_count:{stream}", count)


def _move_to_deadletters(
    view: EntryView, stream: str, start: int, end: int, error: str, attempts: int
) -> None:
    txn = view.txn
    count = deadletter_count(view, stream)
    for seq in range(start + 1, end + 1):
        event = txn.get("outbox", key(stream, seq))
        if event is not None:
            txn.put("deadletters", key(stream, seq), {"event": event, "error": error, "attempts": attempts})
            txn.delete("outbox", key(stream, seq))
            count += 1
    view.set_meta(f"outbox_cursor:{stream}", end)
    _keep_deadletters_capped(view, stream, count)


def apply_webhook_config(view: EntryView, op: dict[str, Any]) -> Result:
    view.set_meta(
        "webhook",
        {
            "url": op["url"],
            "events": list(op["events"]),
            "outbox_max": op.get("outbox_max", DEFAULT_OUTBOX_MAX),
            "deadletters_max": op.get("deadletters_max", DEFAULT_DEADLETTERS_MAX),
        },
    )
    for stream in STREAMS:  # a lowered cap holds from this entry on, not from the next dead letter
        _keep_deadletters_capped(view, stream, deadletter_count(view, stream))
    return {"r": c.R_SUCCESS}


def _cas(view: EntryView, op: dict[str, Any]) -> Result | None:
    stream = op["stream"]
    if cursor(view, stream) != op["from"] or not op["from"] < op["to"] <= head(view, stream):
        return {"r": c.R_SUCCESS, "stale": True}  # another leader moved the cursor first
    return None


def apply_webhook_advance(view: EntryView, op: dict[str, Any]) -> Result:
    stale = _cas(view, op)
    if stale is not None:
        return stale
    for seq in range(op["from"] + 1, op["to"] + 1):
        view.txn.delete("outbox", key(op["stream"], seq))
    view.set_meta(f"outbox_cursor:{op['stream']}", op["to"])
    return {"r": c.R_SUCCESS}


def apply_webhook_deadletter(view: EntryView, op: dict[str, Any]) -> Result:
    stale = _cas(view, op)
    if stale is not None:
        return stale
    _move_to_deadletters(view, op["stream"], op["from"], op["to"], op["error"], op["attempts"])
    return {"r": c.R_SUCCESS}


def apply_deadletter_remove(view: EntryView, op: dict[str, Any]) -> Result:
    count = deadletter_count(view, op["stream"])
    for seq in op["seqs"]:
        if view.txn.delete("deadletters", key(op["stream"], seq)):
            count -= 1
    view.set_meta(f"deadletters_count:{op['stream']}", count)
    return {"r": c.R_SUCCESS}


def pending(txn: Txn, stream: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """Undelivered events of a stream, oldest first (read side, for the leader's delivery loop)."""
    start = cursor(txn, stream)
    return [
        (seq_of(k), v)
        for k, v in txn.scan("outbox", bytes((STREAMS[stream],)), limit=limit)
        if seq_of(k) > start
    ]


def deadletters(txn: Txn, limit: int = 10_000) -> list[tuple[str, int, dict[str, Any]]]:
    names = {code: name for name, code in STREAMS.items()}
    found = []
    for raw, value in txn.scan("deadletters", b"", limit=limit):
        code, seq = _KEY.unpack(raw)
        found.append((names.get(code, "?"), int(seq), value))
    return found
