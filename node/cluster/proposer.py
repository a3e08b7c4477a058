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

One proposal stream per cluster: a follower does not make entries of its own. It forwards each batch to
the leader's proposer as a member message over the Raft transport (raft/bridge.py `send_to_member`), and
the leader merges it with its own work and the other followers' into one entry (three proposers each filled
a third of what one fills, and each follower entry cost PySyncObj an extra round trip). The leader answers
with the results and the entry's index; the follower completes its work once it has applied that index
itself, as before (a SENDACK still means "committed, and readable here"). A forward that gets no answer in
`FORWARD_ANSWER_S` (the leader died, the connection dropped, leadership moved) is sent again, to whoever
leads then: dedup in apply makes a second copy of a send harmless, as for a retried proposal.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import trio
import trio.lowlevel

from node.trace import Trace
from raft.apply import Result
from raft.bridge import ProposeFailed, ProposeTiming, RaftNode
from raft.commands import OP_SEND, R_SYSTEM_ERROR, Op, encode_entry
from storage.store import StoreFull

log = logging.getLogger("imnode.proposer")

Done = Callable[[list[Result]], None]
OP_OVERHEAD_BYTES = 160  # CBOR keys and ids of one send op beside its payload
# A forwarded batch is sent again to whoever leads as soon as leadership moves, and to the same leader only
# after this long without an answer (its connection may have dropped the message): sooner, a leader slowed
# by load would get every batch again and again, more load on top of what slows it.
FORWARD_ANSWER_S = 5.0
LEADER_CHECK_S = 0.2
# Member-message kinds: a follower's batch for the leader, and the leader's answer.
FORWARD, ANSWER = "fwd", "ans"


@dataclass
class _Work:
    ops: list[Op]
    done: Done
    size: int
    traces: Sequence[Trace] = ()  # the sampled sends among `ops` (node/trace.py)
    forwarded_by: tuple[str, int] | None = None  # (member's Raft address, its request id): answer it


