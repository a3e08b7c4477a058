"""Checks a chaos history: no acknowledged message lost, none stored twice, one order everywhere.

The harness logs every send, answer, timeout and delivery as JSON lines, then each node's final store of
every channel after healing. This module reads that file and nothing else (no cluster, no clock), so a
failing history can be rechecked, shrunk by hand and kept as a regression fixture.

    python -m tests.chaos.checker history.jsonl     # prints Jepsen-style counts; exit 1 on failure

What is checked (issue 6):
- lost: a send acknowledged with reason 1 must be on every node, under the (mid, seq) the ack named;
- duplicated: one send (sender uid, client_msg_no) is stored under one seq, never two;
- recovered: a send never acknowledged (timeouts, failures) that is stored anyway; fine if stored once;
- unexpected: nothing stored or read that no writer sent in that channel;
- order/gap: every node holds the same seq -> message map, seqs 1..N; every reader sees exactly 1..N of
  the final store, one mid per seq and one seq per mid, live deliveries never going backwards.

Invariant: `Report.ok` is true exactly when `Report.problems` is empty; every count but `acked` and
`recovered` adds at least one problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REASON_SUCCESS = 1
PROBLEMS_PRINTED_MAX = 50  # a broken run can produce thousands; the first ones name the fault
SEQS_LISTED_MAX = 10  # in one problem line

Kind = Literal["ack", "lost", "duplicated", "unexpected", "order", "gap", "history"]
ORDER_KINDS: frozenset[Kind] = frozenset({"order", "gap"})

# ---------------------------------------------------------------------------------------------------------
# Events, decoded at the edge: the checks below never see a raw dict.


class HistoryError(ValueError):
    """An event is not what the history format says it is."""


@dataclass(frozen=True)
class Meta:
    seed: int
    nodes: tuple[str, ...]
    channels: tuple[str, ...]
    readers: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Send:
    writer: str
    uid: str
    channel: str
    cmn: str


@dataclass(frozen=True)
class Ack:
    writer: str
    channel: str
    cmn: str
    mid: int
    seq: int
    reason: int


@dataclass(frozen=True)
class Timeout:
    writer: str
    channel: str
    cmn: str


@dataclass(frozen=True)
class Recv:
    index: int  # position in the history, to point a reader at the offending line
    reader: str
    channel: str
    cmn: str
    mid: int
    seq: int
    dup: bool
    live: bool
    # The reader's connection: a node that was behind may push, on a new connection, a message the reader
    # already had from another node (same id and seq: at-least-once, not a duplicate). Live order is
    # therefore required per connection.
    conn: int = 0


@dataclass(frozen=True)
class Stored:
    seq: int
    mid: int
    cmn: str
    from_uid: str


@dataclass(frozen=True)
class Final:
    node: str
    channel: str
    messages: tuple[Stored, ...]


@dataclass(frozen=True)
class Fault:
    kind: str


Event = Meta | Send | Ack | Timeout | Recv | Final | Fault


def _field(raw: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in raw:
        raise HistoryError(f"missing field {name!r}")
    value = raw[name]
    # bool is an int to isinstance, but a `true` seq is a harness bug, not seq 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HistoryError(f"field {name!r} is {value!r}, not {kind}")
    return value


def _str(raw: Mapping[str, Any], name: str) -> str:
    return str(_field(raw, name, str))


def _int(raw: Mapping[str, Any], name: str) -> int:
    return int(_field(raw, name, int))


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HistoryError(f"{what} is {value!r}, not a list of strings")
    return tuple(value)


def _meta(raw: Mapping[str, Any], _index: int) -> Meta:
    readers = _field(raw, "readers", dict)
    return Meta(
        seed=_int(raw, "seed"),
        nodes=_strs(_field(raw, "nodes", list), "nodes"),
        channels=_strs(_field(raw, "channels", list), "channels"),
        readers={str(r): _strs(chs, f"channels of reader {r!r}") for r, chs in readers.items()},
    )


def _send(raw: Mapping[str, Any], _index: int) -> Send:
    return Send(_str(raw, "writer"), _str(raw, "uid"), _str(raw, "channel"), _str(raw, "cmn"))


def _ack(raw: Mapping[str, Any], _index: int) -> Ack:
    return Ack(
        _str(raw, "writer"),
        _str(raw, "channel"),
        _str(raw, "cmn"),
        _int(raw, "mid"),
        _int(raw, "seq"),
        _int(raw, "reason"),
    )


def _timeout(raw: Mapping[str, Any], _index: int) -> Timeout:
    return Timeout(_str(raw, "writer"), _str(raw, "channel"), _str(raw, "cmn"))


def _recv(raw: Mapping[str, Any], index: int) -> Recv:
    via = _str(raw, "via")
    if via not in ("live", "sync"):
        raise HistoryError(f"via is {via!r}, not 'live' or 'sync'")
    return Recv(
        index,
        _str(raw, "reader"),
        _str(raw, "channel"),
        _str(raw, "cmn"),
        _int(raw, "mid"),
        _int(raw, "seq"),
        bool(_field(raw, "dup", bool)),
        live=via == "live",
        conn=int(raw.get("conn", 0)) if isinstance(raw.get("conn", 0), int) else 0,
    )


def _stored(row: Any) -> Stored:
    if not (isinstance(row, list) and len(row) == 4):
        raise HistoryError(f"stored message {row!r} is not [seq, mid, cmn, from_uid]")
    seq, mid, cmn, from_uid = row
    if not (type(seq) is int and type(mid) is int and isinstance(cmn, str) and isinstance(from_uid, str)):
        raise HistoryError(f"stored message {row!r} is not [int, int, str, str]")
    return Stored(seq, mid, cmn, from_uid)


def _final(raw: Mapping[str, Any], _index: int) -> Final:
    rows = _field(raw, "messages", list)
    return Final(_str(raw, "node"), _str(raw, "channel"), tuple(_stored(row) for row in rows))


def _fault(raw: Mapping[str, Any], _index: int) -> Fault:
    return Fault(_str(raw, "kind"))


DECODERS: dict[str, Callable[[Mapping[str, Any], int], Event]] = {
    "meta": _meta,
    "send": _send,
    "ack": _ack,
    "timeout": _timeout,
    "recv": _recv,
    "final": _final,
    "fault": _fault,
}


def decode(raw: Mapping[str, Any], index: int) -> Event:
    """One history line as a typed event; HistoryError if it breaks the format."""
    kind = raw.get("type")
    decoder = DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise HistoryError(f"unknown type {kind!r}")
    return decoder(raw, index)


# ---------------------------------------------------------------------------------------------------------
# Findings and the report.


@dataclass
class _Findings:
    """Problems in the order found; the same problem on several nodes becomes one line naming them all."""

    _nodes: dict[tuple[Kind, str], list[str]] = field(default_factory=dict)

    def add(self, kind: Kind, text: str, node: str | None = None) -> None:
        nodes = self._nodes.setdefault((kind, text), [])
        if node is not None and node not in nodes:
            nodes.append(node)

    def count(self, kinds: Iterable[Kind]) -> int:
        wanted = set(kinds)
        return sum(1 for kind, _text in self._nodes if kind in wanted)

    def lines(self) -> list[str]:
        out = []
        for (kind, text), nodes in self._nodes.items():
            where = ""
            if nodes:
                where = f" on node{'s' if len(nodes) > 1 else ''} {', '.join(sorted(nodes))}"
            out.append(f"{kind}: {text}{where}")
        return out


@dataclass
class Report:
    """What a history shows. Counts are distinct messages, except `order_problems` (problem lines)."""

    seed: int | None
    sent: int = 0  # distinct (writer, channel, cmn) sends
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    recovered: int = 0
    unexpected: int = 0
    order_problems: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = (
            f"acked {self.acked}, lost {self.lost}, duplicated {self.duplicated}, "
            f"recovered {self.recovered}, unexpected {self.unexpected}, "
            f"order/gap problems {self.order_problems}"
        )
        if self.ok:
            return f"{counts}\nOK"
        replay = f"replay with --seed {self.seed}" if self.seed is not None else "seed unknown (no meta line)"
        return f"{counts}\nFAIL: {len(self.problems)} problem(s); {replay}"


# ---------------------------------------------------------------------------------------------------------
# The history, sorted by what the checks need.

SendKey = tuple[str, str, str]  # (writer, channel, cmn): cmn is unique per writer, the channel guards reuse
AckId = tuple[int, int]  # (mid, seq)


@dataclass
class _History:
    meta: Meta | None = None
    uid_of: dict[SendKey, str] = field(default_factory=dict)
    # (channel, cmn) -> {writer: uid}: stored rows and RECVs name no writer, only the cmn (and the uid).
    senders: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    timeouts: list[Timeout] = field(default_factory=list)
    recvs: list[Recv] = field(default_factory=list)
    finals: dict[tuple[str, str], tuple[Stored, ...]] = field(default_factory=dict)  # (node, channel)

    def writers_of(self, channel: str, cmn: str, uid: str | None = None) -> list[str]:
        """The writers that sent `cmn` in `channel` (as `uid`, if given)."""
        found = self.senders.get((channel, cmn), {})
        return sorted(w for w, u in found.items() if uid is None or u == uid)


def _read(events: Iterable[Mapping[str, Any]], found: _Findings) -> _History:
    history = _History()
    for index, raw in enumerate(events, start=1):
        try:
            event = decode(raw, index)
        except HistoryError as e:
            found.add("history", f"event {index} ({raw.get('type')!r}): {e}")
            continue
        _file(history, event, index, found)
    return history


def _file(history: _History, event: Event, index: int, found: _Findings) -> None:
    match event:
        case Meta():
            if history.meta is not None:
                found.add("history", f"event {index}: a second meta line")
            history.meta = event
        case Send(writer, uid, channel, cmn):
            previous = history.uid_of.setdefault((writer, channel, cmn), uid)
            if previous != uid:
                found.add("history", f"event {index}: {writer} resent {cmn!r} as {uid}, first as {previous}")
            history.senders.setdefault((channel, cmn), {})[writer] = previous
        case Ack():
            history.acks.append(event)
        case Timeout():
            history.timeouts.append(event)
        case Recv():
            history.recvs.append(event)
        case Final(node, channel, messages):
            if (node, channel) in history.finals:
                found.add("history", f"event {index}: a second final store of {channel}", node)
            history.finals[(node, channel)] = messages
        case Fault():
            pass


def _check_answered_sends(history: _History, found: _Findings) -> None:
    """An answer to a send that was never logged means the history itself cannot be trusted."""
    answers: list[Ack | Timeout] = [*history.acks, *history.timeouts]
    for answer in answers:
        if (answer.writer, answer.channel, answer.cmn) not in history.uid_of:
            what = "ack" if isinstance(answer, Ack) else "timeout"
            found.add("history", f"{what} for {answer.writer} {answer.cmn!r} in {answer.channel}, never sent")


def _acked(history: _History, found: _Findings) -> dict[SendKey, list[AckId]]:
    """Every send acknowledged with success, with each distinct (mid, seq) it was given."""
    acked: dict[SendKey, list[AckId]] = {}
    for ack in history.acks:
        key = (ack.writer, ack.channel, ack.cmn)
        if ack.reason != REASON_SUCCESS or key not in history.uid_of:
            continue
        ids = acked.setdefault(key, [])
        if (ack.mid, ack.seq) not in ids:
            ids.append((ack.mid, ack.seq))
    for (writer, channel, cmn), ids in acked.items():
        if len(ids) > 1:
            named = ", ".join(f"mid {m} seq {s}" for m, s in ids)
            found.add("ack", f"{writer} {cmn!r} in {channel} acked twice with different ids: {named}")
    return acked


def _nodes_and_channels(history: _History, found: _Findings) -> tuple[list[str], list[str]]:
    """The nodes that reported a final store, and every channel each of them must have reported."""
    nodes = sorted({node for node, _channel in history.finals})
    channels = {channel for _node, channel in history.finals}
    channels |= {channel for _writer, channel, _cmn in history.uid_of}
    if history.meta is None:
        found.add("history", "no meta line")
    else:
        channels |= set(history.meta.channels)
    if not nodes:
        found.add("history", "no final stores: nothing to check the acknowledged messages against")
    for node in nodes:
        for channel in sorted(channels):
            if (node, channel) not in history.finals:
                found.add("history", f"no final store of {channel}", node)
    return nodes, sorted(channels)


def _store(history: _History, node: str, channel: str) -> tuple[Stored, ...]:
    # A missing final store was reported already; as empty it still shows every acked message lost.
    return history.finals.get((node, channel), ())


# ---------------------------------------------------------------------------------------------------------
# The checks. Each adds problems to `found` and returns what it counts.


def _check_lost(
    history: _History, acked: dict[SendKey, list[AckId]], nodes: list[str], found: _Findings
) -> set[SendKey]:
    # Indexed once: a long run has ~1e5 acked sends, and scanning a channel per send is quadratic.
    stored: dict[tuple[str, str, str, str], list[AckId]] = defaultdict(list)  # (node, channel, uid, cmn)
    for (node, channel), messages in history.finals.items():
        for s in messages:
            stored[(node, channel, s.from_uid, s.cmn)].append((s.mid, s.seq))
    lost: set[SendKey] = set()
    for key, ids in acked.items():
        writer, channel, cmn = key
        uid = history.uid_of[key]
        for node in nodes:
            rows = stored.get((node, channel, uid, cmn), [])
            for mid, seq in ids:
                if (mid, seq) in rows:
                    continue
                lost.add(key)
                where = ", ".join(f"mid {m} seq {s}" for m, s in rows)
                state = f"is stored as {where}" if rows else "is missing"
                found.add(
                    "lost", f"{writer} {cmn!r} in {channel}, acked as mid {mid} seq {seq}, {state}", node
                )
    return lost


def _check_duplicates(history: _History, found: _Findings) -> set[tuple[str, str, str]]:
    """One send stored under two seqs; the same seq listed twice is an order problem instead."""
    duplicated: set[tuple[str, str, str]] = set()
    for (node, channel), messages in history.finals.items():
        seqs: dict[tuple[str, str], set[int]] = defaultdict(set)
        for s in messages:
            seqs[(s.from_uid, s.cmn)].add(s.seq)
        for (uid, cmn), under in seqs.items():
            if len(under) > 1:
                duplicated.add((channel, uid, cmn))
                found.add(
                    "duplicated", f"{cmn!r} from {uid} in {channel} stored under seqs {sorted(under)}", node
                )
    return duplicated


def _check_stored_sends(
    history: _History, acked: dict[SendKey, list[AckId]], found: _Findings
) -> tuple[set[SendKey], set[tuple[str, str]]]:
    """(recovered, unexpected): stored sends never acknowledged, and stored rows nobody sent."""
    recovered: set[SendKey] = set()
    unexpected: set[tuple[str, str]] = set()
    for (node, channel), messages in history.finals.items():
        for s in messages:
            writers = history.writers_of(channel, s.cmn, s.from_uid)
            if not writers:
                unexpected.add((channel, s.cmn))
                found.add("unexpected", f"{s.cmn!r} from {s.from_uid} stored in {channel}, never sent", node)
            recovered |= {(w, channel, s.cmn) for w in writers if (w, channel, s.cmn) not in acked}
    return recovered, unexpected


def _seq_list(seqs: Iterable[int]) -> str:
    ordered = sorted(seqs)
    shown = ", ".join(str(s) for s in ordered[:SEQS_LISTED_MAX])
    more = len(ordered) - SEQS_LISTED_MAX
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"


def _check_one_store(node: str, channel: str, messages: tuple[Stored, ...], found: _Findings) -> None:
    """A node's own channel: each seq once, seqs 1..N, each mid under one seq."""
    seqs: dict[int, int] = defaultdict(int)
    mids: dict[int, set[int]] = defaultdict(set)
    for s in messages:
        seqs[s.seq] += 1
        mids[s.mid].add(s.seq)
    if twice := [seq for seq, n in seqs.items() if n > 1]:
        found.add("order", f"{channel}: seqs {_seq_list(twice)} listed more than once", node)
    if bad := [seq for seq in seqs if seq < 1]:
        found.add("order", f"{channel}: seqs {_seq_list(bad)} below 1", node)
    if missing := set(range(1, max(seqs, default=0) + 1)) - set(seqs):
        found.add("gap", f"{channel}: seqs {_seq_list(missing)} missing from 1..{max(seqs)}", node)
    for mid, under in mids.items():
        if len(under) > 1:
            found.add("order", f"{channel}: mid {mid} stored under seqs {sorted(under)}", node)


