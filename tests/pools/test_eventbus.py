"""node/pools/eventbus.py: handler chains, isolation of failing and hanging handlers, the circuit breaker,
observers, shards, statistics.

Pure trio (no Raft), so these run on `autojump_clock`: timeouts and backoffs cost no real time.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from node.pools.eventbus import (
    BREAKER_COOLDOWN_S,
    BREAKER_FAILURES,
    SUCCESS,
    SYSTEM_ERROR,
    EventPool,
    HandlerError,
)

WAIT_S = 30.0  # virtual seconds on the autojump clock


@dataclass
class Ctx:
    calls: list[tuple[str, Any]] = field(default_factory=list)
    rejected: list[tuple[Any, int]] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=dict)

    def stamp(self, name: str) -> None:
        self.times.setdefault(name, []).append(trio.current_time())


def recorder(name: str) -> Callable[[Ctx, Any], Any]:
    async def handler(ctx: Ctx, event: Any) -> int | None:
        ctx.calls.append((name, event))
        return None

    return handler


async def on_reject(ctx: Ctx, event: Any, reason: int) -> None:
    ctx.rejected.append((event, reason))


def make_pool(**kwargs: Any) -> EventPool[Ctx]:
    options: dict[str, Any] = {"shards": 4, "queue_size": 64, "handler_timeout_s": 1.0, "handler_retries": 2}
    options.update(kwargs)
    pool: EventPool[Ctx] = EventPool("test", Ctx(), **options)
    pool.event_type("ev", on_reject=on_reject)
    return pool


@asynccontextmanager
async def running(pool: EventPool[Ctx]) -> AsyncIterator[EventPool[Ctx]]:
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for the pool's own counters: they have no event to wait on, so poll on the virtual clock."""
    with trio.fail_after(WAIT_S):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.001)


def names(pool: EventPool[Ctx], event_type: str = "ev") -> list[str]:
    return [h.name for h in pool.chain(event_type)]


# -- the chain ---------------------------------------------------------------------------------------------


async def test_chain_order_with_before_and_after() -> None:
    pool = make_pool()
    pool.register("ev", "b", recorder("b"))
    pool.register("ev", "d", recorder("d"))
    pool.register("ev", "a", recorder("a"), before="b")
    pool.register("ev", "c", recorder("c"), after="b")
    pool.register("ev", "e", recorder("e"), after="d")
    assert names(pool) == ["a", "b", "c", "d", "e"]
    assert await pool.dispatch("ev", 1) == SUCCESS
    assert [name for name, _ in pool.ctx.calls] == ["a", "b", "c", "d", "e"]

    with pytest.raises(HandlerError, match="no handler named 'zz'"):
        pool.register("ev", "x", recorder("x"), before="zz")
    with pytest.raises(HandlerError, match="already registered"):
        pool.register("ev", "a", recorder("a"))
    with pytest.raises(HandlerError, match="kind"):
        pool.register("ev", "y", recorder("y"), kind="sidecar")  # type: ignore[arg-type]
    assert names(pool) == ["a", "b", "c", "d", "e"]


async def test_register_refuses_both_before_and_after() -> None:
    pool = make_pool()
    pool.register("ev", "a", recorder("a"))
    pool.register("ev", "c", recorder("c"))
    with pytest.raises(HandlerError):
        pool.register("ev", "b", recorder("b"), before="a", after="c")


async def test_a_rejecting_step_stops_the_chain_and_answers() -> None:
    pool = make_pool()

    async def gate(ctx: Ctx, event: Any) -> int | None:
        return 3 if event == "deny" else SUCCESS

    pool.register("ev", "gate", gate)
    pool.register("ev", "after", recorder("after"))
    assert await pool.dispatch("ev", "deny") == 3
    assert await pool.dispatch("ev", "allow") == SUCCESS
    assert pool.ctx.calls == [("after", "allow")]
    assert pool.ctx.rejected == [("deny", 3)]