@dataclass
class _Forward:
    """A batch this follower forwarded, waiting for the leader's answer."""

    answered: trio.Event
    leader: str  # the Raft address it went to: only that member's answer counts
    answer: dict[str, Any] | None = None


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
        forward_to_leader: bool = True,
    ) -> None:
        self._raft = raft
        self._forward_to_leader = forward_to_leader
        self._forwards: dict[int, _Forward] = {}
        # A random start: after a restart, an answer still on its way to the old process's request of the
        # same number must not complete a new one (it is also checked to come from the member asked).
        self._forward_ids = itertools.count(secrets.randbits(62))
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
        self.forwarded = 0  # ops this node sent to the leader's proposer
        self.forwarded_in = 0  # ops other members sent to this one while it led
        self._committing = 0

    def submit(self, ops: list[Op], done: Done, traces: Sequence[Trace] = ()) -> None:
        """Queue ops for the next entry; `done` gets one result per op (never raises, never blocks).

        The caller bounds how much it queues (one batch in flight per channel, a bounded pending list).
        """
        size = sum(_op_bytes(op) for op in ops)
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
            if any(work.forwarded_by is not None for work in batch):
                results, index = await self._propose_once(ops, timing)
                if not index:
                    # Members' work is tried once: its member retries (to whoever leads by then), so a
                    # second try here could land after newer work of that member (a presence going
                    # online again after it went offline). Only this node's own work is tried again.
                    for work in batch:
                        if work.forwarded_by is not None:
                            address, request = work.forwarded_by
                            self._answer(address, {"k": ANSWER, "id": request, "err": "not committed"})
                    batch = [work for work in batch if work.forwarded_by is None]
                    ops = [op for work in batch for op in work.ops]
                    if ops:
                        results, index = await self._propose_until_deadline(ops, timing)
            else:
                results, index = await self._propose_until_deadline(ops, timing)
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
            if work.forwarded_by is not None:
                address, request = work.forwarded_by
                self._answer(address, {"k": ANSWER, "id": request, "i": index, "r": part})
                continue
            try:
                work.done(part)
            except Exception:
                log.exception("a proposer completion failed")

    async def _propose_once(self, ops: list[Op], timing: ProposeTiming | None) -> tuple[list[Result], int]:
        """One proposal of a batch holding members' work, only while this node leads: its results and
        index, or index 0 if it did not commit."""
        if not self._raft.is_leader():
            return [], 0
        try:
            self._raft.store.check_room()
            results, index = await self._raft.propose_at(
                encode_entry(ops), timeout_s=self._commit_timeout_s, timing=timing
            )
        except (StoreFull, ProposeFailed) as exc:
            log.debug("a batch with members' work did not commit (%s)", exc)
            return [], 0
        if len(results) != len(ops):
            return [], 0
        return results, index

    def _answer(self, address: str, body: dict[str, Any]) -> None:
        try:
            self._raft.send_to_member(address, body)
        except Exception:  # never let a member's answer take the proposer down
            log.exception("an answer to %s could not be queued", address)

    async def _propose_until_deadline(
        self, ops: list[Op], timing: ProposeTiming | None
    ) -> tuple[list[Result], int]:
        """The ops' results and the index of the entry that holds them (0 when they failed)."""
        try:
            self._raft.store.check_room()
        except StoreFull as exc:
            return _failed(len(ops), str(exc)), 0
        entry: bytes | None = None
        deadline = trio.current_time() + self._commit_timeout_s
        delay = 0.02
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                self.timeouts += 1
                return _failed(len(ops), "commit timed out"), 0
            leader = self._raft.leader_address() if self._forward_to_leader else None
            if leader is not None and leader != self._raft.settings.self_addr and not self._raft.is_leader():
                answer = await self._forward(leader, ops, min(remaining, FORWARD_ANSWER_S))
                if answer is not None:
                    return await self._answered(ops, answer, deadline)
                self.retries += 1
                if self._raft.leader_address() == leader:  # no answer, and no news of another leader
                    await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
                    delay = min(delay * 2, 0.5)
                continue
            if entry is None:
                entry = encode_entry(ops)
            try:
                results, index = await self._raft.propose_at(entry, timeout_s=remaining, timing=timing)
            except ProposeFailed as exc:
                self.retries += 1
                log.debug("proposal failed (%s); proposing again", exc.reason)
                await trio.sleep(min(delay, max(0.0, deadline - trio.current_time())))
                delay = min(delay * 2, 0.5)
                continue
            if len(results) != len(ops):
                return _failed(len(ops), "entry could not be applied"), 0
            return results, index

    # -- one proposal stream: followers forward, the leader proposes ---------------------------------------
    async def _forward(self, leader: str, ops: list[Op], wait_s: float) -> dict[str, Any] | None:
        """Send ops to the leader's proposer; its answer, or None if none came in `wait_s` or leadership
        moved meanwhile (the caller then tries whoever leads now)."""
        request = next(self._forward_ids)
        waiting = self._forwards[request] = _Forward(trio.Event(), leader)
        self.forwarded += len(ops)
        try:
            self._raft.send_to_member(leader, {"k": FORWARD, "id": request, "ops": ops})
            with trio.move_on_after(wait_s):
                while not waiting.answered.is_set() and self._raft.leader_address() == leader:
                    with trio.move_on_after(LEADER_CHECK_S):
                        await waiting.answered.wait()
        finally:
            del self._forwards[request]
        answer = waiting.answer
        if answer is None or "err" in answer:
            return None
        return answer

    async def _answered(
        self, ops: list[Op], answer: dict[str, Any], deadline: float
    ) -> tuple[list[Result], int]:
        """A forwarded batch's results, once this node has applied the entry that holds them."""
        results, index = answer.get("r"), answer.get("i")
        if not isinstance(results, list) or len(results) != len(ops) or type(index) is not int:
            return _failed(len(ops), "the leader's answer does not fit the batch"), 0
        if index > 0:
            remaining = max(0.0, deadline - trio.current_time())
            if not await self._raft.wait_applied(index, timeout_s=remaining):
                self.timeouts += 1
                return _failed(len(ops), "committed, but not applied here in time"), 0
        return results, index

    def on_member_message(self, address: str, body: Any) -> None:
        """A member's forwarded batch or the leader's answer (trio thread; never blocks or raises)."""
        if not isinstance(body, dict) or type(body.get("id")) is not int:
            log.warning("an unreadable member message from %s was dropped", address)
            return
        if body.get("k") == ANSWER:
            waiting = self._forwards.get(body["id"])
            if waiting is not None and waiting.leader == address and not waiting.answered.is_set():
                waiting.answer = body
                waiting.answered.set()
            return
        ops = body.get("ops")
        if body.get("k") != FORWARD or not isinstance(ops, list) or not ops:
            log.warning("an unreadable member message from %s was dropped", address)
            return
        if not self._raft.is_leader() or not all(isinstance(op, dict) for op in ops):
            # Not (any more) the leader: the follower asks whoever leads now.
            self._answer(address, {"k": ANSWER, "id": body["id"], "err": "not_leader"})
            return
        size = sum(_op_bytes(op) for op in ops)
        self.forwarded_in += len(ops)
        self._queue.append(_Work(ops, _no_completion, size, forwarded_by=(address, body["id"])))
        self._ready.set()

    def statistics(self) -> dict[str, Any]:
        return {
            "queued": len(self._queue),
            "entries": self.entries,
            "ops": self.ops,
            "retries": self.retries,
            "timeouts": self.timeouts,
            "forwarded": self.forwarded,
            "forwarded_in": self.forwarded_in,
        }


def _op_bytes(op: Op) -> int:
    """About what `op` adds to an entry. A send is its payload plus its fixed fields (counted cheaply:
    sends are the hot path); any other op is encoded to count, since a list op can carry thousands of
    uids, and entries must stay below the Raft transport's batch size (its chunked path is refused)."""
    if op.get("t") == OP_SEND:
        payload = op.get("payload", b"")
        return (len(payload) if isinstance(payload, (bytes, str)) else 0) + OP_OVERHEAD_BYTES
    try:
        return len(cbor2.dumps(op))
    except Exception:  # apply refuses what cannot be encoded; count it as a send would be
        return OP_OVERHEAD_BYTES


def _no_completion(results: list[Result]) -> None:
    """Forwarded work is answered to its member instead (`_Work.forwarded_by`)."""
