"""A small Prometheus registry: counters that code increments, and gauges read when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Labels = tuple[tuple[str, str], ...]
Sample = tuple[dict[str, str], float]


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


def register_node_metrics(node: Any) -> None:
    """The node's own series: connections, Raft, messages, pools, handlers, HTTP."""
    m = node.metrics

    def one(value: float) -> list[Sample]:
        return [({}, value)]

    m.gauge("imnode_connections", "Client connections on this node", lambda: one(len(node.registry)))
    m.gauge(
        "imnode_online_users",
        "Users with a connection on this node",
        lambda: one(node.registry.online_users()),
    )

    def raft_series(key: str) -> Callable[[], list[Sample]]:
        return lambda: one(float(node.raft.status().get(key) or 0))

    m.gauge("imnode_raft_term", "Current Raft term", raft_series("term"))
    m.gauge("imnode_raft_commit_index", "Raft commit index", raft_series("commit_index"))
    m.gauge("imnode_raft_applied_index", "Raft last applied index", raft_series("applied_index"))
    m.gauge(
        "imnode_raft_is_leader",
        "1 on the leader",
        lambda: one(1.0 if node.raft.status()["role"] == "leader" else 0.0),
    )
    for name, text, read in (
        (
            "imnode_messages_committed_total",
            "Messages committed (applied here)",
            lambda: node.committed_messages,
        ),
        ("imnode_messages_acked_total", "SENDACKs written by this node", lambda: node.channel_ctx.acked),
        ("imnode_messages_delivered_total", "RECVs written by this node", lambda: node.push_ctx.delivered),
        ("imnode_messages_resent_total", "RECVs resent with DUP", lambda: node.push_ctx.resent),
        (
            "imnode_offline_notices_total",
            "Recipients offline cluster-wide",
            lambda: node.push_ctx.offline_notices,
        ),
        (
            "imnode_raft_entries_total",
            "Raft entries this node proposed",
            lambda: node.proposer.entries,
        ),
        ("imnode_http_requests_total", "HTTP API requests", lambda: node.http.requests),
        ("imnode_http_errors_total", "HTTP API requests answered with an error", lambda: node.http.errors),
    ):
        m.gauge(name, text, (lambda read=read: one(float(read()))), kind="counter")

    def pool_series(attr: str) -> Callable[[], list[Sample]]:
        def read() -> list[Sample]:
            return [({"pool": name}, float(getattr(pool, attr))) for name, pool in node.pools.items()]

        return read

    m.gauge(
        "imnode_pool_queue_depth",
        "Events waiting in a pool's shards",
        lambda: [({"pool": name}, float(sum(pool.queue_depths()))) for name, pool in node.pools.items()],
    )
    m.gauge("imnode_pool_processed_total", "Events a pool handled", pool_series("processed"), kind="counter")
    m.gauge(
        "imnode_pool_rejected_total",
        "Events a pool's chain rejected",
        pool_series("rejected"),
        kind="counter",
    )
    m.gauge(
        "imnode_pool_dead_letters",
        "Events dead-lettered by failing handlers (kept, bounded)",
        lambda: [({"pool": name}, float(len(pool.dead_letters))) for name, pool in node.pools.items()],
    )

    def handler_series(attr: str) -> Callable[[], list[Sample]]:
        def read() -> list[Sample]:
            samples: list[Sample] = []
            for pool_name, pool in node.pools.items():
                for event in sorted(pool.event_types()):
                    for h in pool.chain(event):
                        labels = {"pool": pool_name, "event": event, "handler": h.name}
                        samples.append((labels, float(getattr(h.stats, attr))))
            return samples

        return read

    def webhook_series(attr: str) -> Callable[[], list[Sample]]:
        return lambda: [
            ({"stream": name}, float(getattr(state, attr))) for name, state in node.webhooks.streams.items()
        ]

    m.gauge(
        "imnode_webhook_delivered_total",
        "Webhook events delivered (HTTP 200)",
        webhook_series("delivered"),
        kind="counter",
    )
    m.gauge(
        "imnode_webhook_dead_lettered_total",
        "Webhook events moved to dead letters",
        webhook_series("dead_lettered"),
        kind="counter",
    )
    m.gauge("imnode_webhook_failures", "Failed attempts in a row on a stream", webhook_series("failures"))

    def webhook_backlog() -> list[Sample]:
        from raft import outbox

        with node.store.read() as txn:
            return [
                ({"stream": s}, float(outbox.head(txn, s) - outbox.cursor(txn, s))) for s in outbox.STREAMS
            ]

    m.gauge("imnode_webhook_backlog", "Webhook events waiting in the replicated outbox", webhook_backlog)
    m.gauge("imnode_handler_calls_total", "Handler calls", handler_series("calls"), kind="counter")
    m.gauge(
        "imnode_handler_errors_total", "Handler calls that raised", handler_series("errors"), kind="counter"
    )
    m.gauge(
        "imnode_handler_rejects_total", "Events a handler rejected", handler_series("rejects"), kind="counter"
    )
