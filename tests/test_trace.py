"""node/trace.py: the sampled per-stage latency trace, unit by unit and through a real node."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.client import open_client
from node.config import ConfigError, load
from node.trace import DELIVER_STAGES, SEND_STAGES, Tracer
from tests.conftest import http_json, running_node, single_node_config


def test_every_nth_message_is_traced_and_stage_times_add_up() -> None:
    tracer = Tracer(every=3)
    started = [tracer.start("send", at=10.0) for _ in range(9)]
    traces = [t for t in started if t is not None]
    assert len(traces) == 3 and started[2] is traces[0]
    for trace in traces:
        trace.mark("decode", 10.001)
        trace.mark("user_pool_wait", 10.004)
        trace.mark("user_pool", 10.003)  # a stamp from another clock reading never goes backwards
        trace.finish("sendack_write")
    summary = tracer.summary()["send"]
    assert summary["stages"]["decode"] == {"count": 3, "p50_ms": 1.0, "p99_ms": 1.0}
    assert summary["stages"]["user_pool_wait"]["p50_ms"] == 3.0
    assert summary["stages"]["user_pool"]["p50_ms"] == 0.0
    assert summary["total"]["count"] == 3
    assert Tracer(every=0).start("send") is None  # 0: off


def test_trace_sample_every_may_be_zero_but_not_negative(tmp_path: Path) -> None:
    base = '[nodes.n1]\nnumeric_id = 1\nraft = "127.0.0.1:5301"\ntcp = "127.0.0.1:5101"\n'
    base += 'ws = "127.0.0.1:5201"\nhttp = "127.0.0.1:5001"\ndata_dir = "d"\n'
    path = tmp_path / "c.toml"
    path.write_text(base + "[tuning]\ntrace_sample_every = 0\n")
    assert load(str(path)).tuning.trace_sample_every == 0
    path.write_text(base + "[tuning]\ntrace_sample_every = -1\n")
    with pytest.raises(ConfigError, match=r"tuning\.trace_sample_every: must be positive"):
        load(str(path))


async def test_a_node_traces_every_stage_of_sampled_sends_and_deliveries(tmp_path: Path) -> None:
    config = single_node_config(tmp_path / "n1", trace_sample_every=2)
    async with running_node(config) as node:
        async with open_client(*node.tcp, "alice") as alice, open_client(*node.tcp, "bob") as bob:
            for i in range(10):
                assert (await alice.send("bob", 1, f"m{i}".encode())).reason_code == 1
                assert (await bob.recv()).payload == f"m{i}".encode()
        status, report = await http_json(node.http, "GET", "/admin/trace")
    assert status == 200 and report["sample_every"] == 2
    send, deliver = report["send"], report["deliver"]
    assert send["total"]["count"] == deliver["total"]["count"] == 5  # every second of ten
    for part, stages in ((send, SEND_STAGES), (deliver, DELIVER_STAGES)):
        assert list(part["stages"]) == list(stages)
        for stage in stages:  # every stage was marked on every finished trace
            assert part["stages"][stage]["count"] == part["total"]["count"], stage
        assert part["total"]["p50_ms"] > 0
        assert part["total"]["p99_ms"] >= part["total"]["p50_ms"]
    # Raft's stages were stamped on the tick thread: a commit takes time, an apply too.
    assert send["stages"]["raft_commit"]["p50_ms"] > 0 and send["stages"]["apply"]["p50_ms"] > 0
