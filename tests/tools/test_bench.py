"""A few-second smoke test of `imnode bench` against a real node process (benchmarks stay out of CI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_harness import Cluster, write_cluster_toml

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

FIELDS = {
    "sent",
    "acked",
    "acked_per_s",
    "delivered",
    "delivered_per_s",
    "ack_p50_ms",
    "ack_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "errors",
    "lost",
    "duplicates",
    "nodes",
}


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1))
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.mark.parametrize("mode", ["person", "group"])
def test_bench_accounts_for_every_message(single: Cluster, mode: str) -> None:
    run = single.cli(
        "bench",
        "--clients",
        "4",
        "--duration",
        "1.5",
        "--mode",
        mode,
        "--group-size",
        "4",
        "--window",
        "8",
        "--json",
        timeout_s=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert set(report) >= FIELDS
    assert report["sent"] == report["acked"] > 0 and report["errors"] == {}
    recipients = 1 if mode == "person" else 3
    assert report["delivered"] == report["acked"] * recipients
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert 0 < report["ack_p50_ms"] <= report["ack_p99_ms"]
    stats = report["nodes"]["n1"]
    assert stats["peak_rss_mb"] > 10 and stats["cpu_s"] > 0


def test_bench_table_and_progress(single: Cluster) -> None:
    run = single.cli("bench", "--clients", "2", "--duration", "1", "--rate", "50", timeout_s=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "acked_per_s" in run.stdout and "lost             0" in run.stdout
    assert "sent" in run.stderr  # the live progress line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clients", "1"], "--clients must be at least 2"),
        (["--rate", "fast"], "--rate must be a positive number"),
        (["--duration", "0"], "--duration > 0"),
    ],
)
def test_bench_refuses_bad_flags(single: Cluster, flags: list[str], message: str) -> None:
    run = single.cli("bench", *flags)
    assert run.returncode == 1 and message in run.stderr
