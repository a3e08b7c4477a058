"""Conversations: per-user read positions, kept so that unread counts are cheap and right.

A conversation row (uid, channel) holds `read` (the last seq the user has read), `deleted` (the channel's
last seq when the user deleted the conversation) and `version` (the Raft index of the last change to the
row). Unread = channel.last_seq - read, so a message to a large group costs one write (the sender's own
read position), not one per member. A user's own send moves their read position: their messages are
never unread. A deleted conversation stays hidden until a message newer than `deleted` arrives.
"""

from __future__ import annotations

from typing import Any

from raft import commands as c
from raft.view import EntryView, Result
from storage import keys
from storage.keys import channel_key
from storage.store import Txn


def _row(view: EntryView, uid: str, chan: bytes) -> dict[str, Any]:
    return dict(view.conversation(uid, chan) or {"read": 0, "deleted": 0, "version": 0})


def on_send(view: EntryView, chan: bytes, sender: str, seq: int) -> None:
    # Changed in place: the messages of one sender in one channel share a row (and one write) per entry.
    row = view.conversation_to_change(sender, chan)
    row["read"] = max(int(row["read"]), seq)
    row["version"] = view.index


def on_subscribed(view: EntryView, chan: bytes, uid: str, last_seq: int) -> None:
    """A new member inherits no unread history (DESIGN.md)."""
    row = _row(view, uid, chan)
    row["read"] = max(int(row["read"]), last_seq)
    row["version"] = view.index
    view.put_conversation(uid, chan, row)


def on_unsubscribed(view: EntryView, chan: bytes, uid: str) -> None:
    view.flush()
    view.invalidate()
    view.txn.delete("conversations", keys.user_channel_key(uid, chan))


def apply_conversation(view: EntryView, op: dict[str, Any]) -> Result:
    """clearUnread, setUnread, delete: each sticks until the channel moves on."""
    chan = channel_key(op["cid"], op["ct"])
    channel = view.channel(chan) or {}
    last = int(channel.get("last_seq", 0))
    row = _row(view, op["uid"], chan)
    action = op["action"]
    if action == "clear":
        row["read"] = last
    elif action == "set_unread":
        row["read"] = max(0, last - op["unread"])
    else:  # delete
        row["deleted"] = last
        row["read"] = max(int(row["read"]), last)
    row["version"] = view.index
    view.put_conversation(op["uid"], chan, row)
    return {"r": c.R_SUCCESS}


def conversations_of(txn: Txn, uid: str) -> list[dict[str, Any]]:
    """Every channel of `uid` with its conversation state (read side, for /conversation/sync)."""
    found = []
    for channel_id, channel_type in txn.user_channels(uid):
        chan = channel_key(channel_id, channel_type)
        channel = txn.channel(chan) or {}
        row = txn.get("conversations", keys.user_channel_key(uid, chan)) or {
            "read": 0,
            "deleted": 0,
            "version": 0,
        }
        last = int(channel.get("last_seq", 0))
        found.append(
            {
                "channel_id": channel_id,
                "channel_type": channel_type,
                "chan": chan,
                "last_seq": last,
                "read": min(int(row["read"]), last),
                "deleted": int(row["deleted"]),
                "version": max(int(row.get("version", 0)), int(channel.get("version", 0))),
            }
        )
    return found
