"""What apply costs per message on one node, on realistic entries, against a real LMDB store.

`python -m node.tools.applybench` builds entries the way the proposer does (`send_op` for each message,
`encode_entry` once) and times what each node runs per entry, as raft/machine.py's `execute` does:
decode the entry, open the write transaction, `apply_ops`, record the applied index, commit. It prints
CPU µs per message (the best of a few slices: the cores are shared) for:
- person: entries of `--per-entry` person messages spread over `--channels` person channels, each with its
  own client_msg_no (as `imnode bench` sends them);
- group: entries of `--per-entry` messages to one group of `--group-size` members;
- group, one per entry: a single message to that group in its own entry.
`--profile` prints cProfile's top functions of the person case instead (where the time goes).

A benchmark, not a test: speed is measured here and in node.tools.floor, never asserted in tests.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections.abc import Iterator

from raft.apply import apply_ops
from raft.commands import (
    CHANNEL_GROUP,
    CHANNEL_PERSON,
    Op,
    channel_op,
    decode_entry,
    encode_entry,
    person_channel_id,
    send_op,
)
from storage.store import Store

PAYLOAD = b"x" * 200


class Node:
    """One node's store and the apply path of raft/machine.py's `execute`."""

    def __init__(self, path: str) -> None:
        self.store = Store(path)
        self.index = 0

    def apply(self, entry: bytes) -> None:
        self.index += 1
        ops = decode_entry(entry)
        with self.store.write() as txn:
            if self.index <= txn.applied_index():
                return
            apply_ops(txn, ops, self.index)
            txn.set_applied_index(self.index)


def _person_entries(per_entry: int, channels: int) -> Iterator[bytes]:
    mids = iter(range(1, 1 << 62))
    pairs = [(f"user{i}", f"peer{i}") for i in range(channels)]
    while True:
        ops: list[Op] = []
        for n in range(per_entry):
            sender, receiver = pairs[n % channels]
            mid = next(mids)
            ops.append(
                send_op(
                    channel_id=person_channel_id(sender, receiver),
                    channel_type=CHANNEL_PERSON,
                    sender=sender,
                    receiver=receiver,
                    client_msg_no=f"{sender}-{mid}",
                    message_id=mid,
                    timestamp=1_800_000_000,
                    setting=0,
                    payload=PAYLOAD,
                )
            )
        yield encode_entry(ops)


def _group_entries(per_entry: int, senders: list[str]) -> Iterator[bytes]:
    mids = iter(range(1, 1 << 62))
    while True:
        ops: list[Op] = []
        for n in range(per_entry):
            mid = next(mids)
            sender = senders[n % len(senders)]
            ops.append(
                send_op(
                    channel_id="bench-group",
                    channel_type=CHANNEL_GROUP,
                    sender=sender,
                    receiver="",
                    client_msg_no=f"{sender}-{mid}",
                    message_id=mid,
                    timestamp=1_800_000_000,
                    setting=0,
                    payload=PAYLOAD,
                )
            )
        yield encode_entry(ops)


REPEATS = 5


def _cpu_us(node: Node, entries: list[bytes], per_entry: int) -> float:
    """CPU µs per message of applying `entries` (built beforehand: only apply is timed): the best of
    REPEATS slices, since the cores are shared and a slice that got preempted reads high."""
    best = float("inf")
    size = max(1, len(entries) // REPEATS)
    for start in range(0, len(entries), size):
        chunk = entries[start : start + size]
        started = time.process_time()
        for entry in chunk:
            node.apply(entry)
        best = min(best, (time.process_time() - started) / (len(chunk) * per_entry) * 1e6)
    return best


def _take(source: Iterator[bytes], count: int) -> list[bytes]:
    return [next(source) for _ in range(count)]


def measure(rounds: int, per_entry: int, channels: int, group_size: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        node = Node(f"{folder}/person")
        person = _person_entries(per_entry, channels)
        node.apply(next(person))  # warm up: channels created, first pages touched
        figures[f"person: {per_entry} per entry over {channels} channels"] = _cpu_us(
            node, _take(person, rounds), per_entry
        )
        node.store.close()

        node = Node(f"{folder}/group")
        members = [f"member{i}" for i in range(group_size)]
        node.apply(
            encode_entry(
                [
                    channel_op(
                        "bench-group",
                        CHANNEL_GROUP,
                        ban=0,
                        disband=0,
                        send_ban=0,
                        large=0,
                        subscribers=members,
                    )
                ]
            )
        )
        group = _group_entries(per_entry, members[:2])
        node.apply(next(group))
        figures[f"group of {group_size}: {per_entry} per entry"] = _cpu_us(
            node, _take(group, rounds), per_entry
        )
        single = _group_entries(1, members[:2])
        figures[f"group of {group_size}: 1 per entry"] = _cpu_us(node, _take(single, rounds * 10), 1)
        node.store.close()
    return figures


def profile(rounds: int, per_entry: int, channels: int, top: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        node = Node(f"{folder}/person")
        person = _person_entries(per_entry, channels)
        node.apply(next(person))
        entries = _take(person, rounds)

        def run() -> None:
            for entry in entries:
                node.apply(entry)

        profiler = cProfile.Profile()
        profiler.runcall(run)
        node.store.close()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m node.tools.applybench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=300, help="entries per case (default 300)")
    parser.add_argument("--per-entry", type=int, default=100, help="messages per entry (default 100)")
    parser.add_argument("--channels", type=int, default=20, help="person channels (default 20)")
    parser.add_argument("--group-size", type=int, default=500, help="members of the group (default 500)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions instead")
    args = parser.parse_args(argv)
    if min(args.rounds, args.per_entry, args.channels, args.group_size) < 1:
        parser.error("--rounds, --per-entry, --channels and --group-size must be at least 1")
    if args.profile:
        profile(args.rounds, args.per_entry, args.channels, 30)
        return 0
    figures = measure(args.rounds, args.per_entry, args.channels, args.group_size)
    width = max(map(len, figures))
    for name, us in figures.items():
        print(f"{name:<{width}}  {us:8.1f} µs per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