async def test_unregister_at_run_time(autojump_clock: trio.testing.MockClock) -> None:
    pool = make_pool()
    pool.register("ev", "a", recorder("a"))
    pool.register("ev", "b", recorder("b"))
    async with running(pool):
        await pool.submit("k", "ev", 1)
        await wait_until(lambda: pool.processed == 1)
        pool.unregister("ev", "b")
        await pool.submit("k", "ev", 2)
        await wait_until(lambda: pool.processed == 2)
    assert pool.ctx.calls == [("a", 1), ("b", 1), ("a", 2)]
    with pytest.raises(HandlerError):
        pool.unregister("ev", "b")


async def test_set_enabled_false_skips_a_handler() -> None:
    pool = make_pool()
    pool.event_type("other")
    pool.register("ev", "a", recorder("a"))
    pool.register("ev", "b", recorder("b"))
    pool.register("other", "b", recorder("b-other"))
    assert pool.set_enabled("b", False) == 2
    assert pool.set_enabled("nobody", False) == 0
    await pool.dispatch("ev", 1)
    await pool.dispatch("other", 1)
    assert pool.ctx.calls == [("a", 1)]
    assert [h["enabled"] for h in pool.statistics()["handlers"]["ev"]] == [True, False]
    pool.set_enabled("b", True)
    await pool.dispatch("ev", 2)
    assert pool.ctx.calls[1:] == [("a", 2), ("b", 2)]


# -- failing and hanging steps -----------------------------------------------------------------------


async def test_a_raising_step_is_retried_then_dead_lettered(autojump_clock: trio.testing.MockClock) -> None:
    pool = make_pool(handler_retries=2)
    attempts: dict[Any, int] = {}

    async def flaky(ctx: Ctx, event: Any) -> int | None:
        attempts[event] = attempts.get(event, 0) + 1
        if event == "bad" or (event == "once" and attempts[event] == 1):
            raise RuntimeError(f"broken on {event}")
        return None

    pool.register("ev", "flaky", flaky)
    pool.register("ev", "after", recorder("after"))
    events = ["bad", "once", *range(20)]
    async with running(pool):
        for n, event in enumerate(events):
            await pool.submit(f"key-{n % 5}", "ev", event)
        await wait_until(lambda: pool.processed == len(events))

    assert attempts["bad"] == 3  # the first try and `retries` more
    assert attempts["once"] == 2
    assert pool.ctx.rejected == [("bad", SYSTEM_ERROR)]
    # Every other event, including the one that failed once, went through the whole chain.
    assert sorted(str(e) for _, e in pool.ctx.calls) == sorted(str(e) for e in events if e != "bad")
    [letter] = pool.dead_letters
    assert (letter.pool, letter.event_type, letter.handler) == ("test", "ev", "flaky")
    assert "RuntimeError" in letter.error and "broken on bad" in letter.error
    assert letter.event == "'bad'"
    stats = pool.statistics()
    assert (stats["processed"], stats["rejected"], stats["dead_letters"]) == (len(events), 1, 1)
    flaky_stats = stats["handlers"]["ev"][0]
    assert flaky_stats["calls"] == 3 + 2 + 20
    assert flaky_stats["errors"] == 4
    assert flaky_stats["dead_lettered"] == 1


async def test_a_hanging_step_is_timed_out_and_isolated(autojump_clock: trio.testing.MockClock) -> None:
    pool = make_pool(handler_timeout_s=0.05, handler_retries=1)

    async def hang(ctx: Ctx, event: Any) -> int | None:
        if event == "stuck":
            await trio.sleep_forever()
        ctx.stamp(str(event))
        return None

    pool.register("ev", "hang", hang)
    stuck_shard = pool.shard_of("k-stuck")
    other_key = next(k for k in (f"k{n}" for n in range(100)) if pool.shard_of(k) != stuck_shard)
    started = trio.current_time()
    async with running(pool):
        await pool.submit("k-stuck", "ev", "stuck")
        await pool.submit("k-stuck", "ev", "same-shard")
        await pool.submit(other_key, "ev", "other-shard")
        await wait_until(lambda: pool.processed == 3)

    assert pool.ctx.rejected == [("stuck", SYSTEM_ERROR)]
    [letter] = pool.dead_letters
    assert letter.error == "timeout"
    stats = pool.statistics()["handlers"]["ev"][0]
    assert (stats["timeouts"], stats["errors"], stats["dead_lettered"]) == (2, 2, 1)
    # Another shard did not wait for the stuck one; the same shard waited for two timeouts, no longer.
    assert pool.ctx.times["other-shard"][0] - started < 0.05
    assert pool.ctx.times["same-shard"][0] - started == pytest.approx(0.1, abs=0.01)


