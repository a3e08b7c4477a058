"""A sampled per-stage latency trace of the send path: where the milliseconds of one message go.

Every `every`-th SEND a node decodes carries a `Trace`; each part of the path marks the end of its stage
as the message passes (the time spent since the previous mark is that stage's). Two kinds of trace:
- **send**: from the decoded SEND to its SENDACK handed to the socket, on the node the client is on;
- **deliver**: from a committed message's apply to its first RECV handed to a socket, on every node.
Stage times of the last `keep` traces of each kind are kept, and `summary()` gives p50/p99 per stage
(`GET /admin/trace`, `imnode admin trace`). Untraced messages pay one counter step at the gateway and a
`None` check where a mark would go.

Times are `time.perf_counter()`, which is one clock for every thread of the process: PySyncObj's tick
thread stamps the commit and the apply.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from node.metrics import percentile

# The stages in path order; a mark names the stage that just ended.
SEND_STAGES = (
    "decode",  # the read that completed the frame → decoded into a SEND
    "user_pool_wait",  # → the user pool's shard took it
    "user_pool",  # decrypt, msg_key, rate limit → handed to the channel pool
    "channel_pool_wait",  # → the channel pool's shard took it
    "channel_pool",  # permission, op built → queued for the proposer
    "proposal_wait",  # behind the channel's batch in flight and the proposer's window
    "raft_commit",  # entry handed to PySyncObj → committed and its apply began on this node
    "apply",  # the LMDB transaction of the whole entry
    "back_to_trio",  # apply done → the result is back in the proposer's task
    "completion",  # → the SENDACK is queued on the connection
    "sendack_write",  # → the writer handed it to the socket
)
DELIVER_STAGES = (
    "to_trio",  # apply done → the committed stream took the entry
    "distribute_wait",  # → the committed stream began distributing the entry's messages
    "distribute",  # recipients found → grouped per pusher shard (then handed over, with the entry's others)
    "push_wait",  # → the pusher pool's shard took it
    "push",  # encrypted and queued for the first recipient connection
    "recv_write",  # → the writer handed the RECV to the socket
)


@dataclass(slots=True)
class Trace:
    kind: str  # "send" or "deliver"
    last: float  # the time of the previous mark
    tracer: Tracer
    stages: list[tuple[str, float]] = field(default_factory=list)
    claimed: bool = False  # a delivery's trace is followed by the first of its pushes that writes a RECV

    def mark(self, stage: str, at: float | None = None) -> None:
        """End `stage` now (or at `at`, a perf_counter time stamped elsewhere, e.g. on the tick thread)."""
        now = time.perf_counter() if at is None else at
        self.stages.append((stage, max(0.0, now - self.last)))
        self.last = max(self.last, now)

    def finish(self, stage: str) -> None:
        """End the last stage: the trace is complete."""
        self.mark(stage)
        self.tracer.finish(self)


class Tracer:
    """Starts a trace for every `every`-th message (0: never) and keeps the finished ones' stage times."""

    def __init__(self, every: int, keep: int = 1000) -> None:
        self.every = every
        self._counts = {"send": 0, "deliver": 0}
        self._times: dict[str, dict[str, collections.deque[float]]] = {
            kind: {stage: collections.deque(maxlen=keep) for stage in stages}
            for kind, stages in (("send", SEND_STAGES), ("deliver", DELIVER_STAGES))
        }
        self._totals: dict[str, collections.deque[float]] = {
            kind: collections.deque(maxlen=keep) for kind in self._times
        }
        self.finished = 0
        self.finished_of = {kind: 0 for kind in self._times}

    def start(self, kind: str, at: float | None = None) -> Trace | None:
        if not self.every:
            return None
        count = self._counts[kind] + 1
        if count < self.every:
            self._counts[kind] = count
            return None
        self._counts[kind] = 0
        return Trace(kind, time.perf_counter() if at is None else at, self)

    def finish(self, trace: Trace) -> None:
        times = self._times[trace.kind]
        for stage, seconds in trace.stages:
            if stage in times:
                times[stage].append(seconds)
        self._totals[trace.kind].append(sum(seconds for _stage, seconds in trace.stages))
        self.finished += 1
        self.finished_of[trace.kind] += 1

    def latest_totals(self, kind: str, count: int) -> list[float]:
        """The whole-path seconds of the last `count` finished traces of `kind` (fewer if not kept)."""
        totals = self._totals[kind]
        count = min(count, len(totals))
        return [totals[i] for i in range(len(totals) - count, len(totals))]

    def summary(self) -> dict[str, Any]:
        """Per kind and stage: traces seen, p50 and p99 in ms (stages in path order)."""

        def row(values: collections.deque[float]) -> dict[str, Any]:
            return {
                "count": len(values),
                "p50_ms": round(percentile(values, 0.50) * 1000, 3),
                "p99_ms": round(percentile(values, 0.99) * 1000, 3),
            }

        return {
            "sample_every": self.every,
            **{
                kind: {
                    "stages": {stage: row(values) for stage, values in stages.items()},
                    "total": row(self._totals[kind]),
                }
                for kind, stages in self._times.items()
            },
        }
