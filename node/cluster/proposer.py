"""One proposer per node: merges the ready work of all channels into Raft entries.

Batching per channel alone would leave person-to-person traffic at one entry per message, and PySyncObj
commits only a few thousand entries per second here; a shared entry carries a hundred or more messages.
An entry closes after `batch_window_ms` or `batch_max_bytes`, whichever comes first.

Low load waits on no timer (checked for issue 12): with no entry of this proposer in flight, work is proposed
after one checkpoint (so the submits of the same scheduling round share the entry), never after the window;
the window only runs while an entry is committing, when the next one would wait anyway. Below, nothing
ticks either: with `appendEntriesUseBatch=False` PySyncObj wakes its tick thread through a pipe as soon as
a command is queued and sends it at once, commit and apply follow the followers' replies on the sockets, and
the result comes back to the waiting task straight from the `run_sync_soon` callback (raft/bridge.py). The
only sleep in the path is the back-off between retries of a failed proposal.

Outcomes: a failed proposal is proposed again, byte for byte, until `commit_timeout_s` has passed. That is
safe for every op (sends are deduplicated in apply by client_msg_no; the other ops are idempotent) and it
covers both the definite failures (no leader during an election) and the unknown ones (a leader change
after the entry was sent). Only after the deadline does the work fail, with SYSTEM_ERROR.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
import trio.lowlevel

from node.trace import Trace
from raft.apply import Result
from raft.bridge import ProposeFailed, ProposeTiming, RaftNode
from raft.commands import R_SYSTEM_ERROR, Op, encode_entry
from storage.store import StoreFull

log = logging.getLogger("imnode.proposer")

Done = Callable[[list[Result]], None]
OP_OVERHEAD_BYTES = 160  # CBOR keys and ids of one send op beside its payload


@dataclass
class _Work:
    ops: list[Op]
    done: Done
    size: int
    traces: Sequence[Trace] = ()  # the sampled sends among `ops` (node/trace.py)


def _failed(count: int, text: str) -> list[Result]:
    return [{"r": R_SYSTEM_ERROR, "err": text} for _ in range(count)]


class Proposer:
    def __init__(
        self,
        raft: RaftNode,
        *,
        batch_window_ms: float,
        batch_max_bytes: int,
        commit_timeout_s: float,
        max_in_flight: int = 64,
        batch_window_busy_ms: float | None = None,
    ) -> None:
        self._raft = raft
        # An entry is formed only when one of these is free: while all are committing, work gathers in the
        # queue and the next entry takes all of it. (Formed first and then queued for a slot, entries stayed
        # a window's worth each however long the wait: many small entries, each paying Raft's full cost.)
        self._slots = trio.Semaphore(max_in_flight)
        self._window_s = batch_window_ms / 1000
        self._busy_window_s = (
            batch_window_ms if batch_window_busy_ms is None else batch_window_busy_ms
        ) / 1000
        self._max_bytes = batch_max_bytes
        self._commit_timeout_s = commit_timeout_s
        self._queue: collections.deque[_Work] = collections.deque()
        self._ready = trio.Event()
        self.entries = 0
        self.ops = 0
        self.retries = 0
        self.timeouts = 0
        self._committing = 0

    def submit(self, ops: list[Op], done: Done, traces: Sequence[Trace] = ()) -> None:
        """Queue ops for the next entry; `done` gets one result per op (never raises, never blocks).

        The caller bounds how much it queues (one batch in flight per channel, a bounded pending list).
        """
        size = sum(len(op.get("payload", b"")) + OP_OVERHEAD_BYTES for op in ops)
        self._queue.append(_Work(ops, done, size, traces))
        self._ready.set()

    async def call(self, ops: list[Op]) -> list[Result]:
        """Propose ops and wait for their results."""
        finished = trio.Event()
        box: list[list[Result]] = []

        def done(results: list[Result]) -> None:
            box.append(results)
            finished.set()

        self.submit(ops, done)
        await finished.wait()
        return box[0]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self._ready.wait()
                if self._committing:
                    # Entries are already on their way: let a window's worth of work gather into one
                    # entry. With nothing in flight, propose at once (low latency at low load). With two
                    # or more in flight the node is saturated: an entry costs about the same CPU whatever
                    # it carries (PySyncObj's messages, one apply transaction, one hand-off per node), so
                    # the busy window makes fewer, larger ones.
                    await trio.sleep(self._busy_window_s if self._committing > 1 else self._window_s)
                else:
                    await trio.lowlevel.checkpoint()
                while self._queue:
                    await self._slots.acquire()
                    batch: list[_Work] = []
                    size = 0
                    while self._queue and (not batch or size + self._queue[0].size <= self._max_bytes):
                        work = self._queue.popleft()
                        batch.append(work)
                        size += work.size
                    nursery.start_soon(self._commit_in_slot, batch)
                self._ready = trio.Event()

    async def _commit_in_slot(self, batch: list[_Work]) -> None:
        try:
            await self._commit(batch)
        finally:
            self._slots.release()

    async def _commit(self, batch: list[_Work]) -> None:
        ops = [op for work in batch for op in work.ops]
        traces = [trace for work in batch for trace in work.traces]
        timing = None
        if traces:
            timing = ProposeTiming()
            for trace in traces:
                trace.mark("proposal_wait")
        self._committing += 1
        try:
            results = await self._propose_until_deadline(ops, timing)
        finally:
            self._committing -= 1
        if timing is not None and timing.applied:
            for trace in traces:
                trace.mark("raft_commit", timing.apply_started)
                trace.mark("apply", timing.applied)
                trace.mark("back_to_trio")
        self.entries += 1
        self.ops += len(ops)
        start = 0
        for work in batch:
            part = results[start : start + len(work.ops)]
            start += len(work.ops)
            try:
                work.done(part)
            except Exception:
                log.exception("a proposer completion failed")

    async def _propose_until_deadline(self, ops: list[Op], timing: ProposeTiming | None) -> list[Result]:
        try:
            self._raft.store.check_room()
        except StoreFull as exc:
            return _failed(len(ops), str(exc))
        entry = encode_entry(ops)
        deadline = trio.current_time() + self._commit_timeout_s
        delay = 0.02
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                self.timeouts += 1
                return _failed(len(ops), "commit timed out")
            try:
                results = await self._raft.propose(entry, timeout_s=remaining, timing=timing)
            except ProposeFailed as exc:
                self.retries += 1
                log.debug("proposal failed (%s); proposing again", exc.reason)
                await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
                delay = min(delay * 2, 0.5)
                continue
            if len(results) != len(ops):
                return _failed(len(ops), "entry could not be applied")
            return results

    def statistics(self) -> dict[str, Any]:
        return {
            "queued": len(self._queue),
            "entries": self.entries,
            "ops": self.ops,
            "retries": self.retries,
            "timeouts": self.timeouts,
        }
