"""The bounded chaos run of CI: a real 3-node cluster under seeded faults, checked by tests.chaos.checker.

Longer runs with any seed: `python -m tests.chaos.harness --duration 600 --seed S` (README, "Chaos").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.chaos import checker
from tests.chaos.harness import run_chaos

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.mark.parametrize("seed", [11, 23])
async def test_no_acknowledged_message_is_lost_duplicated_or_reordered_under_faults(
    tmp_path: Path, seed: int
) -> None:
    history = tmp_path / "history.jsonl"
    with trio.fail_after(300):
        await run_chaos(tmp_path, seed=seed, duration_s=25, history_path=history, min_faults=4)
    report = checker.check(checker.load(history))
    print(report.summary())
    faults = [
        e
        for e in checker.load(history)
        if e["type"] == "fault" and e["kind"] not in ("restart", "sigcont", "heal", "proxy")
    ]
    assert len(faults) >= 5  # the run did inject faults (verify is one of them)
    assert report.acked > 500
    assert report.ok, report.summary()