async def test_the_circuit_breaker_bypasses_a_hanging_step_for_its_cooldown_then_calls_it_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The breaker reads trio's clock: its 10 s cooldown costs no real time here."""
    timeout_s = 0.5
    pool = make_pool()
    called: list[Any] = []

    async def hang(ctx: Ctx, event: Any) -> int | None:
        called.append(event)
        await trio.sleep_forever()
        return None

    # As a plugin step is: skipped (the event goes on) when it keeps failing, never retried.
    pool.register("ev", "hang", hang, timeout_s=timeout_s, retries=0, on_error="skip")
    pool.register("ev", "after", recorder("after"))
    started = trio.current_time()
    for i in range(BREAKER_FAILURES):
        assert await pool.dispatch("ev", i) == SUCCESS
    assert trio.current_time() - started == pytest.approx(BREAKER_FAILURES * timeout_s)
    tripped_at = trio.current_time()
    assert pool.chain("ev")[0].open_until == pytest.approx(tripped_at + BREAKER_COOLDOWN_S)

    # Open: bypassed at once, the rest of the chain still runs.
    assert await pool.dispatch("ev", "bypassed") == SUCCESS
    assert trio.current_time() == tripped_at
    assert called == list(range(BREAKER_FAILURES))
    assert pool.ctx.calls[-1] == ("after", "bypassed")
    [stats] = [h for h in pool.statistics()["handlers"]["ev"] if h["name"] == "hang"]
    assert stats["bypassed"] == 1
    assert stats["bypassed_until"] == pytest.approx(tripped_at + BREAKER_COOLDOWN_S)

    # After the cooldown the step is called again (and pays its timeout again).
    await trio.sleep(BREAKER_COOLDOWN_S)
    assert await pool.dispatch("ev", "again") == SUCCESS
    assert called[-1] == "again"
    assert pool.statistics()["handlers"]["ev"][0]["bypassed_until"] is None
    assert len(pool.dead_letters) == BREAKER_FAILURES + 1


# -- observers --------------------------------------------------------------------------------------------


async def test_a_failing_observer_backs_off_then_dead_letters_without_delaying_steps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool(handler_retries=3)

    async def step(ctx: Ctx, event: Any) -> int | None:
        ctx.stamp("step")
        return None

    async def observer(ctx: Ctx, event: Any) -> int | None:
        ctx.stamp(f"observer-{event}")
        raise ValueError("observer down")

    pool.register("ev", "watch", observer, kind="observer")
    pool.register("ev", "step", step)
    started = trio.current_time()
    async with running(pool):
        for n in range(3):
            assert await pool.dispatch("ev", n) == SUCCESS
        # dispatch returned at once: the failing observer is still in its first backoff.
        assert pool.ctx.times["step"] == [started] * 3
        assert len(pool.dead_letters) == 0
        await wait_until(lambda: len(pool.dead_letters) == 3)

    tries = pool.ctx.times["observer-0"]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(tries)]
    assert gaps == [0.05, 0.1, 0.2]  # exponential backoff between the 4 attempts
    assert {letter.handler for letter in pool.dead_letters} == {"watch"}
    assert "observer down" in pool.dead_letters[0].error
    stats = pool.statistics()
    assert stats["rejected"] == 0
    assert stats["handlers"]["ev"][0]["errors"] == 12
    assert stats["handlers"]["ev"][0]["dead_lettered"] == 3


