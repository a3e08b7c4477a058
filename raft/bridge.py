"""The one crossing between PySyncObj's tick thread and trio.

Rules (../shared/RAFT_NOTES.md): the tick thread never waits on trio, and what it calls into trio can never
raise. So the tick thread appends to a locked deque and asks trio to run a drain soon (idempotent, cannot
raise). Flow is bounded upstream, by `max_in_flight` proposals per node.

Two deques, two drains:
- proposal results are resolved by the `run_sync_soon` callback itself (`_resolve_results`): it only pops
  waiters from a dict and sets their events, which cannot raise, so the proposer's task is the first task
  woken after the commit (one task switch, not two through a pump task);
- committed entries and snapshot installs go through a pump task (`run`), because handing an entry to the
  bounded committed stream may have to wait, and a `run_sync_soon` callback must never wait or raise.
A result may therefore reach its proposer before its entry reaches the committed stream; nothing orders
the two (the SENDACK needs only the result, the push only the entry, and each stream keeps log order).

To the node this module offers a narrow interface: `await propose(entry)` for a result, and a stream of
`Committed` entries. If Raft and apply ever move to a process of their own, only this module changes.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from raft.apply import Result
from raft.machine import Committed, Machine, RaftSettings
from storage.store import Store

log = logging.getLogger("imnode.raft")

# PySyncObj's FAIL_REASON values.
(
    SUCCESS,
    QUEUE_FULL,
    MISSING_LEADER,
    DISCARDED,
    NOT_LEADER,
    LEADER_CHANGED,
    REQUEST_DENIED,
    UNKNOWN_OUTCOME,
) = range(8)
# These mean the entry was not and will not be committed; anything else may still commit.
DEFINITE_FAILURES = frozenset({QUEUE_FULL, MISSING_LEADER, DISCARDED, NOT_LEADER, REQUEST_DENIED})
FAIL_NAMES = {
    QUEUE_FULL: "queue_full",
    MISSING_LEADER: "missing_leader",
    DISCARDED: "discarded",
    NOT_LEADER: "not_leader",
    LEADER_CHANGED: "leader_changed",
    REQUEST_DENIED: "request_denied",
    UNKNOWN_OUTCOME: "unknown_outcome",
}
ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
STOPPED = "stopped"  # the node is shutting down: nothing was proposed


class ProposeFailed(Exception):
    """A proposal did not produce a result. `definite`: it certainly did not commit (safe to report)."""

    def __init__(self, reason: str, *, definite: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.definite = definite


@dataclass
class _Waiter:
    done: trio.Event
    result: list[Result] | None = None
    error: int = SUCCESS
    called_back: float = 0.0
    apply_started: float = 0.0
    index: int = 0  # the Raft index of the applied entry


@dataclass
class ProposeTiming:
    """time.perf_counter() stamps of one proposal, for the node's latency trace (node/trace.py)."""

    proposed: float = 0.0  # handed to PySyncObj
    apply_started: float = 0.0  # committed: this node's apply of the entry began (tick thread)
    applied: float = 0.0  # apply done, completion posted to trio (tick thread)


T = TypeVar("T")
# Committed entries waiting for the committed stream beyond which proposal results are held back.
COMMITTED_BACKLOG_MAX = 512
_READ_ATTEMPTS = 5


