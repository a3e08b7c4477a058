"""Cluster-unique 64-bit message ids (snowflake: milliseconds, node id, sequence)."""

from __future__ import annotations

import time

EPOCH_MS = 1_704_067_200_000  # 2024-01-01: leaves 41 bits of milliseconds for ~69 years
NODE_BITS = 10
SEQ_BITS = 12


class Snowflake:
    """Ids that grow with time and never repeat within one node; the node id keeps nodes apart."""

    def __init__(self, node_id: int) -> None:
        if not 0 <= node_id < 1 << NODE_BITS:
            raise ValueError(f"node id must be in [0, {1 << NODE_BITS})")
        self.node_id = node_id
        self._last_ms = 0
        self._seq = 0

    def next(self) -> int:
        now_ms = max(int(time.time() * 1000) - EPOCH_MS, self._last_ms)
        if now_ms == self._last_ms:
            self._seq += 1
            if self._seq >= 1 << SEQ_BITS:
                # Borrow from the next millisecond rather than wait: ids stay unique and increasing.
                now_ms += 1
                self._seq = 0
        else:
            self._seq = 0
        self._last_ms = now_ms
        return (now_ms << (NODE_BITS + SEQ_BITS)) | (self.node_id << SEQ_BITS) | self._seq
