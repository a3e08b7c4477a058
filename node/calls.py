"""Counting the Python function calls a node makes, for a figure of calls per message without timing noise.

`imnode node start` installs the counter when `IMNODE_COUNT_CALLS=1` is set (it slows the node several
times over, so it is never on by default) and `/admin/status` then reports `python_calls`; `imnode bench
--count-calls` reads it before and after a run. Only Python function calls are counted (the profiler's
"call" events, generators and coroutines resumed included), not calls into C.

Each thread counts into its own cell, written only by that thread, so no count is lost between threads
and the hook stays a few bytecodes long. Threads started through `threading` after `install()` count too
(trio's worker threads and PySyncObj's tick thread are), the thread calling `install()` from then on.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from types import FrameType
from typing import Any

ENV_VAR = "IMNODE_COUNT_CALLS"

_cells: list[tuple[str, list[int]]] = []  # (thread name, [count]) per thread that ran with the counter on
_cells_lock = threading.Lock()


def requested() -> bool:
    """Whether the environment asks for the counter (`IMNODE_COUNT_CALLS=1`)."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def _counting_hook() -> Any:
    cell = [0]
    with _cells_lock:
        _cells.append((threading.current_thread().name, cell))

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            cell[0] += 1

    return hook


def _first_call_in_thread(frame: FrameType, event: str, arg: Any) -> None:
    # threading.setprofile gives every new thread this function; its first event swaps in a hook with a
    # cell of the thread's own.
    hook = _counting_hook()
    sys.setprofile(hook)
    hook(frame, event, arg)


def install() -> None:
    """Count from now on in this thread and in every thread started after this."""
    threading.setprofile(_first_call_in_thread)
    sys.setprofile(_counting_hook())


def installed() -> bool:
    return bool(_cells)


def total() -> int:
    """Python calls counted so far over all threads (exact once each thread is between calls)."""
    with _cells_lock:
        return sum(cell[0] for _name, cell in _cells)


def by_thread() -> dict[str, int]:
    """Python calls counted so far per kind of thread: its name with numbers as N (so trio's workers sum)."""
    counts: dict[str, int] = {}
    with _cells_lock:
        for name, cell in _cells:
            kind = re.sub(r"\d+", "N", name)
            counts[kind] = counts.get(kind, 0) + cell[0]
    return counts