async def test_observer_queue_full_drops_and_counts() -> None:
    # The pool is not running, so nothing drains the observer queue of size 2.
    pool = make_pool(queue_size=2)
    pool.register("ev", "watch", recorder("watch"), kind="observer")
    pool.register("ev", "step", recorder("step"))
    for n in range(5):
        assert await pool.dispatch("ev", n) == SUCCESS
    assert [e for name, e in pool.ctx.calls if name == "step"] == [0, 1, 2, 3, 4]
    stats = pool.statistics()
    assert stats["observer_dropped"] == 3
    assert stats["observer_queue_depth"] == 2


async def test_observers_run_once_the_lane_drains(autojump_clock: trio.testing.MockClock) -> None:
    pool = make_pool()
    pool.register("ev", "watch", recorder("watch"), kind="observer")
    async with running(pool):
        for n in range(10):
            await pool.submit("k", "ev", n)
        await wait_until(lambda: len(pool.ctx.calls) == 10)
    assert pool.ctx.calls == [("watch", n) for n in range(10)]
    assert pool.observer_dropped == 0


# -- shards ----------------------------------------------------------------------------------------------


async def test_per_key_order_is_kept_within_a_shard(autojump_clock: trio.testing.MockClock) -> None:
    pool = make_pool(shards=4, queue_size=8)

    async def slow(ctx: Ctx, event: tuple[str, int]) -> int | None:
        key, n = event
        await trio.sleep(((n * 7 + len(key)) % 5) * 0.001)  # uneven work, so shards finish out of order
        ctx.calls.append(("slow", event))
        return None

    pool.register("ev", "slow", slow)
    keys = [f"user-{k}" for k in range(10)]
    submitted = [(key, n) for n in range(20) for key in keys]
    async with running(pool):
        for key, n in submitted:
            await pool.submit(key, "ev", (key, n))
        await wait_until(lambda: pool.processed == len(submitted))

    done = [event for _, event in pool.ctx.calls]
    assert sorted(done) == sorted(submitted)
    for key in keys:
        assert [n for k, n in done if k == key] == list(range(20)), key
    assert done != submitted  # the shards really ran concurrently
    for key in keys:
        assert pool.shard_of(key) == zlib.crc32(key.encode()) % 4
    assert len({pool.shard_of(key) for key in keys}) > 1


async def test_try_submit_refuses_when_the_shard_is_full() -> None:
    pool = make_pool(shards=1, queue_size=2)
    assert pool.try_submit("k", "ev", 1)
    assert pool.try_submit("k", "ev", 2)
    assert not pool.try_submit("k", "ev", 3)
    assert pool.queue_depths() == [2]
    assert pool.statistics()["queue_depth"] == 2


# -- statistics ----------------------------------------------------------------------------------------


async def test_statistics_count_calls_errors_and_rejects() -> None:
    pool = make_pool(handler_retries=1)
    failed_once: set[Any] = set()

    async def check(ctx: Ctx, event: Any) -> int | None:
        if event == "raise-once" and event not in failed_once:
            failed_once.add(event)
            raise OSError("transient")
        return 4 if event == "reject" else None

    pool.register("ev", "check", check)
    pool.register("ev", "tail", recorder("tail"))
    for event in ["ok", "reject", "raise-once", "ok", "reject"]:
        await pool.dispatch("ev", event)

    stats = pool.statistics()
    assert stats["shards"] == 4
    assert (stats["processed"], stats["rejected"]) == (5, 2)
    assert stats["latency"]["calls"] == 5
    check_stats, tail_stats = stats["handlers"]["ev"]
    assert check_stats["name"] == "check" and check_stats["kind"] == "step"
    assert (check_stats["calls"], check_stats["rejects"], check_stats["errors"]) == (6, 2, 1)
    assert (check_stats["timeouts"], check_stats["dead_lettered"]) == (0, 0)
    assert (tail_stats["calls"], tail_stats["rejects"], tail_stats["errors"]) == (3, 0, 0)
    assert check_stats["p99_ms"] >= 0
    assert pool.ctx.rejected == [("reject", 4), ("reject", 4)]


