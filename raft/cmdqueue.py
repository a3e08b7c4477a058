"""Command queues: each user's command messages (sync_once) not yet acknowledged, WuKongIM's CMD sync.

A command message is stored once, in its channel's command channel (stored id + CMD_SUFFIX), and every
recipient gets a row in their own queue: `uid ‖ position -> {ck, seq}`. `/message/sync` reads a user's
queue after the acknowledged position and records (op `cmd_sync`) how far it handed out; `/message/syncack`
(op `cmd_ack`) moves the acknowledged position there and drops those rows. WuKongIM keeps that record in
the memory of the one node that owns the user; here it is replicated, so a business server may call the two
routes on different nodes. A queue holds at most CMD_QUEUE_MAX rows: a user who never syncs loses the
oldest commands, not the store's room.

Invariant: the rows of a user are exactly the positions (max(acked, next - CMD_QUEUE_MAX), next].
"""

from __future__ import annotations

from typing import Any

from raft import commands as c
from raft.view import EntryView, Result
from storage import keys
from storage.store import Txn


def _state(txn: Txn, uid: str) -> dict[str, int]:
    row = txn.get("cmd_state", keys.part(uid))
    if not isinstance(row, dict):
        return {"next": 0, "acked": 0, "sync": 0}
    return {
        "next": int(row.get("next", 0)),
        "acked": int(row.get("acked", 0)),
        "sync": int(row.get("sync", 0)),
    }


def _row_key(uid: str, position: int) -> bytes:
    return keys.part(uid) + keys.u64(position)


def push(view: EntryView, uids: list[str], chan: bytes, seq: int) -> None:
    """Queue the command (chan, seq) for every uid of `uids` (each once, in the order given)."""
    txn = view.txn
    seen: set[str] = set()
    for uid in uids:
        if uid in seen:
            continue
        seen.add(uid)
        state = _state(txn, uid)
        state["next"] += 1
        txn.put("cmd_queue", _row_key(uid, state["next"]), {"ck": chan, "seq": seq})
        oldest = state["next"] - c.CMD_QUEUE_MAX
        if oldest > state["acked"]:
            txn.delete("cmd_queue", _row_key(uid, oldest))  # past the cap: the oldest command goes
        txn.put("cmd_state", keys.part(uid), state)


def apply_cmd_sync(view: EntryView, op: dict[str, Any]) -> Result:
    txn = view.txn
    state = _state(txn, op["uid"])
    # Never past what was queued, never behind what was acknowledged: a late or crafted op is clamped.
    state["sync"] = max(state["acked"], min(op["upto"], state["next"]))
    txn.put("cmd_state", keys.part(op["uid"]), state)
    return {"r": c.R_SUCCESS}


def apply_cmd_ack(view: EntryView, op: dict[str, Any]) -> Result:
    txn = view.txn
    uid = op["uid"]
    state = _state(txn, uid)
    upto = max(state["acked"], min(state["sync"], state["next"]))
    for position in range(max(state["acked"] + 1, state["next"] - c.CMD_QUEUE_MAX + 1), upto + 1):
        txn.delete("cmd_queue", _row_key(uid, position))
    acked = upto - state["acked"]
    state["acked"] = upto
    txn.put("cmd_state", keys.part(uid), state)
    return {"r": c.R_SUCCESS, "acked": acked}


def pending(txn: Txn, uid: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """(position, stored message) of the oldest `limit` commands of `uid` not yet acknowledged (read side).

    A command whose message is gone (its channel was deleted) is skipped but still counts as handed out."""
    found: list[tuple[int, dict[str, Any]]] = []
    prefix = keys.part(uid)
    for raw_key, row in txn.scan("cmd_queue", prefix, limit):
        position = keys.seq_of_message_key(raw_key)
        message = txn.message(row["ck"], int(row["seq"])) if isinstance(row, dict) else None
        found.append((position, message or {}))
    return found
