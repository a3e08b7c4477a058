"""Ctrl-C stops the test run at once: no test swallows the runner's SIGINT, and child nodes are stopped.

A child pytest runs tests/interrupt_sample.py (a real node held by a fixture, a trio test waiting in a
nursery) and gets SIGINT, as a terminal's Ctrl-C sends it to the whole foreground process group, or as
`kill -INT` sends it to pytest alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO

STOP_WITHIN_S = 20.0  # pytest's own teardown: the node gets SIGTERM, then SIGKILL after 10 s
READY_WITHIN_S = 60.0  # a pytest start, plus a node start, on a busy 2-core machine

# SIGINT may be ignored when the suite itself runs as a background job (the shell ignores it there, and
# children inherit that): the child pytest puts Python's default handler back first, as a terminal has it.
BOOTSTRAP = (
    "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as gone: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["process_group", "pytest_only"])
def test_ctrl_c_stops_pytest_and_its_nodes(tmp_path: Path, target: str) -> None:
    signals = tmp_path / "signals"
    signals.mkdir()
    output = tmp_path / "pytest.out"
    with output.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, "-p", "no:cacheprovider", "-q", "tests/interrupt_sample.py"],
            cwd=REPO,
            env={**os.environ, "IMNODE_INTERRUPT_DIR": str(signals)},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,  # its own group, so a group-wide SIGINT reaches it and its nodes, not us
        )
    try:
        _wait_until(
            lambda: (signals / "ready").exists() or child.poll() is not None,
            READY_WITHIN_S,
            "the sample test did not start",
        )
        assert child.poll() is None, output.read_text()
        node_pid = int((signals / "node.pid").read_text())
        assert not _gone(node_pid)

        interrupted = time.monotonic()
        if target == "process_group":
            os.killpg(child.pid, signal.SIGINT)
        else:
            child.send_signal(signal.SIGINT)
        code = child.wait(timeout=STOP_WITHIN_S)
        stopped_s = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)

    text = output.read_text(errors="replace")
    assert code == pytest.ExitCode.INTERRUPTED, text
    assert "KeyboardInterrupt" in text, text
    assert not (signals / "second-ran").exists(), text
    assert stopped_s < STOP_WITHIN_S
    _wait_until(lambda: _gone(node_pid), 10.0, f"node {node_pid} still runs after pytest stopped")