def _by_seq(messages: tuple[Stored, ...]) -> dict[int, Stored]:
    return {s.seq: s for s in messages}


def _describe(s: Stored | None) -> str:
    return "nothing" if s is None else f"mid {s.mid} {s.cmn!r} from {s.from_uid}"


def _check_order(history: _History, nodes: list[str], channels: list[str], found: _Findings) -> None:
    """Every node's channel equals the first node's, seq for seq (the first node is the reference)."""
    for channel in channels:
        for node in nodes:
            _check_one_store(node, channel, _store(history, node, channel), found)
        if not nodes:
            continue
        reference = _by_seq(_store(history, nodes[0], channel))
        for node in nodes[1:]:
            mine = _by_seq(_store(history, node, channel))
            differ = sorted(
                seq for seq in reference.keys() | mine.keys() if reference.get(seq) != mine.get(seq)
            )
            if differ:
                seq = differ[0]
                found.add(
                    "order",
                    f"{channel} differs from node {nodes[0]} at seqs {_seq_list(differ)}; "
                    f"first at seq {seq}: {_describe(mine.get(seq))} "
                    f"where node {nodes[0]} has {_describe(reference.get(seq))}",
                    node,
                )


def _check_reader_stream(
    reader: str, channel: str, recvs: list[Recv], reference: dict[int, Stored], found: _Findings
) -> None:
    """One reader's deliveries in one channel agree with each other and with the final store."""
    mid_at: dict[int, int] = {}
    seq_of: dict[int, int] = {}
    last_live: int | None = None
    last_conn = 0
    where = f"reader {reader} in {channel}"
    for r in recvs:
        if mid_at.setdefault(r.seq, r.mid) != r.mid:
            found.add("order", f"{where}: seq {r.seq} seen as mid {mid_at[r.seq]} and as mid {r.mid}")
        if seq_of.setdefault(r.mid, r.seq) != r.seq:
            found.add("order", f"{where}: mid {r.mid} seen under seq {seq_of[r.mid]} and seq {r.seq}")
        stored = reference.get(r.seq)
        if stored is None or (stored.mid, stored.cmn) != (r.mid, r.cmn):
            found.add(
                "order",
                f"{where}: seq {r.seq} read as mid {r.mid} {r.cmn!r}, final store has {_describe(stored)}",
            )
        # A DUP-flagged resend repeats an earlier seq on purpose; only first deliveries must advance.
        if r.live and not r.dup:
            if r.conn != last_conn:
                last_conn, last_live = r.conn, None
            if last_live is not None and r.seq <= last_live:
                found.add("order", f"{where}: live seq {r.seq} after seq {last_live} (event {r.index})")
            last_live = r.seq


