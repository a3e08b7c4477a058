"""PySyncObj with three Raft safety defects closed, all found by the chaos harness's partitions.

1. **A follower truncates entries that match.** PySyncObj deletes everything after `prevLogIdx` whenever an
   AppendEntries arrives, not only from the first entry that conflicts (Raft §5.3). A delayed or repeated
   AppendEntries (the leader pipelines them and rolls `nextIndex` back on a stale "reset") therefore makes a
   follower's log *shorter* than what it already acknowledged, while the leader keeps counting it in its
   matchIndex. Lose the leader in that window and a committed entry is gone. PySyncObj's own log showed it
   ("truncating already-applied log entries", hundreds of times per node in a 10-minute partition run).
   Here an AppendEntries is first cut down to what the follower does not already hold: entries that match
   are skipped, truncation starts at the first real conflict, and one that brings nothing new is answered
   without touching the log, with the commit index capped at the last entry it verified.
2. **A snapshot message commits the follower's own log.** While a leader sends a snapshot (its first
   message carries no data yet), the follower takes the message's commit index as it would from a
   verified AppendEntries and commits its *own* tail up to it, entries the leader never had. An old leader
   cut off by a partition applied and acknowledged its uncommitted entries that way the moment the
   partition healed, then lost them to the snapshot (3, then 7 acknowledged messages lost in 10-minute
   runs with partitions).
   Here a message without `prevLogIdx` never moves the commit index; the installed snapshot sets it.
3. **Replies carry no term.** `next_node_idx` (the AppendEntries reply) has no term, so a reply delayed
   from an earlier term can raise the matchIndex of a leader in a later term. Replies now carry the term
   they were sent in, and a leader ignores those of another term (Raft's rule for stale responses).

And one cost defect: **a success reply rewinds `nextIndex`.** The leader pipelines AppendEntries (it moves
`nextIndex` past what it sent without waiting), but every success reply set `nextIndex` back to the
reply's index, so entries already in flight were sent again: 2.4-3.3 copies per commit to two followers
instead of 2 (RAFT_NOTES.md). Here a success reply only moves `nextIndex` forward. A reply that asks the
leader to go back (`reset`: a follower that lacks `prevLogIdx` because it truncated, restarted or lost its
log) still moves it back, which is how such a follower is caught up.

Commands are pickled with protocol 5 instead of PySyncObj's 2, which ran every bytes value through a
latin-1 conversion (118 µs for a 100-op command, 11 µs with protocol 5).

Only name-mangled hooks of PySyncObj are overridden (`_SyncObj__...`); the rest of its code runs as is, with
two module-level changes that keep every value and only save Python calls on the tick thread: its clock
read through a C-level partial instead of a lambda, and its nodes hashed without a property call.
"""

from __future__ import annotations

import _socket
import collections
import functools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pysyncobj.monotonic as pysyncobj_monotonic
import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.syncobj as pysyncobj_syncobj
import pysyncobj.tcp_connection as pysyncobj_tcp_connection
import pysyncobj.transport as pysyncobj_transport
from pysyncobj import SyncObj
from pysyncobj.node import Node

from raft.transport import MEMBER_MESSAGE

# PySyncObj's tcp_connection imports its Windows shim, which replaces `socket.inet_ntop` process-wide with a
# function that raises TypeError on every other platform. Every use of PySyncObj in imnode comes through
# this module, which puts the C function back.
socket.inet_ntop = _socket.inet_ntop

# PySyncObj reads its clock through a Python lambda, some fifty times per entry on the tick thread. The same
# clock (CLOCK_MONOTONIC_RAW) through a C-level partial: every reading stays on one clock, minus a call.
_MONOTONIC_RAW = functools.partial(time.clock_gettime, time.CLOCK_MONOTONIC_RAW)
for _module in (pysyncobj_monotonic, pysyncobj_syncobj, pysyncobj_tcp_connection, pysyncobj_transport):
    if getattr(_module, "monotonicTime", None) is pysyncobj_monotonic.monotonic:
        _module.monotonicTime = _MONOTONIC_RAW
pysyncobj_monotonic.monotonic = _MONOTONIC_RAW


def _node_hash(node: Node) -> int:
    return hash(node._id)  # what Node.__hash__ returns, without a second call through the `id` property


# Nodes key PySyncObj's per-follower dicts (next/match index, last response...), looked up ~100 times per
# entry: the same hash, half the Python calls.
Node.__hash__ = _node_hash

# PySyncObj pickles commands (and its journal's meta) with this module-level protocol; loads reads any.
PICKLE_PROTOCOL = 5
setattr(pysyncobj_pickle, "__protocol", PICKLE_PROTOCOL)

Message = dict[str, Any]


