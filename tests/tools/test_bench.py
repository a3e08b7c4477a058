"""A few-second smoke test of `imnode bench` against a real node process (benchmarks stay out of CI)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.wire.protocol import Reason
from tests.cluster_harness import Cluster, write_cluster_toml
from tests.conftest import REPO

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
    "connect_s",
    "send_s",
    "drain_s",
    "node_cpu_s",
    "node_cpu_us_per_msg",
    "node_cpu_us_per_msg_by_node",
    "bench_cpu_s",
    "bench_cpu_us_per_msg",
}


def _started(config: Path) -> Iterator[Cluster]:
    cluster = Cluster(config)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Cluster]:
    yield from _started(write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1))


@pytest.fixture
def three(tmp_path: Path) -> Iterator[Cluster]:
    yield from _started(write_cluster_toml(tmp_path / "cluster.toml", nodes=3, initial=3))


@pytest.fixture
def rate_limited(tmp_path: Path) -> Iterator[Cluster]:
    tuning = {"send_rate_per_s": 5.0, "send_burst": 5}  # per connection: most of a pipelined run is refused
    yield from _started(write_cluster_toml(tmp_path / "cluster.toml", nodes=1, initial=1, tuning=tuning))


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
    assert stats["peak_rss_mb"] > 10 and stats["cpu_s"] >= stats["run_cpu_s"] > 0
    assert report["rate"] == "200"  # the default: paced, not saturating
    assert report["send_s"] == pytest.approx(1.5, abs=0.3) and report["drain_s"] >= 0
    # CPU per acked message over connect, send and drain: one node, so its own figure is the sum.
    assert report["node_cpu_us_per_msg"] > 0 and report["bench_cpu_us_per_msg"] > 0
    assert report["node_cpu_us_per_msg_by_node"] == {"n1": report["node_cpu_us_per_msg"]}
    assert report["node_cpu_us_per_msg"] == pytest.approx(
        report["node_cpu_s"] / report["acked"] * 1e6, abs=0.1
    )


def test_bench_drives_jsonrpc_light_clients(single: Cluster) -> None:
    """`--protocol jsonrpc`: the same accounting over JSON-RPC on the WebSocket port (several sends in one
    message at --rate max)."""
    flags = ["--clients", "4", "--duration", "1", "--rate", "max", "--window", "8", "--protocol", "jsonrpc"]
    run = single.cli("bench", *flags, "--json", timeout_s=120)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["protocol"] == "jsonrpc" and set(report) >= FIELDS
    assert report["sent"] == report["acked"] == report["delivered"] > 0 and report["errors"] == {}
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert 0 < report["ack_p50_ms"] <= report["ack_p99_ms"] and report["acked_per_s"] > 0


def test_bench_counts_node_cpu_per_message_on_every_node(three: Cluster) -> None:
    run = three.cli("bench", "--clients", "6", "--duration", "1.5", "--json", timeout_s=120)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["acked"] > 0 and report["lost"] == 0
    by_node = report["node_cpu_us_per_msg_by_node"]
    assert set(by_node) == set(report["nodes"]) == {"n1", "n2", "n3"}
    assert all(us > 0 for us in by_node.values())  # every node applies every message
    assert report["node_cpu_us_per_msg"] == pytest.approx(sum(by_node.values()), abs=0.5)
    assert all(stats["run_cpu_s"] > 0 for stats in report["nodes"].values())
    assert report["bench_cpu_us_per_msg"] > 0


def test_bench_stream_mode_reads_every_delta_in_order_without_a_commit_each(single: Cluster) -> None:
    run = single.cli(
        "bench", "--mode", "stream", "--streams", "3", "--deltas-per-s", "20", "--duration", "1", "--json"
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["deltas_posted"] == report["deltas_delivered"] > 30 and report["errors"] == {}
    assert report["lost"] == 0 and report["out_of_order"] == 0
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p99"]
    # Three anchors and three finishes went through Raft; the deltas did not.
    assert report["raft_entries"] < report["deltas_posted"] // 4


def test_bench_table_and_progress(single: Cluster) -> None:
    run = single.cli("bench", "--clients", "2", "--duration", "1", "--rate", "50", timeout_s=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "acked_per_s" in run.stdout and "lost                 0" in run.stdout
    assert "errors               none" in run.stdout
    assert re.search(r"^node n1 +peak RSS .* us per acked message\)$", run.stdout, re.M), run.stdout


BENCH = (sys.executable, "-m", "node.tools.cli", "bench")


def test_bench_progress_into_a_file_is_plain_lines(single: Cluster, tmp_path: Path) -> None:
    """Not a terminal: one line per report, not one line rewritten with \r (issue 21)."""
    progress_file = tmp_path / "progress.txt"
    with progress_file.open("wb") as progress:
        run = subprocess.run(
            [
                *BENCH,
                "--config",
                str(single.config_path),
                "--clients",
                "2",
                "--duration",
                "2",
                "--rate",
                "50",
            ],
            stdout=subprocess.DEVNULL,
            stderr=progress,
            timeout=120,
            cwd=REPO,
        )
    written = progress_file.read_bytes()  # bytes: text mode would turn \r into \n
    assert run.returncode == 0, written
    assert b"\r" not in written, written
    lines = written.decode().splitlines()
    assert all(re.match(r" *[\d.]+s (sending|draining) +sent \d+ +acked ", line) for line in lines), lines
    assert len(lines) >= 2 and "draining" in lines[-1], lines


def test_bench_live_lines_and_summary_share_one_rate(single: Cluster) -> None:
    """The last live line (printed after the drain) shows the summary's acked/s and delivered/s."""
    run = single.cli("bench", "--clients", "4", "--duration", "1.5", "--rate", "max", "--window", "8")
    assert run.returncode == 0, run.stdout + run.stderr
    table = dict(line.split(None, 1) for line in run.stdout.splitlines() if not line.startswith("node "))
    last = run.stderr.replace("\r", "\n").strip().splitlines()[-1]
    live = re.search(r"draining +sent \d+ +acked (\d+) \(([\d,]+)/s\) +delivered (\d+) \(([\d,]+)/s\)", last)
    assert live is not None, run.stderr
    acked, acked_per_s, delivered, delivered_per_s = (int(g.replace(",", "")) for g in live.groups())
    assert (acked, delivered) == (int(table["acked"]), int(table["delivered"]))
    assert (acked_per_s, delivered_per_s) == (int(table["acked_per_s"]), int(table["delivered_per_s"]))
    assert float(table["send_s"]) == pytest.approx(1.5, abs=0.3) and float(table["drain_s"]) >= 0


