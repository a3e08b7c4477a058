"""A small Prometheus registry: counters that code increments, and gauges read when /metrics is scraped.

Also the one percentile every report uses (handler p99s, `imnode bench` latencies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]
Sample = tuple[dict[str, str], float]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (`fraction` 0.99 for p99) of unsorted values; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(len(ordered) * fraction) - 1)]


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format(name: str, labels: Labels, value: float) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    number = repr(float(value)) if not float(value).is_integer() else str(int(value))
    return f"{name}{{{text}}} {number}" if text else f"{name} {number}"


@dataclass
class Counter:
    name: str
    help: str
    max_series: int = 10_000
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, labels: dict[str, str] | None = None, amount: float = 1.0) -> None:
        key = _labels(labels)
        if key not in self.values and len(self.values) >= self.max_series:
            key = (("overflow", "true"),)  # bounded: a label explosion folds into one series
        self.values[key] = self.values.get(key, 0.0) + amount


@dataclass
class Gauges:
    name: str
    help: str
    kind: str
    read: Callable[[], Iterable[Sample]]


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauges] = {}

    def counter(self, name: str, help_text: str, *, max_series: int = 10_000) -> Counter:
        """The counter called `name` (created on first use, so plugins can share one)."""
        if name not in self._counters:
            self._counters[name] = Counter(name, help_text, max_series)
        return self._counters[name]

    def gauge(
        self, name: str, help_text: str, read: Callable[[], Iterable[Sample]], *, kind: str = "gauge"
    ) -> None:
        """A series read at scrape time (`kind="counter"` for totals kept elsewhere)."""
        self._gauges[name] = Gauges(name, help_text, kind, read)

    def render(self) -> str:
        lines: list[str] = []
        for counter in self._counters.values():
            lines += [f"# HELP {counter.name} {counter.help}", f"# TYPE {counter.name} counter"]
            lines += [
                _format(counter.name, labels, value) for labels, value in sorted(counter.values.items())
            ]
        for gauge in self._gauges.values():
            lines += [f"# HELP {gauge.name} {gauge.help}", f"# TYPE {gauge.name} {gauge.kind}"]
            lines += [_format(gauge.name, _labels(labels), value) for labels, value in gauge.read()]
        return "\n".join(lines) + "\n"
