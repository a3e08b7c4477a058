"""Persisted message events: the state of a streamed message's events, one LMDB row per message.

WuKongIM (v2.2.5 `pkg/wkdb/message_event.go`) keeps, per (channel, client_msg_no, event key), the state the
events folded into so far (status, last msg_event_seq, the snapshot) and not the events one by one; its
`/message/eventsync` answers one projected event per key. The same here, in one row per message (channel
key ‖ client_msg_no) holding every key's state, the message's msg_event_seq counter and the event ids
already applied (so a repeated POST is answered with the first answer: idempotent by event_id, for every
persisted event, where WuKongIM compares only the key's last event id).

`stream.delta` events never come here: they live in the memory of the node that took them
(node/streams.py), and a terminal event carries the text they built (`snaps`), merged there.

Deterministic like the rest of apply: everything an op needs is in the op (the merged snapshots, end
reason and error were taken out of the JSON payload by the proposing node), apply parses no JSON.

Invariant: a key whose status is terminal (closed, error, cancelled) never changes again, and once the
message-level `__finish__` key is closed every key is terminal.
"""

from __future__ import annotations

from typing import Any

from raft import commands as c
from raft.view import EntryView, Result
from storage import keys


def _error(text: str) -> Result:
    # Refused, not broken: the op was well formed, the stream does not take it (the API answers 400).
    return {"r": c.R_NOT_ALLOW_SEND, "err": text}


def empty_state() -> dict[str, Any]:
    return {"seq": 0, "keys": {}, "ids": {}}


def is_terminal(status: str) -> bool:
    return status in (c.STATUS_CLOSED, c.STATUS_ERROR, c.STATUS_CANCELLED)


def finished(state: dict[str, Any]) -> bool:
    """The whole message has ended (stream.finish applied): no key takes events any more."""
    return is_terminal(str(state["keys"].get(c.EVENT_KEY_FINISH, {}).get("st", "")))


def anchor_of(view: EntryView, chan: bytes, sender: str, client_msg_no: str) -> dict[str, Any] | None:
    """The stored message a stream's events belong to, if it was sent with is_stream (setting bit 0x02)."""
    txn = view.txn
    dedup = txn.dedup(chan, sender, client_msg_no)
    if not isinstance(dedup, dict):
        return None
    message = txn.message(chan, int(dedup.get("seq", 0)))
    if message is None or not int(message.get("setting", 0)) & c.SETTING_STREAM:
        return None
    return message


def apply_msg_event(view: EntryView, op: dict[str, Any]) -> Result:
    """Fold one persisted event into its message's state; {r, seq, key, st, mid} and `dup` (this event_id
    was applied before: its first answer) or `final` (the key had already ended: its final state)."""
    txn = view.txn
    chan = view.channel_key(op["cid"], op["ct"])
    message = anchor_of(view, chan, op["from"], op["cmn"])
    if message is None:
        return _error(f"no stream message {op['cmn']!r} from {op['from']!r} in this channel")
    row_key = keys.msg_event_key(chan, op["from"], op["cmn"])
    stored = txn.get("msg_events", row_key)
    state = stored if isinstance(stored, dict) else empty_state()
    key, event_type, mid = op["key"], op["et"], int(message["mid"])
    known = state["ids"].get(op["eid"])
    if known is not None:
        done_key, seq = known
        status = state["keys"].get(done_key, {}).get("st", c.STATUS_OPEN)
        return {"r": c.R_SUCCESS, "seq": seq, "key": done_key, "st": status, "mid": mid, "dup": True}
    current = state["keys"].get(key)
    if finished(state) or (current is not None and is_terminal(current["st"])):
        final = current if current is not None else state["keys"][c.EVENT_KEY_FINISH]
        return {
            "r": c.R_SUCCESS,
            "seq": final["seq"],
            "key": key,
            "st": final["st"],
            "mid": mid,
            "final": True,
        }
    # The cap holds back what grows a stream without end; an event that ends a key is always taken (each key
    # ends once, so at most MAX_EVENT_KEYS more), or a long stream could never be closed, even by its idle
    # timeout, and its text since the last snapshot would be lost.
    if len(state["ids"]) >= c.MAX_PERSISTED_EVENTS and event_type not in c.TERMINAL_STATUS_OF:
        return _error(f"the stream already has {c.MAX_PERSISTED_EVENTS} persisted events")
    snaps: dict[str, bytes] = op.get("snaps", {})
    new_keys = ({key} | set(snaps)) - set(state["keys"])
    if len(state["keys"]) + len(new_keys) > c.MAX_EVENT_KEYS:
        return _error(f"the stream would have more than {c.MAX_EVENT_KEYS} event keys")
    seq = state["seq"] + 1
    state["seq"] = seq
    if current is None:
        current = state["keys"][key] = {"st": c.STATUS_OPEN, "seq": 0}
    current.update(eid=op["eid"], et=event_type, vis=op["vis"], at=op["at"], seq=seq)
    if event_type == c.EVENT_STREAM_SNAPSHOT:
        current["snap"] = op["payload"]
    elif event_type == c.EVENT_STREAM_FINISH:
        # The message-level end: every key still open ends with it, with the text its deltas built.
        current["st"] = c.STATUS_CLOSED
        for other in sorted(set(state["keys"]) | set(snaps)):
            lane = state["keys"].setdefault(other, {"st": c.STATUS_OPEN, "seq": 0})
            if other == key or is_terminal(lane["st"]):
                continue
            if other in snaps:
                lane["snap"] = snaps[other]
            lane.update(st=c.STATUS_CLOSED, seq=seq)
    elif event_type in c.TERMINAL_STATUS_OF:
        if key in snaps:
            current["snap"] = snaps[key]
        current["st"] = c.TERMINAL_STATUS_OF[event_type]
        if op["er"]:
            current["er"] = op["er"]
        if op["err"]:
            current["err"] = op["err"]
    state["ids"][op["eid"]] = [key, seq]
    txn.put("msg_events", row_key, state)
    return {"r": c.R_SUCCESS, "seq": seq, "key": key, "st": current["st"], "mid": mid}
