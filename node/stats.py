"""A short history of a node's rates, sampled once a second from counters the node already keeps.

The console's live charts read it (`GET /admin/stats`). Nothing here runs per message: each sample reads a
few totals (SENDACKs, RECVs, commits), the Raft indexes, the process CPU clock, and the whole-path times of
the send traces the tracer finished since the last sample (node/trace.py samples every
`trace_sample_every`-th message anyway), so an open console costs the send path nothing.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.metrics import percentile
from node.trace import Tracer

KEEP_SAMPLES = 300  # five minutes at one sample a second


@dataclass(frozen=True)
class Totals:
    """What one sample reads: counters that only grow, and the Raft indexes."""

    acked: int
    delivered: int
    committed: int
    commit_index: int
    applied_index: int
    connections: int


class StatsHistory:
    """The last `keep` samples; `sample()` is called by the node's stats loop once a second."""

    def __init__(self, read: Callable[[], Totals], tracer: Tracer, keep: int = KEEP_SAMPLES) -> None:
        self._read = read
        self._tracer = tracer
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._last: tuple[float, float, Totals, int] | None = None

    def sample(self) -> dict[str, Any] | None:
        """Take one sample; None for the first call (a rate needs two readings)."""
        now, cpu, totals = time.time(), time.process_time(), self._read()
        traced = self._tracer.finished_of["send"]
        last, self._last = self._last, (now, cpu, totals, traced)
        if last is None:
            return None
        then, cpu_then, before, traced_before = last
        elapsed = max(now - then, 1e-3)
        # The send traces finished since the last sample: send → SENDACK written, on this node.
        latencies = self._tracer.latest_totals("send", traced - traced_before)
        row: dict[str, Any] = {
            "t": round(now, 3),
            "sends_per_s": round((totals.acked - before.acked) / elapsed, 1),
            "deliveries_per_s": round((totals.delivered - before.delivered) / elapsed, 1),
            "commits_per_s": round((totals.committed - before.committed) / elapsed, 1),
            "ack_p50_ms": round(percentile(latencies, 0.50) * 1000, 3) if latencies else None,
            "ack_p99_ms": round(percentile(latencies, 0.99) * 1000, 3) if latencies else None,
            "traced": len(latencies),
            "lag": max(0, totals.commit_index - totals.applied_index),
            "commit_index": totals.commit_index,
            "applied_index": totals.applied_index,
            "connections": totals.connections,
            "cpu_percent": round(100 * (cpu - cpu_then) / elapsed, 1),
        }
        self.samples.append(row)
        return row

    def since(self, t: float) -> list[dict[str, Any]]:
        """The samples taken after unix time `t` (0: all kept)."""
        return [row for row in self.samples if row["t"] > t]
