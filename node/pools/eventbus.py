"""Event pools: sharded trio tasks that run a chain of handlers per event type.

A pool has `shards` tasks; an event goes to shard ``crc32(key) % shards`` so one key's events (one user's,
one channel's) are handled in order. Each shard reads one bounded memory channel: a full shard pushes back
on whoever submits (a connection's reader, an HTTP request) instead of growing memory.

Handlers are small async functions registered per event type, in a chain:
- a **step** runs in the shard, in order, under a timeout, and may reject the event by returning a reason
  code; the chain stops there and the event type's `on_reject` answers (a SENDACK, a CONNACK...). A step that
  raises or times out is retried at once up to `retries` times, then the event is dead-lettered and rejected
  with SYSTEM_ERROR: a broken step never takes the pool down.
- an **observer** only watches: it runs in the pool's observer lane behind a bounded queue, so it can never
  delay the send path; when that queue is full the event is dropped for observers (and counted). A failing
  observer is retried with exponential backoff in its lane, then dead-lettered.

Handlers can be registered and unregistered at run time; a chain change takes effect from the next event.

A **batch event type** carries many items (all the SENDs of one socket read, the sends of one channel, the
pushes of one shard for one Raft entry) through one queue slot and one task switch: its runner gets the
whole batch and runs the item event type's chain once per item with `run_chain`, so plugins still see,
and may reject, every item. Built-in steps (registered with `timeout_s=None`) are called directly there;
only plugin steps pay the timeout, retry and timing wrapper.
"""

from __future__ import annotations

import collections
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import trio

from node.metrics import percentile

log = logging.getLogger("imnode.pool")

Ctx = TypeVar("Ctx")
HandlerFn = Callable[[Any, Any], Awaitable[int | None]]
RejectFn = Callable[[Any, Any, int], Awaitable[None]]
# A batch event's runner: (the pool, the batch). It runs the item chain per item with `pool.run_chain`.
BatchRunFn = Callable[["EventPool[Any]", Any], Awaitable[None]]

SUCCESS = 1
SYSTEM_ERROR = 15
LATENCY_SAMPLES = 512
BREAKER_FAILURES = 5
BREAKER_COOLDOWN_S = 10.0


@dataclass
class HandlerStats:
    calls: int = 0
    rejects: int = 0
    errors: int = 0
    timeouts: int = 0
    dead_lettered: int = 0
    bypassed: int = 0
    total_s: float = 0.0
    recent_s: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES)
    )

    def as_dict(self) -> dict[str, Any]:
        p99 = percentile(self.recent_s, 0.99)
        return {
            "calls": self.calls,
            "rejects": self.rejects,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "dead_lettered": self.dead_lettered,
            "bypassed": self.bypassed,
            "p99_ms": round(p99 * 1000, 3),
        }


@dataclass
class Handler:
    name: str
    fn: HandlerFn
    kind: Literal["step", "observer"]
    timeout_s: float | None  # None: a trusted built-in that never waits (no cancel scope per call)
    retries: int
    enabled: bool = True
    # What a step that keeps failing does to its event: built-ins reject it (reason 15); plugins are
    # skipped, so a broken extension never stops messages.
    on_error: Literal["reject", "skip"] = "reject"
    stats: HandlerStats = field(default_factory=HandlerStats)
    # Circuit breaker: after `BREAKER_FAILURES` failures in a row the handler is bypassed for
    # `BREAKER_COOLDOWN_S`, so a hanging plugin costs its timeout a few times, not on every event.
    # `open_until` is on trio's clock, so tests can run the cooldown on autojump_clock.
    failures_in_row: int = 0
    open_until: float = 0.0
    priority: int | None = None


@dataclass(frozen=True)
class DeadLetter:
    at: float
    pool: str
    event_type: str
    handler: str
    error: str
    event: str


class HandlerError(Exception):
    """A registration problem: unknown neighbour, duplicate name, bad kind."""