class SafeSyncObj(SyncObj):
    def __init__(
        self, *args: Any, on_member_message: Callable[[str, Any], None] | None = None, **kwargs: Any
    ) -> None:
        # Messages of the node's own between members (not Raft's), over the same authenticated
        # connections: sent from any thread through `send_to_member`, delivered on the tick thread to
        # `on_member_message(raft address, body)`. Set before SyncObj's __init__ starts the tick thread.
        self.on_member_message = on_member_message or (lambda address, body: None)
        self._member_outbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._member_outbox_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def send_to_member(self, address: str, body: Any) -> None:
        """Queue `body` for the member at Raft address `address` (thread-safe, never blocks).

        Sent by the tick thread on its next pass; dropped if that member is not connected then (the caller
        times out and retries, as it would after a lost connection).
        """
        with self._member_outbox_lock:
            self._member_outbox.append((address, body))
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            try:
                notifier.notify()
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the tick thread will run

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self._member_outbox:
            with self._member_outbox_lock:
                queued = list(self._member_outbox)
                self._member_outbox.clear()
            by_address = {node.address: node for node in self._SyncObj__otherNodes}
            transport = self._SyncObj__transport
            for address, body in queued:
                node = by_address.get(address)
                if node is not None:
                    transport.send(node, {"type": MEMBER_MESSAGE, "body": body})
        super()._onTick(timeToWait)

    # PySyncObj's own (name-mangled) method names, overridden.
    def _SyncObj__sendNextNodeIdx(
        self, node: Any, reset: bool = False, nextNodeIdx: int | None = None, success: bool = False
    ) -> None:
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        self._send_reply(node, nextNodeIdx, reset=reset, success=success)

    def _send_reply(self, node: Any, next_index: int, *, reset: bool, success: bool) -> None:
        self._SyncObj__transport.send(
            node,
            {
                "type": "next_node_idx",
                "next_node_idx": next_index,
                "reset": reset,
                "success": success,
                "term": self.raftCurrentTerm,
            },
        )

    def _checkCommandsToApply(self) -> None:
        before = self._SyncObj__getCurrentLogIndex()
        super()._checkCommandsToApply()
        # A node alone commits what it appended on its next tick, and with no partner to answer nothing
        # wakes the tick loop before its period ends: wake it now, so commit and apply follow at once
        # instead of after a timer (a single node's SENDACK waited up to a whole tick period for this).
        if not self._SyncObj__otherNodes and self._SyncObj__getCurrentLogIndex() != before:
            notifier = getattr(self, "_SyncObj__pipeNotifier", None)
            if notifier is not None:
                notifier.notify()

    def _SyncObj__onMessageReceived(self, node: Any, message: Message) -> None:
        kind = message.get("type")
        if kind == MEMBER_MESSAGE:
            self.on_member_message(node.address, message.get("body"))
            return
        if kind == "next_node_idx" and message.get("term", self.raftCurrentTerm) != self.raftCurrentTerm:
            return  # a reply from another term says nothing about this term's log
        if kind == "append_entries":
            trimmed = self._trim_append_entries(node, message)
            if trimmed is None:
                return
            message = trimmed
        if kind == "next_node_idx" and message.get("success") and not message.get("reset"):
            next_index = self._SyncObj__raftNextIndex
            sent_up_to = next_index.get(node)
            SyncObj._SyncObj__onMessageReceived(self, node, message)
            # No rewind: entries past the reply's index may already be on their way.
            if sent_up_to is not None and node in next_index and next_index[node] < sent_up_to:
                next_index[node] = sent_up_to
            return
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _trim_append_entries(self, node: Any, message: Message) -> Message | None:
        """The AppendEntries cut to what this log lacks; None if it was fully answered here."""
        if message["term"] < self.raftCurrentTerm or "transmission" in message:
            return message  # ignored by PySyncObj / the chunked path, which the proposer keeps us off
        if "prevLogIdx" not in message:
            # A snapshot chunk (or its empty first message): it verifies nothing in this log, so it must
            # not commit anything in it. The install, if this completes one, sets the commit itself.
            return {**message, "commit_index": min(message["commit_index"], self._SyncObj__raftCommitIndex)}
        prev, entries = message["prevLogIdx"], message.get("entries", [])
        last = self._SyncObj__getCurrentLogIndex()
        if prev >= last:
            return message  # nothing after prevLogIdx here: nothing can be truncated
        ours = self._SyncObj__getEntries(prev, len(entries) + 1)  # ours[i] is at index prev + i
        if not ours or ours[0][2] != message["prevLogTerm"]:
            return message  # no match at prevLogIdx: PySyncObj asks the leader to go back
        held = 0  # how many of the leading entries this log already holds, same index and term
        while (
            held < len(entries)
            and held + 1 < len(ours)
            and ours[held + 1][1] == entries[held][1]
            and ours[held + 1][2] == entries[held][2]
        ):
            held += 1
        anchor = ours[held]  # the last entry known to match the leader's log
        if held < len(entries) or anchor[1] == last:
            # New entries (after a conflict, which PySyncObj then truncates, or past the end of this log),
            # or exactly up to the end of this log: PySyncObj appends from the anchor on.
            return {**message, "prevLogIdx": anchor[1], "prevLogTerm": anchor[2], "entries": entries[held:]}
        # Every entry is already here and this log goes further: truncate nothing, and commit no further
        # than what this message verified (entries past it may be from another leader).
        heartbeat = {k: v for k, v in message.items() if k not in ("prevLogIdx", "prevLogTerm", "entries")}
        heartbeat["commit_index"] = min(message["commit_index"], anchor[1])
        SyncObj._SyncObj__onMessageReceived(self, node, heartbeat)
        self._send_reply(node, anchor[1] + 1, reset=False, success=True)
        return None
