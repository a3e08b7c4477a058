"""The PySyncObj state machine: one replicated method that applies a CBOR entry into LMDB.

Everything here runs on PySyncObj's tick thread. Facts this code relies on (../shared/RAFT_NOTES.md):
- an apply that raises is retried forever and stalls the cluster, so `execute` never raises;
- every journal entry is applied again after a restart, so the store records the index it applied and
  entries at or below it are skipped (replay is idempotent and pushes nothing);
- the default snapshot ignores LMDB, so snapshots are written by `serialize_snapshot`, which ships a
  consistent LMDB copy, and loaded by `load_snapshot`, which replaces the store only when it is behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cbor2
import lmdb
from pysyncobj import SyncObjConf, replicated
from pysyncobj.node import TCPNode

from raft.apply import Result, apply_ops
from raft.commands import R_SYSTEM_ERROR, BadCommand, decode_entry
from raft.safe_syncobj import SafeSyncObj
from raft.transport import frame_cap_bytes, transport_class
from storage.store import Store

log = logging.getLogger("imnode.raft")

SNAPSHOT_MAGIC = b"IMNODE-SNAP1"
_HEADER_LEN = struct.Struct(">I")
EXIT_STORE_FAILURE = 70


class Committed(NamedTuple):
    """One applied entry, handed to the node so it can acknowledge and push."""

    raft_index: int
    ops: list[Any]
    results: list[Result]
    applied_at: float = 0.0  # time.perf_counter() when the apply finished (the node's latency trace)


@dataclass(frozen=True)
class RaftSettings:
    self_addr: str
    partners: tuple[str, ...]
    data_dir: str
    # The cluster secret every member proves in raft/transport.py's handshake. None: a random one, so no
    # other node can ever connect (a node alone).
    password: str | None = None
    bind_addr: str | None = None  # None: bind self_addr (it is also this node's identity)
    min_timeout_s: float = 0.4
    max_timeout_s: float = 1.4
    leader_fallback_timeout_s: float = 3.0
    # Entries above this size take PySyncObj's chunked path, which was seen to fail; the proposer keeps
    # entries below it.
    append_entries_batch_bytes: int = 4 << 20
    compaction_min_entries: int = 1_000_000
    compaction_min_time_s: float = 3600.0
    commands_queue_size: int = 100_000
    extra: dict[str, Any] = field(default_factory=dict)


def halt(reason: str) -> None:
    """Stop the process at once: running on with a store that missed an entry would diverge silently."""
    log.critical("halting: %s", reason)
    logging.shutdown()
    os._exit(EXIT_STORE_FAILURE)


class Machine(SafeSyncObj):
    """Replicates `execute(entry)` calls; `on_commit` receives every entry this node applies."""

    def __init__(
        self,
        settings: RaftSettings,
        store: Store,
        on_commit: Callable[[Committed], None],
        on_install: Callable[[], None] = lambda: None,
        on_member_message: Callable[[str, Any], None] | None = None,
    ) -> None:
        # Everything apply needs is set before super().__init__: the tick thread starts there and replays
        # the journal at once.
        self._store = store
        self._on_commit = on_commit
        self._on_install = on_install
        self.apply_started = 0.0
        self.applying_index = 0
        os.makedirs(settings.data_dir, exist_ok=True)
        conf = SyncObjConf(
            # No PySyncObj password: its Fernet transport is replaced by raft/transport.py.
            bindAddress=settings.bind_addr,
            dynamicMembershipChange=True,
            commandsWaitLeader=False,
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=settings.append_entries_batch_bytes,
            raftMinTimeout=settings.min_timeout_s,
            raftMaxTimeout=settings.max_timeout_s,
            connectionTimeout=max(3.5, settings.max_timeout_s),
            leaderFallbackTimeout=settings.leader_fallback_timeout_s,
            journalFile=os.path.join(settings.data_dir, "raft.journal"),
            fullDumpFile=os.path.join(settings.data_dir, "raft.dump"),
            logCompactionMinEntries=settings.compaction_min_entries,
            logCompactionMinTime=settings.compaction_min_time_s,
            logCompactionSplit=True,
            commandsQueueSize=settings.commands_queue_size,
            # No timer in the commit path: a partner's answer wakes the tick loop, and a node alone wakes
            # it itself after appending (SafeSyncObj._checkCommandsToApply).
            autoTickPeriod=0.05,
            serializer=self._serialize_snapshot,
            deserializer=self._load_snapshot,
            **settings.extra,
        )
        transport = transport_class(
            settings.password or secrets.token_urlsafe(32),
            frame_cap=frame_cap_bytes(conf.appendEntriesBatchSizeBytes, conf.logCompactionBatchSize),
            handshake_timeout_s=conf.connectionTimeout,
        )
        super().__init__(
            settings.self_addr,
            list(settings.partners),
            conf,
            transportClass=transport,
            on_member_message=on_member_message,
        )

    @replicated
    def execute(self, entry: bytes) -> list[Result] | None:
        """Apply one entry. Returns None for an entry the store already holds (journal replay)."""
        index = self.raftLastApplied + 1
        # Read by the bridge's completion callback, which PySyncObj runs on this thread right after.
        self.apply_started = time.perf_counter()
        self.applying_index = index
        try:
            ops = decode_entry(entry)
        except BadCommand as exc:
            ops, decode_error = [], str(exc)
        else:
            decode_error = ""
        while True:
            try:
                with self._store.write() as txn:
                    if index <= txn.applied_index():
                        return None
                    results = apply_ops(txn, ops, index) if not decode_error else []
                    txn.set_applied_index(index)
                break
            except lmdb.MapFullError:
                self._store.grow()
            except Exception as exc:
                # A bug in apply, hit identically on every node (apply is deterministic): keep the entry's
                # effects out, but record its index so the log moves on, and answer every op with an error.
                log.exception("apply failed at index %d", index)
                results = self._record_failure(index, ops, f"apply failed: {exc!r}")
                break
        committed = Committed(index, ops, results, time.perf_counter())
        try:
            self._on_commit(committed)
        except Exception:  # the node's hand-off must not turn into an apply that raises
            log.exception("commit hand-off failed at index %d", index)
        return results

    def _record_failure(self, index: int, ops: list[Any], text: str) -> list[Result]:
        try:
            with self._store.write() as txn:
                txn.set_applied_index(index)
        except Exception as exc:
            halt(f"cannot record index {index} in the store: {exc!r}")
        return [{"r": R_SYSTEM_ERROR, "err": text} for _ in ops]

    # -- snapshots ---------------------------------------------------------------------------------------
    def _serialize_snapshot(self, filename: str, raft_data: tuple[Any, Any, Any]) -> None:
        """Write PySyncObj's header (last entries, cluster) plus a consistent copy of the LMDB store."""
        last_entry, prev_entry, cluster = raft_data
        header = cbor2.dumps(
            {
                "last": list(last_entry),
                "prev": list(prev_entry),
                "cluster": sorted(node.address for node in cluster),
                "applied": self._store.applied_index(),
            }
        )
        with open(filename, "wb") as out:
            out.write(SNAPSHOT_MAGIC + _HEADER_LEN.pack(len(header)) + header)
            out.flush()
            self._store.copy_to_fd(out.fileno())
            os.fsync(out.fileno())

    def _load_snapshot(self, filename: str) -> tuple[Any, Any, Any]:
        """Install a snapshot; halts on any failure (PySyncObj would swallow it and run on half-installed)."""
        try:
            with open(filename, "rb") as src:
                if src.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
                    raise ValueError("not an imnode snapshot")
                (length,) = _HEADER_LEN.unpack(src.read(_HEADER_LEN.size))
                header = cbor2.loads(src.read(length))
                if self._store.applied_index() < header["applied"]:
                    fd, tmp_path = tempfile.mkstemp(dir=self._store.path, prefix="snapshot-", suffix=".mdb")
                    with os.fdopen(fd, "wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    self._store.install(tmp_path)
                    log.info("installed snapshot at applied index %d", header["applied"])
                    self._on_install()
            last, prev = tuple(header["last"]), tuple(header["prev"])
            cluster = {TCPNode(address) for address in header["cluster"]}
            return last, prev, cluster
        except Exception as exc:
            halt(f"cannot load snapshot {filename}: {exc!r}")
            raise  # unreachable: halt exits
