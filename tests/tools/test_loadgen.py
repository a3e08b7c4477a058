"""The load generator's bookkeeping, now done per SENDACK and per RECV in the client's reader (no task per
message): what counts as acked, delivered, duplicated, timed out or failed. End to end in test_bench.py."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from node.tools.loadgen import SENDACK_TIMEOUT_S, Bench, make_payload
from node.wire.protocol import Reason, Recv, Sendack
from tests.conftest import single_node_config


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    args = argparse.Namespace(
        clients=4, senders=0, mode="person", group_size=4, window=8, payload=200, rate="max", write_each=False
    )
    return Bench(single_node_config(tmp_path), args)


def recv(bench: Bench, sender: int, counter: int, message_id: int, seq: int) -> Recv:
    payload = make_payload(bench.run_id, sender, counter, 200)
    return Recv(0, "", bench.uid(sender), bench.uid(sender + 1), 1, "cmn", message_id, seq, 0, payload)


def test_deliveries_duplicates_and_strangers(bench: Bench) -> None:
    bench.on_recv(1, recv(bench, 0, 1, message_id=10, seq=1))
    bench.on_recv(1, recv(bench, 0, 1, message_id=10, seq=1))  # a resend of the same message: not a duplicate
    bench.on_recv(1, recv(bench, 0, 1, message_id=11, seq=2))  # the same send under another id: a duplicate
    bench.on_recv(1, recv(bench, 0, 2, message_id=12, seq=3))
    other_run = json.dumps({"b": "other", "s": 0, "n": 3, "t": time.time_ns()}).encode()
    bench.on_recv(1, Recv(0, "", "x", "y", 1, "cmn", 13, 4, 0, other_run))
    bench.on_recv(1, Recv(0, "", "x", "y", 1, "cmn", 14, 5, 0, b"not json"))
    tally = bench.tally
    assert (tally.delivered, tally.duplicates, len(tally.e2e_ms)) == (2, 1, 2)
    assert set(tally.seen) == {(1, 0, 1), (1, 0, 2)}


def test_sendacks_count_once_by_reason_and_fill_what_is_expected(bench: Bench) -> None:
    sender = bench.senders[0]
    started = time.perf_counter()
    sender.in_flight.update({1: (1, started), 2: (2, started), 3: (3, started)})
    sender.on_sendack(Sendack(100, 1, 1, Reason.SUCCESS))
    sender.on_sendack(Sendack(101, 2, 2, Reason.RATE_LIMIT))
    sender.on_sendack(Sendack(100, 1, 1, Reason.SUCCESS))  # a SENDACK for nothing in flight is ignored
    assert sender.room.is_set()
    tally = bench.tally
    assert (tally.acked, dict(tally.errors), len(tally.ack_ms)) == (1, {"RATE_LIMIT": 1}, 1)
    assert tally.expected == {(0, 1): {1}}  # person mode: client 0 sends to client 1
    assert list(sender.in_flight) == [3]
    # Nothing missing until client 1 has it.
    assert bench._missing() == 1
    bench.on_recv(1, recv(bench, 0, 1, message_id=100, seq=1))
    assert bench._missing() == 0


def test_unanswered_sends_time_out_oldest_first_and_late_acks_are_ignored(bench: Bench) -> None:
    sender = bench.senders[0]
    now = time.perf_counter()
    sender.in_flight.update({1: (1, now - SENDACK_TIMEOUT_S - 1), 2: (2, now - 1), 3: (3, now)})
    assert sender.expire(now) == pytest.approx(now - 1 + SENDACK_TIMEOUT_S)
    assert dict(bench.tally.errors) == {"sendack_timeout": 1} and list(sender.in_flight) == [2, 3]
    sender.on_sendack(Sendack(100, 1, 1, Reason.SUCCESS))  # too late: already counted as a timeout
    assert bench.tally.acked == 0
    sender.fail_all("sender_disconnected")
    assert dict(bench.tally.errors) == {"sendack_timeout": 1, "sender_disconnected": 2}
    assert sender.in_flight == {} and sender.expire(now) is None