class EventPool(Generic[Ctx]):
    """One event pool (user, channel or pusher): shards, handler chains, statistics, dead letters."""

    def __init__(
        self,
        name: str,
        ctx: Ctx,
        *,
        shards: int,
        queue_size: int,
        handler_timeout_s: float = 5.0,
        handler_retries: int = 3,
        dead_letters_max: int = 1000,
    ) -> None:
        self.name = name
        self.ctx = ctx
        self.handler_timeout_s = handler_timeout_s
        self.handler_retries = handler_retries
        self._chains: dict[str, list[Handler]] = {}
        self._on_reject: dict[str, RejectFn] = {}
        self._batch_runners: dict[str, BatchRunFn] = {}
        channels = [trio.open_memory_channel[tuple[str, Any]](queue_size) for _ in range(shards)]
        self._senders = [send for send, _ in channels]
        self._receivers = [receive for _, receive in channels]
        self._queue_size = queue_size
        # One lane per observer, so a slow or hanging observer only ever delays itself.
        self._lanes: dict[int, trio.MemorySendChannel[tuple[str, Any]]] = {}
        self._waiting_lanes: list[tuple[Handler, trio.MemoryReceiveChannel[tuple[str, Any]]]] = []
        self._nursery: trio.Nursery | None = None
        self.dead_letters: collections.deque[DeadLetter] = collections.deque(maxlen=dead_letters_max)
        self.processed = 0
        self.rejected = 0
        self.observer_dropped = 0
        self.latency = HandlerStats()

    # -- registry ----------------------------------------------------------------------------------------
    def event_type(self, event_type: str, *, on_reject: RejectFn | None = None) -> None:
        """Declare an event type; `on_reject` answers an event a step rejected."""
        if event_type in self._batch_runners:
            raise HandlerError(f"{self.name}.{event_type}: a batch event type has no chain")
        self._chains.setdefault(event_type, [])
        if on_reject is not None:
            self._on_reject[event_type] = on_reject

    def batch_event_type(self, event_type: str, run: BatchRunFn) -> None:
        """Declare an event type that carries a batch: the shard hands each one to `run(pool, batch)`.

        It has no chain of its own (handlers register on the item event type, whose chain `run` runs per
        item), so it is not listed in `event_types()`.
        """
        if event_type in self._chains:
            raise HandlerError(f"{self.name}.{event_type}: already a chained event type")
        self._batch_runners[event_type] = run

    def register(
        self,
        event_type: str,
        name: str,
        fn: HandlerFn,
        *,
        kind: Literal["step", "observer"] = "step",
        before: str | None = None,
        after: str | None = None,
        timeout_s: float | Literal["default"] | None = "default",
        retries: int | None = None,
        on_error: Literal["reject", "skip"] = "reject",
        priority: int | None = None,
    ) -> Handler:
        """Add a handler to an event type's chain (at the end, or before/after a named handler).

        `timeout_s=None` is for built-in handlers that never block: a cancel scope per call costs about
        as much as the handler itself on the send path. `priority` (lower runs first) places a handler
        among others that gave one; without before/after/priority it goes last.
        """
        if kind not in ("step", "observer"):
            raise HandlerError(f"handler {name}: kind must be 'step' or 'observer'")
        if sum(x is not None for x in (before, after, priority)) > 1:
            raise HandlerError(f"handler {name}: give one of before=, after= or priority=")
        if event_type in self._batch_runners:
            raise HandlerError(f"{self.name}.{event_type}: a batch event type has no chain")
        chain = self._chains.setdefault(event_type, [])
        if any(h.name == name for h in chain):
            raise HandlerError(f"{self.name}.{event_type}: a handler named {name!r} is already registered")
        handler = Handler(
            name,
            fn,
            kind,
            self.handler_timeout_s if timeout_s == "default" else timeout_s,
            self.handler_retries if retries is None else retries,
            on_error=on_error,
            priority=priority,
        )
        position = len(chain)
        if priority is not None:
            later = [i for i, h in enumerate(chain) if h.priority is not None and h.priority > priority]
            position = later[0] if later else len(chain)
        anchor = before or after
        if anchor is not None:
            names = [h.name for h in chain]
            if anchor not in names:
                raise HandlerError(
                    f"{self.name}.{event_type}: no handler named {anchor!r} to place {name} by"
                )
            position = names.index(anchor) + (1 if after else 0)
        if kind == "observer":
            send, receive = trio.open_memory_channel[tuple[str, Any]](self._queue_size)
            self._lanes[id(handler)] = send
            if self._nursery is not None:
                self._nursery.start_soon(self._run_lane, handler, receive)
            else:
                self._waiting_lanes.append((handler, receive))
        # Copy-on-write: a shard iterating the old chain is not disturbed.
        self._chains[event_type] = [*chain[:position], handler, *chain[position:]]
        return handler

    def unregister(self, event_type: str, name: str) -> None:
        chain = self._chains.get(event_type, [])
        if not any(h.name == name for h in chain):
            raise HandlerError(f"{self.name}.{event_type}: no handler named {name!r}")
        for handler in chain:
            if handler.name == name and id(handler) in self._lanes:
                self._lanes.pop(id(handler)).close()  # its lane task finishes what is queued, then ends
        self._chains[event_type] = [h for h in chain if h.name != name]

    def event_types(self) -> set[str]:
        return set(self._chains)

    def chain(self, event_type: str) -> list[Handler]:
        return list(self._chains.get(event_type, []))

    def set_enabled(self, name: str, enabled: bool) -> int:
        """Switch every handler called `name` on or off; returns how many matched."""
        count = 0
        for chain in self._chains.values():
            for handler in chain:
                if handler.name == name:
                    handler.enabled = enabled
                    count += 1
        return count

    # -- submitting --------------------------------------------------------------------------------------
    def shard_of(self, key: str) -> int:
        # crc32, not hash(): Python salts str hashes per process, and shards must be stable.
        return zlib.crc32(key.encode()) % len(self._senders)

    async def submit(self, key: str, event_type: str, event: Any) -> None:
        """Queue an event for the shard of `key`; waits while that shard's queue is full."""
        await self._senders[self.shard_of(key)].send((event_type, event))

    def try_submit(self, key: str, event_type: str, event: Any) -> bool:
        """Queue without waiting; False (and nothing queued) when the shard is full."""
        try:
            self._senders[self.shard_of(key)].send_nowait((event_type, event))
        except trio.WouldBlock:
            return False
        return True

    # -- running -----------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for receiver in self._receivers:
                nursery.start_soon(self._run_shard, receiver)
            for handler, lane in self._waiting_lanes:
                nursery.start_soon(self._run_lane, handler, lane)
            self._waiting_lanes.clear()
            task_status.started()

    async def _run_shard(self, receiver: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        runners = self._batch_runners
        async for event_type, event in receiver:
            run = runners.get(event_type)
            if run is None:
                await self.dispatch(event_type, event)
                continue
            started = time.perf_counter()
            try:
                await run(self, event)
            except Exception:
                # The runner isolates each item's handlers; this is a bug in the runner itself. Logged,
                # never allowed to take the shard (and every key on it) down.
                log.exception("%s.%s: batch runner failed", self.name, event_type)
            self._record_latency(time.perf_counter() - started)

    async def dispatch(self, event_type: str, event: Any) -> int:
        """Run the chain for one event; returns SUCCESS or the reason it was rejected with."""
        started = time.perf_counter()
        reason = await self.run_chain(event_type, event)
        self._record_latency(time.perf_counter() - started)
        return reason

    def _record_latency(self, elapsed: float) -> None:
        self.latency.calls += 1
        self.latency.total_s += elapsed
        self.latency.recent_s.append(elapsed)

    def has_handlers(self, event_type: str, *, besides: Collection[str] = ()) -> bool:
        """Whether an enabled handler not named in `besides` would see an event of this type (so a
        caller can skip running a chain that holds only a built-in placeholder)."""
        return any(h.enabled and h.name not in besides for h in self._chains.get(event_type, ()))

    async def run_chain(self, event_type: str, event: Any) -> int:
        """Run the chain for one event (one item of a batch): SUCCESS, or the reason it was rejected with
        after `on_reject` answered it. Counted in `processed`, not in the pool's latency (the batch is)."""
        reason = SUCCESS
        for handler in self._chains.get(event_type, ()):
            if not handler.enabled:
                continue
            if handler.open_until and handler.open_until > trio.current_time():
                handler.stats.bypassed += 1
                continue
            if handler.kind == "observer":
                try:
                    self._lanes[id(handler)].send_nowait((event_type, event))
                except (trio.WouldBlock, KeyError):
                    self.observer_dropped += 1
                continue
            if handler.timeout_s is None:
                # A trusted built-in step (no timeout): called right here, counted but not timed per call
                # (on the send path a wrapper call cost as much as the step). Same outcomes as `_run_step`.
                handler.stats.calls += 1
                try:
                    result = await handler.fn(self.ctx, event)
                except Exception as exc:
                    handler.stats.errors += 1
                    if handler.retries:
                        reason = await self._run_step(handler, event_type, event, attempts=handler.retries)
                    else:
                        reason = self._step_failed(handler, event_type, event, exc)
                else:
                    if result is None or result == SUCCESS:
                        handler.failures_in_row = 0
                        continue
                    reason = self._step_result(handler, event_type, event, result)
            else:
                reason = await self._run_step(handler, event_type, event)
            if reason != SUCCESS:
                break
        self.processed += 1
        if reason != SUCCESS:
            self.rejected += 1
            on_reject = self._on_reject.get(event_type)
            if on_reject is not None:
                try:
                    await on_reject(self.ctx, event, reason)
                except Exception:
                    log.exception("%s.%s: on_reject failed", self.name, event_type)
        return reason

    async def _call(self, handler: Handler, event: Any) -> int | None:
        handler.stats.calls += 1
        started = time.perf_counter()
        try:
            if handler.timeout_s is None:
                return await handler.fn(self.ctx, event)
            with trio.fail_after(handler.timeout_s):
                return await handler.fn(self.ctx, event)
        except trio.TooSlowError:
            handler.stats.timeouts += 1
            raise
        finally:
            elapsed = time.perf_counter() - started
            handler.stats.total_s += elapsed
            handler.stats.recent_s.append(elapsed)

    async def _run_step(
        self, handler: Handler, event_type: str, event: Any, attempts: int | None = None
    ) -> int:
        last_error: BaseException | None = None
        for _attempt in range(handler.retries + 1 if attempts is None else attempts):
            try:
                result = await self._call(handler, event)
            except Exception as exc:  # isolate: a broken handler never takes the shard down
                handler.stats.errors += 1
                last_error = exc
                continue
            return self._step_result(handler, event_type, event, result)
        return self._step_failed(handler, event_type, event, last_error)

    def _step_result(self, handler: Handler, event_type: str, event: Any, result: Any) -> int:
        """What a step's return value means: SUCCESS, a reason to reject with, or a failure."""
        handler.failures_in_row = 0
        if result is None or result == SUCCESS:
            return SUCCESS
        if not isinstance(result, int) or isinstance(result, bool) or not 0 <= result <= 255:
            handler.stats.errors += 1
            error = TypeError(f"handler returned {result!r}, not a reason code")
            return self._step_failed(handler, event_type, event, error)
        handler.stats.rejects += 1
        return int(result)

    def _step_failed(self, handler: Handler, event_type: str, event: Any, error: BaseException | None) -> int:
        self._dead_letter(handler, event_type, event, error)
        self._trip(handler)
        return SUCCESS if handler.on_error == "skip" else SYSTEM_ERROR

    def _trip(self, handler: Handler) -> None:
        handler.failures_in_row += 1
        if handler.failures_in_row >= BREAKER_FAILURES:
            handler.open_until = trio.current_time() + BREAKER_COOLDOWN_S
            handler.failures_in_row = 0
            log.warning(
                "%s: handler %s keeps failing; bypassed for %.0fs",
                self.name,
                handler.name,
                BREAKER_COOLDOWN_S,
            )

    async def _run_lane(self, handler: Handler, lane: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        async for event_type, event in lane:
            delay = 0.05
            for attempt in range(handler.retries + 1):
                try:
                    await self._call(handler, event)
                    handler.failures_in_row = 0
                    break
                except Exception as exc:
                    handler.stats.errors += 1
                    if attempt == handler.retries:
                        self._dead_letter(handler, event_type, event, exc)
                        self._trip(handler)
                    else:
                        await trio.sleep(delay)
                        delay = min(delay * 2, 2.0)

    def _dead_letter(
        self, handler: Handler, event_type: str, event: Any, error: BaseException | None
    ) -> None:
        handler.stats.dead_lettered += 1
        text = "timeout" if isinstance(error, trio.TooSlowError) else repr(error)
        log.warning(
            "%s.%s: handler %s failed, event dead-lettered: %s", self.name, event_type, handler.name, text
        )
        self.dead_letters.append(
            DeadLetter(time.time(), self.name, event_type, handler.name, text, repr(event)[:300])
        )

    # -- statistics --------------------------------------------------------------------------------------
    def queue_depths(self) -> list[int]:
        return [s.statistics().current_buffer_used for s in self._senders]

    def statistics(self) -> dict[str, Any]:
        return {
            "shards": len(self._senders),
            "queue_depth": sum(self.queue_depths()),
            "processed": self.processed,
            "rejected": self.rejected,
            "observer_dropped": self.observer_dropped,
            "observer_queue_depth": sum(
                lane.statistics().current_buffer_used for lane in self._lanes.values()
            ),
            "dead_letters": len(self.dead_letters),
            "latency": self.latency.as_dict(),
            "handlers": {
                event_type: [
                    {
                        "name": h.name,
                        "kind": h.kind,
                        "enabled": h.enabled,
                        # Built-in steps are counted, not timed (_run_builtin): their p99 is no measurement.
                        "timed": h.timeout_s is not None,
                        "bypassed_until": h.open_until if h.open_until > trio.current_time() else None,
                        **h.stats.as_dict(),
                    }
                    for h in chain
                ]
                for event_type, chain in self._chains.items()
            },
        }
