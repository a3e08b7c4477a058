"""The Python call counter behind `imnode bench --count-calls` (node/calls.py), in a process of its own:
installing a profile hook inside pytest's would count pytest."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

PROGRAM = textwrap.dedent(
    """
    import json, threading
    from node import calls

    def f():
        return 1

    def loop(n):
        for _ in range(n):
            f()

    assert not calls.installed()
    calls.install()
    start = calls.total()
    loop(1000)
    in_main = calls.total() - start
    worker = threading.Thread(target=loop, args=(3000,), name="worker-7")
    worker.start()
    worker.join()
    print(json.dumps({"main": in_main, "all": calls.total() - start, "by_thread": calls.by_thread()}))
    """
)


def test_counts_python_calls_in_every_thread_exactly() -> None:
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, cwd=REPO, check=True
    )
    counted = json.loads(run.stdout)
    # loop() and its 1000 calls of f(), plus calls.total() itself and its generator: every call, not a sample.
    assert 1001 < counted["main"] <= 1010
    # The thread's own 3000 + loop + threading's bootstrap calls; the main thread's start/join on top.
    assert 3001 < counted["all"] - counted["main"] < 3100
    assert counted["by_thread"]["worker-N"] >= 3001
    assert counted["by_thread"]["MainThread"] >= 1002
