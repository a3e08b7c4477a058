"""The C allocator's setting for a long-running node: large freed buffers go back to the system.

glibc serves an allocation above its mmap threshold (128 KiB at start) with a mapping of its own, unmapped
when freed; but the first such free raises the threshold to that size (up to 32 MiB), and from then on
buffers of that size come from the heap, whose freed memory stays with the process unless it is at the top.
A node's large buffers are client frames (a RECV of a large message, copied per connection and kept for
resending), so after one burst of them to many connections the node kept hundreds of MB it no longer used
(issue 19: 465 MB after every connection closed). A fixed threshold keeps every large buffer on its own
mapping: memory follows what the node holds. Small allocations, the hot path's, are not affected.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Final

log = logging.getLogger("imnode.memory")

M_MMAP_THRESHOLD: Final = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES: Final = 128 << 10  # glibc's own starting value, kept fixed


def map_large_buffers() -> bool:
    """Fix glibc's mmap threshold (once per process); False where that cannot be done (not glibc) or the
    operator set MALLOC_MMAP_THRESHOLD_ (theirs wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.info("mallopt(M_MMAP_THRESHOLD) refused: freed large buffers may stay with the process")
        return False
    return True
