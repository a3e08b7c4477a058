"""The LMDB store: named databases, CBOR values, short typed transactions.

Invariants:
- The Raft tick thread is the only writer (apply). Readers are short and never span an `await`.
- The store records the Raft index it has applied in the same transaction as the data, so a replayed entry
  at or below it is recognised and skipped.
- A snapshot install swaps the whole environment; readers hold `_swap_lock` for the length of one read
  transaction so the environment is never closed under them, and `generation` tells the node to resync.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import cbor2
import lmdb

from storage import keys

DB_NAMES = (
    "meta",
    "messages",
    "channels",
    "subscribers",
    "blacklist",
    "whitelist",
    "user_channels",
    "users",
    "dedup",
    "conversations",
    "presence",
    # uid -> the Raft index at which one of its connections last went away (msg.offline's to_uids).
    "presence_left",
    "outbox",
    "deadletters",
    # uid ‖ queue position (u64 BE) -> a command message (channel key, seq) not yet acknowledged.
    "cmd_queue",
    # uid -> that user's command queue: last position given, acknowledged up to, handed out by the last sync.
    "cmd_state",
    # channel key ‖ client_msg_no -> the persisted state of a streamed message's events (raft/msgevents.py).
    "msg_events",
)
MEMBER_DBS = ("subscribers", "blacklist", "whitelist")

DEFAULT_MAP_SIZE = 64 << 30  # sparse file: only used pages cost disk
SCHEMA_VERSION = 1
# How long a disk-space reading stays good. statvfs is a syscall that would otherwise run once per proposal;
# within this window a node writes at most a few MB, far inside the margin the fill limit leaves.
DISK_CHECK_INTERVAL_S = 1.0


class StoreFull(RuntimeError):
    """The store is above its fill limit: new proposals are refused before they reach the log."""


def _load(raw: bytes | None) -> Any:
    return None if raw is None else cbor2.loads(raw)


def _dump(value: Any) -> bytes:
    return cbor2.dumps(value)


class Txn:
    """One LMDB transaction with typed reads and (for write transactions) writes."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        # Any: transactions are opened with buffers=False, so values are bytes, which lmdb's stubs don't say.
        self._txn: Any = txn
        self._dbs = dbs

    # -- meta ------------------------------------------------------------------------------------------
    def applied_index(self) -> int:
        value = _load(self._txn.get(b"applied", db=self._dbs["meta"]))
        return int(value) if value is not None else 0

    def set_applied_index(self, index: int) -> None:
        self._txn.put(b"applied", _dump(index), db=self._dbs["meta"])

    def meta(self, name: str) -> Any:
        return _load(self._txn.get(name.encode(), db=self._dbs["meta"]))

    def set_meta(self, name: str, value: Any) -> None:
        self._txn.put(name.encode(), _dump(value), db=self._dbs["meta"])

    # -- channels --------------------------------------------------------------------------------------
    def channel(self, chan: bytes) -> dict[str, Any] | None:
        value = _load(self._txn.get(chan, db=self._dbs["channels"]))
        return value if isinstance(value, dict) else None

    def put_channel(self, chan: bytes, record: dict[str, Any]) -> None:
        self._txn.put(chan, _dump(record), db=self._dbs["channels"])

    def delete_channel(self, chan: bytes) -> None:
        self._txn.delete(chan, db=self._dbs["channels"])

    def channels(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        cursor = self._txn.cursor(db=self._dbs["channels"])
        for key, value in cursor:
            yield bytes(key), cbor2.loads(value)

    # -- members: subscribers, blacklist, whitelist ----------------------------------------------------
    def is_member(self, db: str, chan: bytes, uid: str) -> bool:
        return self._txn.get(keys.member_key(chan, uid), db=self._dbs[db]) is not None

    def add_member(self, db: str, chan: bytes, uid: str) -> bool:
        """Add one member; True when it was not there before."""
        added = bool(self._txn.put(keys.member_key(chan, uid), b"", overwrite=False, db=self._dbs[db]))
        if added and db == "subscribers":
            self._txn.put(keys.user_channel_key(uid, chan), b"", db=self._dbs["user_channels"])
        return added

    def remove_member(self, db: str, chan: bytes, uid: str) -> bool:
        removed = bool(self._txn.delete(keys.member_key(chan, uid), db=self._dbs[db]))
        if removed and db == "subscribers":
            self._txn.delete(keys.user_channel_key(uid, chan), db=self._dbs["user_channels"])
        return removed

    def members(self, db: str, chan: bytes, limit: int = 1 << 30) -> list[str]:
        cursor = self._txn.cursor(db=self._dbs[db])
        found: list[str] = []
        if not cursor.set_range(chan):
            return found
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(chan) or len(found) >= limit:
                break
            found.append(keys.uid_of_member_key(chan, key))
        return found

    def has_members(self, db: str, chan: bytes) -> bool:
        return bool(self.members(db, chan, limit=1))

    def clear_members(self, db: str, chan: bytes) -> None:
        for uid in self.members(db, chan):
            self.remove_member(db, chan, uid)

    def user_channels(self, uid: str) -> list[tuple[str, int]]:
        prefix = keys.part(uid)
        cursor = self._txn.cursor(db=self._dbs["user_channels"])
        found: list[tuple[str, int]] = []
        if not cursor.set_range(prefix):
            return found
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                break
            channel_id, channel_type, _ = keys.split_channel_key(key[len(prefix) :])
            found.append((channel_id, channel_type))
        return found

    # -- users -----------------------------------------------------------------------------------------
    def user(self, uid: str) -> dict[str, Any] | None:
        value = _load(self._txn.get(keys.part(uid), db=self._dbs["users"]))
        return value if isinstance(value, dict) else None

    def put_user(self, uid: str, record: dict[str, Any]) -> None:
        self._txn.put(keys.part(uid), _dump(record), db=self._dbs["users"])

    # -- messages --------------------------------------------------------------------------------------
    def dedup(self, chan: bytes, sender: str, client_msg_no: str) -> dict[str, Any] | None:
        value = _load(self._txn.get(keys.dedup_key(chan, sender, client_msg_no), db=self._dbs["dedup"]))
        return value if isinstance(value, dict) else None

    def put_dedup(self, chan: bytes, sender: str, client_msg_no: str, record: dict[str, Any]) -> None:
        self._txn.put(keys.dedup_key(chan, sender, client_msg_no), _dump(record), db=self._dbs["dedup"])

    def add_dedup(self, chan: bytes, sender: str, client_msg_no: str, record: dict[str, Any]) -> bool:
        """Write the row only if the key is new: True when written (one LMDB call for check and write)."""
        return self.add_dedup_at(keys.dedup_key(chan, sender, client_msg_no), record)

    def add_dedup_at(self, key: bytes, record: dict[str, Any]) -> bool:
        """`add_dedup` by its key (`keys.dedup_key`), for a caller that builds keys from shared parts."""
        return bool(self._txn.put(key, _dump(record), overwrite=False, db=self._dbs["dedup"]))

    def put_message(self, chan: bytes, seq: int, record: dict[str, Any]) -> None:
        self._txn.put(keys.message_key(chan, seq), _dump(record), db=self._dbs["messages"])

    def put_message_row(self, chan: bytes, seq: int, row: bytes | bytearray) -> None:
        """Store a message row already encoded (CBOR of the record `message` returns)."""
        self._txn.put(keys.message_key(chan, seq), row, db=self._dbs["messages"])

    def message(self, chan: bytes, seq: int) -> dict[str, Any] | None:
        value = _load(self._txn.get(keys.message_key(chan, seq), db=self._dbs["messages"]))
        return value if isinstance(value, dict) else None

    def messages(self, chan: bytes, start_seq: int, end_seq: int, limit: int) -> list[dict[str, Any]]:
        """Messages with start_seq <= seq <= end_seq (end_seq 0: no end), ascending, at most `limit`."""
        cursor = self._txn.cursor(db=self._dbs["messages"])
        found: list[dict[str, Any]] = []
        if limit <= 0 or not cursor.set_range(keys.message_key(chan, max(start_seq, 0))):
            return found
        for key, value in cursor.iternext():
            if not key.startswith(chan) or len(key) != len(chan) + 8:
                break
            if end_seq and keys.seq_of_message_key(key) > end_seq:
                break
            found.append(cbor2.loads(value))
            if len(found) >= limit:
                break
        return found

    def delete_messages(self, chan: bytes) -> None:
        cursor = self._txn.cursor(db=self._dbs["messages"])
        while cursor.set_range(chan) and cursor.key().startswith(chan) and len(cursor.key()) == len(chan) + 8:
            cursor.delete()

    # -- presence: who is online on which node ------------------------------------------------------
    def presence_of(self, uid: str) -> list[tuple[int, int, dict[str, Any]]]:
        """(node, conn, row) of every online connection of `uid`, cluster-wide."""
        found = []
        for key, value in self.scan("presence", keys.part(uid)):
            _uid, node, conn = keys.split_presence_key(key)
            found.append((node, conn, value))
        return found

    def online_among(self, uids: Iterable[str]) -> set[str]:
        """Those of `uids` with an online connection anywhere in the cluster: keys only, no row decoded."""
        cursor = self._txn.cursor(db=self._dbs["presence"])
        online = set()
        for uid in uids:
            prefix = keys.part(uid)
            if cursor.set_range(prefix) and cursor.key()[: len(prefix)] == prefix:
                online.add(uid)
        return online

    def presence_left(self, uid: str) -> int:
        """The Raft index at which a connection of `uid` last went away (0: never)."""
        return int(self.get("presence_left", keys.part(uid)) or 0)

    def all_presence(self) -> Iterator[tuple[str, int, int, dict[str, Any]]]:
        for key, value in self.raw_items("presence"):
            uid, node, conn = keys.split_presence_key(key)
            yield uid, node, conn, cbor2.loads(value)

    # -- generic rows for later features (conversations, presence, outbox) ----------------------------
    def get(self, db: str, key: bytes) -> Any:
        return _load(self._txn.get(key, db=self._dbs[db]))

    def put(self, db: str, key: bytes, value: Any) -> None:
        self._txn.put(key, _dump(value), db=self._dbs[db])

    def delete(self, db: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._dbs[db]))

    def delete_prefix(self, db: str, prefix: bytes) -> int:
        """Delete every row whose key starts with `prefix`; returns how many."""
        cursor = self._txn.cursor(db=self._dbs[db])
        count = 0
        while cursor.set_range(prefix) and bytes(cursor.key()).startswith(prefix):
            cursor.delete()
            count += 1
        return count

    def raw_items(self, db: str) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of a database as stored, in key order (digests, verification)."""
        for key, value in self._txn.cursor(db=self._dbs[db]):
            yield bytes(key), bytes(value)

    def scan(self, db: str, prefix: bytes, limit: int = 1 << 30) -> list[tuple[bytes, Any]]:
        cursor = self._txn.cursor(db=self._dbs[db])
        found: list[tuple[bytes, Any]] = []
        if not cursor.set_range(prefix):
            return found
        for key, value in cursor.iternext():
            if not key.startswith(prefix) or len(found) >= limit:
                break
            found.append((bytes(key), _load(value)))
        return found


class Store:
    """One LMDB environment holding a node's whole replicated state."""

    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE, fill_limit: float = 0.8) -> None:
        self.path = path
        self.map_size = map_size
        self.fill_limit = fill_limit
        self.generation = 0
        # Re-entrant so a reader that nests a read on the same thread does not deadlock itself.
        self._swap_lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._closed = False
        # (time.monotonic() of the reading, free bytes, total bytes) of the disk under the store.
        self._disk: tuple[float, int, int] | None = None
        self._open()

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        # sync=False: durability against kill -9 comes from the OS page cache, as for PySyncObj's journal
        # (neither survives a power loss of a majority; the README says so). `sync()` flushes periodically.
        self.env = lmdb.open(
            self.path,
            map_size=self.map_size,
            max_dbs=len(DB_NAMES) + 2,
            max_readers=512,
            sync=False,
            metasync=False,
            readahead=False,
        )
        self._dbs = {name: self.env.open_db(name.encode()) for name in DB_NAMES}
        with self.env.begin(write=True) as txn:
            meta = self._dbs["meta"]
            if txn.get(b"schema", db=meta) is None:
                txn.put(b"schema", _dump(SCHEMA_VERSION), db=meta)

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A short read-only transaction. Never hold one across an `await`."""
        with self._swap_lock, self.env.begin(write=False, buffers=False) as txn:
            yield Txn(txn, self._dbs)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """The single write transaction of one Raft apply (tick thread only)."""
        with self.env.begin(write=True) as txn:
            yield Txn(txn, self._dbs)

    def applied_index(self) -> int:
        with self.read() as txn:
            return txn.applied_index()

    def grow(self) -> None:
        """Double the map after a MapFullError (no transaction of this process may be open)."""
        with self._swap_lock:
            self.map_size *= 2
            self.env.set_mapsize(self.map_size)

    def check_room(self) -> None:
        """Refuse new work before the map or the disk is nearly full: apply must never hit MapFull."""
        with self._swap_lock:
            info = self.env.info()
            stat = self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        if used > self.fill_limit * self.map_size:
            raise StoreFull(f"store map {used} of {self.map_size} bytes used")
        # The map check above is exact and cheap (two reads of LMDB's in-memory meta, no syscall); the
        # disk reading is reused for DISK_CHECK_INTERVAL_S, refusals included.
        now = time.monotonic()
        disk = self._disk
        if disk is None or now - disk[0] >= DISK_CHECK_INTERVAL_S:
            usage = shutil.disk_usage(self.path)
            disk = self._disk = (now, usage.free, usage.total)
        _at, free, total = disk
        if free < (1 - self.fill_limit) * total and free < 1 << 30:
            raise StoreFull(f"disk nearly full: {free} bytes free")

    def sync(self) -> None:
        # Its own lock, not the swap lock: an fsync can take a while, and readers must not wait on it.
        with self._sync_lock:
            if not self._closed:
                self.env.sync(True)

    def copy_to_fd(self, fd: int) -> None:
        """Write a consistent copy of the whole environment (one read snapshot) to `fd`."""
        # No lock: this runs on the tick thread, the same thread that installs snapshots, so the
        # environment cannot be swapped under it; holding the swap lock would stall every reader.
        self.env.copyfd(fd, compact=True)

    def install(self, data_file: str) -> None:
        """Replace the store with the LMDB data file `data_file` (a snapshot): close, swap, reopen."""
        with self._swap_lock, self._sync_lock:
            self.env.close()
            os.replace(data_file, os.path.join(self.path, "data.mdb"))
            lock_file = os.path.join(self.path, "lock.mdb")
            if os.path.exists(lock_file):
                os.remove(lock_file)
            self._open()
            self.generation += 1

    def close(self) -> None:
        with self._swap_lock, self._sync_lock:
            if self._closed:
                return
            self._closed = True
            self.env.sync(True)
            self.env.close()

    def stats(self) -> dict[str, int]:
        with self._swap_lock:
            info = self.env.info()
            stat = self.env.stat()
        return {
            "map_size": self.map_size,
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "generation": self.generation,
        }