def _check_readers(history: _History, nodes: list[str], found: _Findings) -> set[tuple[str, str]]:
    """Every reader against the first node's final store; returns (channel, cmn) read but never sent."""
    streams: dict[tuple[str, str], list[Recv]] = defaultdict(list)
    for r in history.recvs:
        streams[(r.reader, r.channel)].append(r)
    reads = dict(history.meta.readers) if history.meta else {}
    for reader, channels in reads.items():
        for channel in channels:
            streams.setdefault((reader, channel), [])
    unexpected: set[tuple[str, str]] = set()
    for (reader, channel), recvs in streams.items():
        reference = _by_seq(_store(history, nodes[0], channel)) if nodes else {}
        _check_reader_stream(reader, channel, recvs, reference, found)
        for r in recvs:
            if not history.writers_of(channel, r.cmn):
                unexpected.add((channel, r.cmn))
                found.add(
                    "unexpected", f"reader {reader} read {r.cmn!r} in {channel} (seq {r.seq}), never sent"
                )
        # Only the channels a reader is meant to read must be complete; what else it saw must still agree.
        if channel in reads.get(reader, ()) and (missing := reference.keys() - {r.seq for r in recvs}):
            found.add("gap", f"reader {reader} in {channel}: never received seqs {_seq_list(missing)}")
    return unexpected


