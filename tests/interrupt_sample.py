"""A slow test file for tests/test_interrupt.py, which runs it in a child pytest and presses Ctrl-C.

Not part of the suite (no `test_` prefix, so never collected): the child pytest names it on its command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from tests.conftest import NodeProcess


def _signals() -> Path:
    return Path(os.environ["IMNODE_INTERRUPT_DIR"])


async def test_waits_holding_a_node(node_process: tuple[NodeProcess, dict[str, int]]) -> None:
    proc, _ports = node_process
    proc.start()
    assert proc.proc is not None
    # A nursery between the test and trio's KeyboardInterrupt is what turned Ctrl-C into a test failure.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 120)
        # The pid first, then `ready`: the parent reads the pid once it sees `ready`.
        (_signals() / "node.pid").write_text(str(proc.proc.pid))
        (_signals() / "ready").write_text("")


def test_runs_only_if_the_interrupt_was_swallowed() -> None:
    (_signals() / "second-ran").write_text("")