def test_bench_names_errors_by_reason(rate_limited: Cluster) -> None:
    run = rate_limited.cli(
        "bench", "--clients", "2", "--duration", "1", "--rate", "max", "--window", "4", "--json"
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert set(report["errors"]) == {Reason.RATE_LIMIT.name}, report["errors"]
    assert report["sent"] == report["acked"] + report["errors"]["RATE_LIMIT"]


def test_bench_help_says_how_to_measure_throughput() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "node.tools.cli", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    text = " ".join(run.stdout.split())
    assert "default 200" in text and "'max' for throughput" in text and "`--rate max`" in text
    assert "from the first send to the last" in text  # the one definition of the rates
    assert "--clients CLIENTS client connections, spread over the members (default 10" in text


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


def test_the_work_floor_measures_every_step_of_a_person_message() -> None:
    from node.tools import floor

    figures = floor.measure(rounds=3, per_entry=4)
    assert {
        "SEND frames decoded",
        "apply on 3 nodes (one txn per entry)",
        "RECV encrypted, signed, encoded",
    } <= set(figures)
    assert all(us > 0 for us in figures.values()), figures


def test_bench_counts_python_calls_per_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "counting").mkdir()
    plain = Cluster(write_cluster_toml(tmp_path / "plain" / "cluster.toml", nodes=1, initial=1))
    try:
        plain.start_all()
        refused = plain.cli("bench", "--clients", "2", "--duration", "0.5", "--count-calls", timeout_s=120)
        assert refused.returncode != 0 and "IMNODE_COUNT_CALLS=1" in refused.stderr
    finally:
        plain.stop_all()
    monkeypatch.setenv("IMNODE_COUNT_CALLS", "1")  # the node process inherits it
    counting = Cluster(write_cluster_toml(tmp_path / "counting" / "cluster.toml", nodes=1, initial=1))
    try:
        counting.start_all()
        run = counting.cli(
            "bench", "--clients", "2", "--senders", "1", "--window", "1", "--rate", "50", "--duration", "1",
            "--count-calls", "--json", timeout_s=120,
        )  # fmt: skip
    finally:
        counting.stop_all()
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["acked"] > 0 and report["lost"] == 0
    # A message is decoded, pooled, committed and pushed in Python: hundreds of calls at least.
    assert report["node_calls_per_msg"] > 100
    assert report["node_calls_per_msg_by_node"] == {"n1": report["node_calls_per_msg"]}
    by_thread = report["node_calls_per_msg_by_thread"]
    assert by_thread["MainThread"] > 100  # trio's thread
    assert sum(by_thread.values()) == pytest.approx(report["node_calls_per_msg"], abs=len(by_thread))
