"""raft/outbox.py: the replicated dead letters stay within their cap, per stream, the same on every node."""

from __future__ import annotations

from pathlib import Path

from raft import commands as c
from raft import outbox
from storage.store import Store
from tests.raft.test_apply import apply, person_send


def letters(store: Store) -> tuple[list[int], int, int]:
    """(seqs of notify dead letters, kept count, dropped count)."""
    with store.read() as txn:
        seqs = [seq for stream, seq, _value in outbox.deadletters(txn) if stream == "notify"]
        return seqs, outbox.deadletter_count(txn, "notify"), outbox.deadletters_dropped(txn, "notify")


def test_dead_letters_are_capped_oldest_first_counted_and_alike_on_every_replica(tmp_path: Path) -> None:
    hook = c.webhook_config_op("http://h/", ["msg.notify"], 100, deadletters_max=3)
    ops = [[hook], [person_send("a", "b", f"m{i}") for i in range(5)]]
    ops += [[c.webhook_deadletter_op("notify", 0, 5, "down", 1)]]
    replicas = [Store(str(tmp_path / f"r{i}"), map_size=64 << 20) for i in range(2)]
    try:
        for store in replicas:
            for entry in ops:
                assert all(r["r"] == c.R_SUCCESS for r in apply(store, entry))
        assert letters(replicas[0]) == ([3, 4, 5], 3, 2)

        store = replicas[0]
        apply(store, [c.deadletter_remove_op("notify", [4, 99])])  # 99 was never there: not counted
        assert letters(store) == ([3, 5], 2, 2)
        # A lowered cap holds from its own entry on.
        apply(store, [c.webhook_config_op("http://h/", ["msg.notify"], 100, deadletters_max=1)])
        assert letters(store) == ([5], 1, 3)

        # A store written before the count was kept is counted from its rows (the same on every node).
        other = replicas[1]
        with other.write() as txn:
            txn.delete("meta", b"deadletters_count:notify")
        apply(other, [person_send("a", "b", "m5"), c.webhook_deadletter_op("notify", 5, 6, "down", 1)])
        assert letters(other) == ([4, 5, 6], 3, 3)
    finally:
        for store in replicas:
            store.close()