def _read_tick_state(read: Callable[[], T]) -> T:
    """Read PySyncObj state the tick thread owns, from the trio thread.

    Membership changes resize the sets and dicts `getStatus` and `otherNodes` walk; a GIL switch in the
    middle of a walk raises RuntimeError ("changed size during iteration"). The change is over at once:
    read again rather than let a status poll kill its task.
    """
    for _attempt in range(_READ_ATTEMPTS - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


class RaftNode:
    """Owns the PySyncObj machine of one node and its crossing into trio."""

    def __init__(self, settings: RaftSettings, store: Store, *, max_in_flight: int = 64) -> None:
        self.settings = settings
        self.store = store
        self._machine: Machine | None = None
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._inbox_lock = threading.Lock()
        # (token, result, error, called_back, apply_started, index) per finished proposal, in callback order.
        self._results: collections.deque[tuple[int, Any, int, float, float, int]] = collections.deque()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wakeup = trio.Event()
        self._waiters: dict[int, _Waiter] = {}
        self._tokens = itertools.count(1)
        self._in_flight = trio.Semaphore(max_in_flight)
        self._committed_send, self._committed_receive = trio.open_memory_channel[Committed](256)
        self.proposed = 0
        self.failed: collections.Counter[str] = collections.Counter()
        # Called on the trio thread, in log order, after a snapshot replaced the store.
        self.on_snapshot_installed: Callable[[], None] = lambda: None
        # Called on the trio thread with (sender's Raft address, body) for each member message (must not
        # block or raise: it runs in the pump that also carries committed entries).
        self.on_member_message: Callable[[str, Any], None] = lambda address, body: None
        # The highest index handed to the committed stream (or installed by a snapshot), and who waits for
        # one: a follower's forwarded proposal completes only once this node has applied it too.
        self.applied_through = store.applied_index()
        self._applied_waiters: list[tuple[int, int, trio.Event]] = []
        self._applied_waiter_ids = itertools.count()

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the machine (journal replay begins at once) and pump the crossing until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._machine = Machine(
            self.settings,
            self.store,
            self._on_commit,
            lambda: self._post(("installed",)),
            on_member_message=lambda address, body: self._post(("member", address, body)),
        )
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while True:
                    # One at a time, so len(self._inbox) is the backlog the results wait behind.
                    with self._inbox_lock:
                        if not self._inbox:
                            break
                        item = self._inbox.popleft()
                    if item[0] == "installed":
                        self.on_snapshot_installed()
                        self._note_applied(self.store.applied_index())
                    elif item[0] == "member":
                        try:
                            self.on_member_message(item[1], item[2])
                        except Exception:
                            log.exception("a member message from %s failed", item[1])
                    else:
                        await self._committed_send.send(item[1])
                        self._note_applied(item[1].raft_index)
                    if self._results:
                        self._resolve_results()  # any held back while the backlog was long
        finally:
            self.close()

    def close(self) -> None:
        """Stop the tick thread and wait for it (closes the journal); safe to call twice."""
        machine, self._machine = self._machine, None
        if machine is not None:
            machine.destroy()
            thread = getattr(machine, "_SyncObj__thread", None)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=10)

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            raise RuntimeError("raft is not running")
        return self._machine

    # -- tick thread side (never blocks on trio, never raises into it) -----------------------------------
    def _post(self, item: tuple[Any, ...]) -> None:
        with self._inbox_lock:
            self._inbox.append(item)
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._wake, idempotent=True)
        except trio.RunFinishedError:
            pass  # trio is gone (shutdown): nothing is waiting any more

    def _wake(self) -> None:
        self._wakeup.set()

    def _post_result(self, item: tuple[int, Any, int, float, float, int]) -> None:
        with self._inbox_lock:
            self._results.append(item)
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._resolve_results, idempotent=True)
        except trio.RunFinishedError:
            pass  # trio is gone (shutdown): nothing is waiting any more

    def _on_commit(self, committed: Committed) -> None:
        self._post(("commit", committed))

    # -- trio side ---------------------------------------------------------------------------------------
    def _resolve_results(self) -> None:
        """Run by trio's `run_sync_soon` runner: hand every finished proposal its outcome.

        Invariant: cannot raise (a raise here is a TrioInternalError that kills the node). It takes a lock
        the tick thread holds only for an append, pops from a dict, sets attributes and trio Events.
        Idempotent scheduling may run it once for several posts, or once with nothing left to do.
        """
        with self._inbox_lock:
            if len(self._inbox) > COMMITTED_BACKLOG_MAX:
                # Distribution is behind: hold the SENDACKs back so the proposals in flight, and with them
                # the senders, wait for it (the pump resolves them as it drains), instead of committing on
                # while committed entries pile up here unbounded.
                return
            items = list(self._results)
            self._results.clear()
        for token, result, error, called_back, apply_started, index in items:
            waiter = self._waiters.pop(token, None)
            if waiter is not None:
                waiter.result = result
                waiter.error = error
                waiter.called_back = called_back
                waiter.apply_started = apply_started
                waiter.index = index
                waiter.done.set()

    async def propose(
        self, entry: bytes, *, timeout_s: float, timing: ProposeTiming | None = None
    ) -> list[Result]:
        """Commit one entry and return its per-op results once this node has applied it.

        Raises ProposeFailed: `definite` when the entry was certainly not committed; otherwise its outcome
        is unknown (it may still commit) and a retry must be one that dedup makes safe. `timing`, when
        given, receives the stamps of a successful proposal.
        """
        results, _index = await self.propose_at(entry, timeout_s=timeout_s, timing=timing)
        return results

    async def propose_at(
        self, entry: bytes, *, timeout_s: float, timing: ProposeTiming | None = None
    ) -> tuple[list[Result], int]:
        """As `propose`, with the Raft index the entry was applied at."""
        async with self._in_flight:

            def execute(callback: Callable[[Any, int], None]) -> None:
                self.proposed += 1
                self.machine.execute(entry, callback=callback)

            try:
                waiter = await self._call_waiter(execute, timeout_s, timing)
            except ProposeFailed as exc:
                if exc.reason != STOPPED:
                    self.failed[exc.reason] += 1
                raise
            if waiter.result is None:
                # Only a replayed entry returns None, and nobody waits on those.
                raise ProposeFailed("no result", definite=False)
            return list(waiter.result), waiter.index

    async def _call(
        self,
        start: Callable[[Callable[[Any, int], None]], None],
        timeout_s: float,
        timing: ProposeTiming | None = None,
    ) -> Any:
        """Run `start(callback)` on PySyncObj and wait for the callback: the one way this node waits on
        Raft (proposals and membership changes alike). Raises ProposeFailed."""
        return (await self._call_waiter(start, timeout_s, timing)).result

    async def _call_waiter(
        self,
        start: Callable[[Callable[[Any, int], None]], None],
        timeout_s: float,
        timing: ProposeTiming | None = None,
    ) -> _Waiter:
        if self._machine is None:  # stopping: the tick thread is gone
            raise ProposeFailed(STOPPED, definite=True)
        token = next(self._tokens)
        waiter = _Waiter(trio.Event())
        self._waiters[token] = waiter

        machine = self._machine

        def callback(result: Any, error: int) -> None:
            # On the tick thread, right after this node applied the entry (when it succeeded).
            self._post_result(
                (token, result, error, time.perf_counter(), machine.apply_started, machine.applying_index)
            )

        try:
            if timing is not None:
                timing.proposed = time.perf_counter()
            start(callback)
            with trio.move_on_after(timeout_s):
                await waiter.done.wait()
        finally:
            self._waiters.pop(token, None)
        if not waiter.done.is_set():
            raise ProposeFailed("timeout", definite=False)
        if timing is not None:
            timing.apply_started, timing.applied = waiter.apply_started, waiter.called_back
        if waiter.error != SUCCESS:
            name = FAIL_NAMES.get(waiter.error, str(waiter.error))
            raise ProposeFailed(name, definite=waiter.error in DEFINITE_FAILURES)
        return waiter

    # -- members' own messages, and waiting for this node's apply ----------------------------------------
    def send_to_member(self, address: str, body: Any) -> None:
        """Send `body` (CBOR-able) to the member at Raft address `address` over the authenticated Raft
        transport; never blocks, and is dropped if that member is not connected (callers retry)."""
        machine = self._machine
        if machine is not None:
            machine.send_to_member(address, body)

    def _note_applied(self, index: int) -> None:
        if index <= self.applied_through:
            return
        self.applied_through = index
        while self._applied_waiters and self._applied_waiters[0][0] <= index:
            heapq.heappop(self._applied_waiters)[2].set()

    async def wait_applied(self, index: int, *, timeout_s: float) -> bool:
        """Until this node has applied `index` (True), or `timeout_s` passed (False)."""
        if index <= self.applied_through:
            return True
        event = trio.Event()
        heapq.heappush(self._applied_waiters, (index, next(self._applied_waiter_ids), event))
        with trio.move_on_after(timeout_s):
            await event.wait()
        return event.is_set()

    async def add_member(self, address: str, *, timeout_s: float) -> None:
        """Add a node (PySyncObj dynamic membership; one change at a time, committed through the log)."""
        machine = self.machine
        await self._call(lambda cb: machine.addNodeToCluster(address, callback=cb), timeout_s)

    async def remove_member(self, address: str, *, timeout_s: float) -> None:
        machine = self.machine
        await self._call(lambda cb: machine.removeNodeFromCluster(address, callback=cb), timeout_s)

    async def transfer_leadership(self, address: str | None, *, timeout_s: float) -> None:
        """Ask the leader to hand over (to `address`, or the most caught-up follower)."""
        machine = self.machine
        await self._call(lambda cb: machine.transferLeadership(address, callback=cb), timeout_s)

    def members(self) -> list[str]:
        """Raft addresses of the current members, this node first."""
        machine = self.machine
        return _read_tick_state(
            lambda: [machine.selfNode.address, *sorted(node.address for node in machine.otherNodes)]
        )

    async def committed(self) -> AsyncIterator[Committed]:
        """Every entry this node applies, in log order (one consumer)."""
        async for item in self._committed_receive:
            yield item

    def status(self) -> dict[str, Any]:
        """PySyncObj's status, with JSON-friendly names."""
        raw = _read_tick_state(self.machine.getStatus)
        leader = raw.get("leader")
        match = {
            k.removeprefix("match_idx_server_"): v
            for k, v in raw.items()
            if k.startswith("match_idx_server_")
        }
        connected = {
            k.removeprefix("partner_node_status_server_"): v == 2
            for k, v in raw.items()
            if k.startswith("partner_node_status_server_")
        }
        return {
            "members": self.members(),
            "connected": connected,
            "match_index": match,
            "self": str(raw.get("self")),
            "role": ROLE_NAMES.get(raw.get("state", -1), "unknown"),
            "leader": None if leader is None else str(leader),
            "has_quorum": bool(raw.get("has_quorum")),
            "term": raw.get("raft_term"),
            "commit_index": raw.get("commit_idx"),
            "applied_index": raw.get("last_applied"),
            "log_len": raw.get("log_len"),
            "store_applied_index": self.store.applied_index(),
            "proposed": self.proposed,
            "failed": dict(self.failed),
        }

    def is_leader(self) -> bool:
        """This node leads (as far as it knows: a deposed leader learns it at the next contact)."""
        machine = self._machine
        return machine is not None and bool(machine._isLeader())

    def leader_address(self) -> str | None:
        """The Raft address of the leader this node knows of (None during an election)."""
        machine = self._machine
        leader = machine._getLeader() if machine is not None else None
        return None if leader is None else str(leader.address)

    def is_ready(self) -> bool:
        """A leader is known and this node has quorum-backed state to serve from."""
        machine = self._machine
        return machine is not None and machine._getLeader() is not None
