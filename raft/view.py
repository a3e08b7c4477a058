"""The view apply works through: one LMDB write transaction plus per-entry caches of hot rows."""

from __future__ import annotations

from typing import Any

from storage import keys
from storage.store import Txn

Result = dict[str, Any]


class EntryView:
    """The transaction of one entry, with the rows a batch touches again and again read once.

    LMDB releases the GIL on every call, and each re-acquire can wait behind the busy trio thread (the
    GIL convoy of RAFT_NOTES.md), so apply keeps its LMDB calls per message few: channel records are read
    and written once per entry; system uids, whitelist presence and each (list, channel, uid) membership
    are read once per entry.

    Invariant: every member write inside an entry either goes through `add_member` (which keeps the cache
    right) or is followed by `invalidate()` before the next read (apply_ops invalidates after every op
    that is not a send, a presence change or a webhook advance).
    """

    def __init__(self, txn: Txn, index: int = 0) -> None:
        self.txn = txn
        # The Raft index of the entry being applied: deterministic and increasing, so it serves as the
        # version of whatever the entry changes (conversation sync asks "what changed since version v").
        self.index = index
        self._conversations: dict[bytes, dict[str, Any] | None] = {}
        self._dirty_conversations: set[bytes] = set()
        self._dirty_meta: set[str] = set()
        self._channels: dict[bytes, dict[str, Any] | None] = {}
        self._dirty: set[bytes] = set()
        self._meta: dict[str, Any] = {}
        self._has_members: dict[tuple[str, bytes], bool] = {}
        self._is_member: dict[tuple[str, bytes, str], bool] = {}
        # Pure functions of their arguments, kept for the whole entry: the keys of channels and of
        # conversation rows (many messages of an entry share them).
        self._channel_keys: dict[tuple[str, int], bytes] = {}
        self._conversation_keys: dict[tuple[str, bytes], bytes] = {}
        self._dedup_prefixes: dict[tuple[bytes, str], bytes] = {}
        # The send permission of (channel id, type, sender, receiver, api), read from the rows above: only
        # an op that is not a send changes what it depends on, and each such op ends in `invalidate()`.
        self.send_permissions: dict[tuple[str, int, str, str, bool], int] = {}

    def channel_key(self, channel_id: str, channel_type: int) -> bytes:
        key = (channel_id, channel_type)
        found = self._channel_keys.get(key)
        if found is None:
            found = self._channel_keys[key] = keys.channel_key(channel_id, channel_type)
        return found

    def dedup_key(self, chan: bytes, sender: str, client_msg_no: str) -> bytes:
        """`keys.dedup_key`, its (channel, sender) part built once per entry."""
        prefix = self._dedup_prefixes.get((chan, sender))
        if prefix is None:
            prefix = self._dedup_prefixes[(chan, sender)] = chan + keys.part(sender)
        return prefix + keys.part(client_msg_no)

    def channel(self, chan: bytes) -> dict[str, Any] | None:
        if chan not in self._channels:
            self._channels[chan] = self.txn.channel(chan)
        return self._channels[chan]

    def put_channel(self, chan: bytes, record: dict[str, Any]) -> None:
        self._channels[chan] = record
        self._dirty.add(chan)

    def meta(self, name: str) -> Any:
        if name not in self._meta:
            self._meta[name] = self.txn.meta(name)
        return self._meta[name]

    def set_meta(self, name: str, value: Any) -> None:
        """Cached and written once at flush (outbox heads change with every message of an entry)."""
        self._meta[name] = value
        self._dirty_meta.add(name)

    def is_member(self, db: str, chan: bytes, uid: str) -> bool:
        key = (db, chan, uid)
        found = self._is_member.get(key)
        if found is None:
            found = self._is_member[key] = self.txn.is_member(db, chan, uid)
        return found

    def add_member(self, db: str, chan: bytes, uid: str) -> bool:
        """Write through to the transaction and keep the membership caches right."""
        added = self.txn.add_member(db, chan, uid)
        self._is_member[(db, chan, uid)] = True
        self._has_members[(db, chan)] = True
        return added

    def has_members(self, db: str, chan: bytes) -> bool:
        key = (db, chan)
        if key not in self._has_members:
            self._has_members[key] = self.txn.has_members(db, chan)
        return self._has_members[key]

    def conversation(self, uid: str, chan: bytes) -> dict[str, Any] | None:
        key = keys.user_channel_key(uid, chan)
        if key not in self._conversations:
            self._conversations[key] = self.txn.get("conversations", key)
        return self._conversations[key]

    def put_conversation(self, uid: str, chan: bytes, row: dict[str, Any]) -> None:
        key = keys.user_channel_key(uid, chan)
        self._conversations[key] = row
        self._dirty_conversations.add(key)

    def conversation_to_change(self, uid: str, chan: bytes) -> dict[str, Any]:
        """The conversation row of (uid, channel) to change in place: a copy of the stored one (or a new
        row) the first time in the entry, then that same copy, which `flush` writes once."""
        key = self._conversation_keys.get((uid, chan))
        if key is None:
            key = self._conversation_keys[(uid, chan)] = keys.user_channel_key(uid, chan)
        if key in self._dirty_conversations:
            row = self._conversations[key]
            if row is not None:
                return row
        if key not in self._conversations:
            self._conversations[key] = self.txn.get("conversations", key)
        row = dict(self._conversations[key] or {"read": 0, "deleted": 0, "version": 0})
        self._conversations[key] = row
        self._dirty_conversations.add(key)
        return row

    def flush(self) -> None:
        for chan in sorted(self._dirty):
            record = self._channels[chan]
            if record is not None:
                self.txn.put_channel(chan, record)
        self._dirty.clear()
        for key in sorted(self._dirty_conversations):
            row = self._conversations[key]
            if row is not None:
                self.txn.put("conversations", key, row)
        self._dirty_conversations.clear()
        for name in sorted(self._dirty_meta):
            self.txn.set_meta(name, self._meta[name])
        self._dirty_meta.clear()

    def invalidate(self) -> None:
        """Forget cached rows (after an op that may change them in ways the cache does not track)."""
        self.flush()
        self._conversations.clear()
        self._channels.clear()
        self._meta.clear()
        self._has_members.clear()
        self._is_member.clear()
        self.send_permissions.clear()