def check(events: Iterable[Mapping[str, Any]]) -> Report:
    """Check a whole history (the events in the order they were logged)."""
    found = _Findings()
    history = _read(events, found)
    _check_answered_sends(history, found)
    acked = _acked(history, found)
    nodes, channels = _nodes_and_channels(history, found)
    lost = _check_lost(history, acked, nodes, found)
    duplicated = _check_duplicates(history, found)
    recovered, unexpected = _check_stored_sends(history, acked, found)
    _check_order(history, nodes, channels, found)
    unexpected |= _check_readers(history, nodes, found)
    return Report(
        seed=history.meta.seed if history.meta else None,
        sent=len(history.uid_of),
        acked=len(acked),
        lost=len(lost),
        duplicated=len(duplicated),
        recovered=len(recovered),
        unexpected=len(unexpected),
        order_problems=found.count(ORDER_KINDS),
        problems=found.lines(),
    )


def load(path: str | Path) -> list[dict[str, Any]]:
    """The events of a JSON-lines history; ValueError naming the line if one is not a JSON object."""
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from e
            if not isinstance(event, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            events.append(event)
    return events


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary and the first problems; 0 if the history passes, 1 if not, 2 if unreadable."""
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.checker", description=__doc__.split("\n")[0])
    parser.add_argument("history", type=Path, help="the JSON-lines history a chaos run wrote")
    args = parser.parse_args(argv)
    try:
        events = load(args.history)
    except (OSError, ValueError) as e:
        print(f"checker: {e}", file=sys.stderr)
        return 2
    report = check(events)
    print(report.summary())
    for line in report.problems[:PROBLEMS_PRINTED_MAX]:
        print(f"  {line}")
    if len(report.problems) > PROBLEMS_PRINTED_MAX:
        print(f"  ... and {len(report.problems) - PROBLEMS_PRINTED_MAX} more")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