async def test_a_raising_on_reject_does_not_break_the_pool() -> None:
    pool = make_pool()

    async def bad_answer(ctx: Ctx, event: Any, reason: int) -> None:
        raise RuntimeError("cannot answer")

    async def deny(ctx: Ctx, event: Any) -> int | None:
        return 11

    pool.event_type("strict", on_reject=bad_answer)
    pool.register("strict", "deny", deny)
    assert await pool.dispatch("strict", 1) == 11
    assert await pool.dispatch("strict", 2) == 11
    assert pool.rejected == 2


# -- batch event types -------------------------------------------------------------------------------------


async def run_items(pool: EventPool[Ctx], batch: list[Any]) -> None:
    """A batch runner as the send path's: the item chain on each item, then a note that the batch ended."""
    for item in batch:
        await pool.run_chain("ev", item)
    pool.ctx.calls.append(("batch done", len(batch)))


async def test_a_batch_event_runs_the_item_chain_per_item_in_one_shard_visit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = make_pool(shards=1)
    builtin_calls: list[Any] = []

    async def builtin(ctx: Ctx, event: Any) -> int | None:
        builtin_calls.append(event)
        return 22 if event == "too fast" else None

    pool.register("ev", "builtin", builtin, timeout_s=None, retries=0)
    pool.register("ev", "plugin", recorder("plugin"), on_error="skip")  # a plugin: timed, with a timeout
    pool.register("ev", "watch", recorder("watch"), kind="observer")
    pool.batch_event_type("batch", run_items)
    assert "batch" not in pool.event_types()  # no chain of its own: nothing registers on it
    async with running(pool):
        await pool.submit("k", "batch", ["a", "too fast", "b"])
        await wait_until(lambda: ("batch done", 3) in pool.ctx.calls)
        await wait_until(lambda: pool.chain("ev")[2].stats.calls == 2)
    assert builtin_calls == ["a", "too fast", "b"]
    # The rejected item stops its own chain only, and is answered at once, in order.
    assert [event for name, event in pool.ctx.calls if name == "plugin"] == ["a", "b"]
    assert [event for name, event in pool.ctx.calls if name == "watch"] == ["a", "b"]
    assert pool.ctx.rejected == [("too fast", 22)]
    builtin_handler = pool.chain("ev")[0]
    assert (builtin_handler.stats.calls, builtin_handler.stats.rejects) == (3, 1)
    stats = pool.statistics()
    assert (stats["processed"], stats["rejected"]) == (3, 1)  # items, not batches
    assert stats["latency"]["calls"] == 1  # one shard visit


async def test_a_failing_builtin_step_in_a_batch_is_retried_and_dead_lettered_like_any_step() -> None:
    pool = make_pool()
    attempts: list[Any] = []

    async def flaky(ctx: Ctx, event: Any) -> int | None:
        attempts.append(event)
        if event == "broken" or (event == "once" and attempts.count("once") == 1):
            raise OSError("boom")
        return None

    pool.register("ev", "flaky", flaky, timeout_s=None, retries=1)
    pool.register("ev", "tail", recorder("tail"), timeout_s=None)
    for item in ["once", "broken", "fine"]:
        await pool.run_chain("ev", item)
    assert attempts == ["once", "once", "broken", "broken", "fine"]
    assert [event for _name, event in pool.ctx.calls] == ["once", "fine"]
    assert pool.ctx.rejected == [("broken", SYSTEM_ERROR)]
    flaky_stats = pool.chain("ev")[0].stats
    assert (flaky_stats.calls, flaky_stats.errors, flaky_stats.dead_lettered) == (5, 3, 1)
    assert [d.handler for d in pool.dead_letters] == ["flaky"]


def test_a_batch_event_type_cannot_shadow_a_chain() -> None:
    pool = make_pool()
    with pytest.raises(HandlerError):
        pool.batch_event_type("ev", run_items)
    with pytest.raises(HandlerError):
        make_pool_with_batch().register("batch", "h", recorder("h"))


def make_pool_with_batch() -> EventPool[Ctx]:
    pool = make_pool()
    pool.batch_event_type("batch", run_items)
    return pool
