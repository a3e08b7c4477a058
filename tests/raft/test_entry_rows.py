"""Send ops as pre-encoded message rows (raft/commands.py `encode_entry`) against a real LMDB store.

The proposer encodes each message's stored row once; every node writes those bytes with its seq put in.
Entries from the previous version (send ops as maps) must still apply to the very bytes they gave before.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any, cast

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.shapes import message_json
from raft import commands as c
from raft.apply import Result, apply_ops
from storage import keys
from storage.store import Store
from tests.raft.test_apply import _log_op, dump_all, members, send

PERSON, GROUP = c.CHANNEL_PERSON, c.CHANNEL_GROUP

# An entry of two person messages as the previous version proposed it (send ops as CBOR maps), and the rows
# that version stored for it at Raft index 5 (printed from the store of the commit before this change).
OLD_ENTRY = bytes.fromhex(
    "82aa61746473656e646363696469626f6240616c696365626374016466726f6d65616c69636562746f63626f6263636d6e626d"
    "31636d6964076274731a6553f1006773657474696e6700677061796c6f6164426869ad61746473656e646363696469626f6240"
    "616c696365626374016466726f6d65616c69636562746f63626f6263636d6e626d32636d6964086274731a6553f10167736574"
    "74696e6701677061796c6f616442796f6268660263657870183c627470646e657773"
)
OLD_ROWS = {
    "messages": [
        (
            "0109626f6240616c6963650000000000000001",
            "a9636d69640763736571016466726f6d65616c6963656363696469626f6240616c6963656263740163636d6e626d3162"
            "74731a6553f1006773657474696e6700677061796c6f6164426869",
        ),
        (
            "0109626f6240616c6963650000000000000002",
            "ac636d69640863736571026466726f6d65616c6963656363696469626f6240616c6963656263740163636d6e626d3262"
            "74731a6553f1016773657474696e6701677061796c6f616442796f6268660263657870183c627470646e657773",
        ),
    ],
    "dedup": [
        ("0109626f6240616c69636505616c696365026d31", "a2636d6964076373657101"),
        ("0109626f6240616c69636505616c696365026d32", "a2636d6964086373657102"),
    ],
    "channels": [
        (
            "0109626f6240616c696365",
            "a7647479706501686c6173745f736571026362616e006764697362616e64006873656e645f62616e00656c617267650067"
            "76657273696f6e05",
        )
    ],
    "conversations": [
        ("05616c6963650109626f6240616c696365", "a36472656164026764656c65746564006776657273696f6e05")
    ],
    "subscribers": [("0109626f6240616c69636503626f62", ""), ("0109626f6240616c69636505616c696365", "")],
    "user_channels": [("03626f620109626f6240616c696365", ""), ("05616c6963650109626f6240616c696365", "")],
}


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    yield s
    s.close()


def apply_entry(store: Store, entry: bytes, index: int = 0) -> list[Result]:
    """What raft/machine.py's `execute` does with a committed entry."""
    with store.write() as txn:
        results = apply_ops(txn, c.decode_entry(entry), index)
        txn.set_applied_index(index)
    return results


def alice_to_bob(cmn: str, mid: int, **extra: Any) -> c.Op:
    return c.send_op(
        channel_id=c.person_channel_id("alice", "bob"),
        channel_type=PERSON,
        sender="alice",
        receiver="bob",
        client_msg_no=cmn,
        message_id=mid,
        timestamp=1_700_000_000,
        setting=0,
        payload=b"hi",
        **extra,
    )


def hexed(store: Store, db: str) -> list[tuple[str, str]]:
    with store.read() as txn:
        return [(k.hex(), v.hex()) for k, v in txn.raw_items(db)]


def test_an_entry_of_the_previous_version_applies_to_the_bytes_it_gave_then(
    tmp_path: os.PathLike[str],
) -> None:
    for name in ("a", "b"):  # every node, whatever it held before
        s = Store(os.path.join(tmp_path, name), map_size=16 << 20)
        try:
            results = apply_entry(s, OLD_ENTRY, 5)
            assert results == [{"r": 1, "mid": 7, "seq": 1}, {"r": 1, "mid": 8, "seq": 2}]
            assert {db: hexed(s, db) for db in OLD_ROWS} == OLD_ROWS
        finally:
            s.close()


def test_a_send_op_travels_as_the_row_every_node_stores(tmp_path: os.PathLike[str]) -> None:
    op = alice_to_bob("m1", 7, header=c.HF_RED_DOT, expire=60, topic="news")
    entry = c.encode_entry([op])
    [item] = cbor2.loads(entry)
    assert isinstance(item, bytes)  # not a map: the row itself
    [decoded] = c.decode_entry(entry)
    assert decoded == {**op, c.ROW: item}  # every field the node's push path reads, and the row
    stored = []
    for name in ("a", "b"):
        s = Store(os.path.join(tmp_path, name), map_size=16 << 20)
        try:
            apply_entry(s, c.encode_entry([alice_to_bob("m0", 6)]), 1)
            assert apply_entry(s, entry, 2) == [{"r": 1, "mid": 7, "seq": 2}]
            [_first, (_key, value)] = hexed(s, "messages")
            stored.append(value)
            # The proposer's bytes, the seq written into its slot: nothing re-encoded.
            assert bytes.fromhex(value) == item[: c.SEQ_AT] + (2).to_bytes(8, "big") + item[c.SEQ_AT + 8 :]
            with s.read() as txn:
                row = txn.message(keys.channel_key(op["cid"], PERSON), 2)
                assert row is not None
                assert row == {k: v for k, v in op.items() if k != "t"} | {"seq": 2}
                shown = message_json(row)
                assert (shown["message_seq"], shown["message_id"], shown["channel_id"]) == (2, 7, "bob")
                assert (shown["topic"], shown["expire"], shown["header"]["red_dot"]) == ("news", 60, 1)
        finally:
            s.close()
    assert stored[0] == stored[1]


def test_old_and_new_rows_of_one_channel_read_back_alike(store: Store) -> None:
    apply_entry(store, OLD_ENTRY, 5)  # a store written by the previous version
    assert apply_entry(store, c.encode_entry([alice_to_bob("m3", 9)]), 6) == [{"r": 1, "mid": 9, "seq": 3}]
    with store.read() as txn:
        rows = txn.messages(keys.channel_key(c.person_channel_id("alice", "bob"), PERSON), 1, 0, 10)
    assert [(r["seq"], r["mid"], r["cmn"]) for r in rows] == [(1, 7, "m1"), (2, 8, "m2"), (3, 9, "m3")]
    assert [message_json(r)["from_uid"] for r in rows] == ["alice"] * 3


def test_a_retry_is_a_duplicate_whichever_format_committed_it(store: Store) -> None:
    apply_entry(store, OLD_ENTRY, 5)
    # The same (sender, channel, client_msg_no) again, now pre-encoded, under a new message id.
    assert apply_entry(store, c.encode_entry([alice_to_bob("m1", 99)]), 6) == [
        {"r": 1, "mid": 7, "seq": 1, "dup": True}
    ]
    apply_entry(store, c.encode_entry([alice_to_bob("m5", 50)]), 7)
    old_format_retry = cbor2.dumps([dict(alice_to_bob("m5", 51))])
    assert apply_entry(store, old_format_retry, 8) == [{"r": 1, "mid": 50, "seq": 3, "dup": True}]


def _row_with(fields: dict[str, Any], *, pairs: int | None = None, seq: int = 0) -> bytes:
    """A row laid out as `message_row` lays it out, from `fields` as given (for forging bad ones)."""
    count = len(fields) + 1 if pairs is None else pairs
    return bytes((0xA0 + count,)) + b"\x63seq\x1b" + seq.to_bytes(8, "big") + cbor2.dumps(fields)[1:]


def _fields(**changes: Any) -> dict[str, Any]:
    return {k: v for k, v in alice_to_bob("bad", 3).items() if k != "t"} | changes


BAD_ROWS: dict[str, bytes] = {
    "empty": b"",
    "not CBOR": b"\xff\xff",
    "a list": cbor2.dumps([1, 2, 3]),
    "a map without the seq slot": cbor2.dumps(_fields()),
    "a seq that is not zero": _row_with(_fields(), seq=4),
    "a second seq": _row_with(_fields() | {"seq": 9}, pairs=len(_fields()) + 2),
    "an op type of its own": _row_with(_fields(t=c.OP_TOKEN)),
    "a row inside the row": _row_with(_fields(row=b"x")),
    "a field out of range": _row_with(_fields(setting=1000)),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_an_error_result_and_stores_nothing(store: Store, case: str) -> None:
    apply_entry(store, c.encode_entry([c.members_op("subscribers", "add", "g", GROUP, ["u1"])]), 1)
    before = dump_all(store)
    good = c.encode_entry([alice_to_bob("ok", 1)])
    entry = cbor2.dumps([BAD_ROWS[case], *cbor2.loads(good)])
    bad, fine = apply_entry(store, entry, 2)
    assert bad["r"] == c.R_SYSTEM_ERROR and set(bad) == {"r", "err"}
    assert fine == {"r": 1, "mid": 1, "seq": 1}  # the good op beside it is applied
    after = dump_all(store)
    assert [k for k, _v in after["messages"]] == [
        keys.message_key(keys.channel_key(c.person_channel_id("alice", "bob"), PERSON), 1)
    ]
    assert len(after["dedup"]) == len(before["dedup"]) + 1


def test_a_map_op_cannot_bring_a_row_of_its_own(store: Store) -> None:
    forged = c.message_row(dict(alice_to_bob("m1", 7)) | {"payload": b"forged"})
    entry = cbor2.dumps([dict(alice_to_bob("m1", 7)) | {c.ROW: forged}])
    assert apply_entry(store, entry, 1) == [{"r": 1, "mid": 7, "seq": 1}]
    with store.read() as txn:
        row = txn.message(keys.channel_key(c.person_channel_id("alice", "bob"), PERSON), 1)
    assert row is not None and row["payload"] == b"hi" and "to" not in row  # stored the old way


def test_a_refused_row_is_answered_like_a_refused_map(store: Store) -> None:
    # Permission is checked once per (channel, sender) per entry; a member op in between drops that.
    ops: list[Any] = [
        send("g", "u1", "a"),
        members("g", "subscribers", "add", ["u1"]),
        send("g", "u1", "b"),
        members("g", "subscribers", "remove", ["u1"]),
        send("g", "u1", "c"),
    ]
    results = apply_entry(store, c.encode_entry(cast(list[c.Op], ops)), 1)
    assert [r["r"] for r in results] == [c.R_CHANNEL_NOT_EXIST, 1, 1, 1, c.R_SUBSCRIBER_NOT_EXIST]


def _without_receiver(raw: bytes) -> Any:
    row = cbor2.loads(raw)
    row.pop("to", None)
    row.pop("api", None)
    return row


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log=st.lists(st.lists(_log_op, max_size=6), max_size=5))
def test_rows_and_maps_give_the_same_results_and_state(
    tmp_path: os.PathLike[str], log: list[list[Any]]
) -> None:
    """The same log proposed now (rows) and by the previous version (maps): the same results and state
    on every node; the message rows say the same, the new ones also naming the receiver."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        stores = {
            name: Store(os.path.join(root, name), map_size=16 << 20) for name in ("rows1", "rows2", "maps")
        }
        try:
            results = {
                name: [
                    apply_entry(s, cbor2.dumps(entry) if name == "maps" else c.encode_entry(entry), index)
                    for index, entry in enumerate(log, start=1)
                ]
                for name, s in stores.items()
            }
            assert results["rows1"] == results["rows2"] == results["maps"]
            dumps = {name: dump_all(s) for name, s in stores.items()}
            assert dumps["rows1"] == dumps["rows2"]  # byte-identical on every node
            for db, rows in dumps["maps"].items():
                if db == "messages":
                    assert [(k, cbor2.loads(v)) for k, v in rows] == [
                        (k, _without_receiver(v)) for k, v in dumps["rows1"][db]
                    ]
                else:
                    assert rows == dumps["rows1"][db]
        finally:
            for s in stores.values():
                s.close()


_text = st.one_of(
    st.text(max_size=3),
    st.text(alphabet="ab@é", min_size=60, max_size=140),
    st.sampled_from(["u1", "", "a" * 64, "a" * 65, "é" * 32, "é" * 33, "a" * 128, "a" * 129, "a" * 130]),
)
_number = st.one_of(
    st.integers(min_value=-2, max_value=300),
    st.sampled_from([(1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, True, False, 1.0, None]),
)


@settings(max_examples=400, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {
            "cid": _text,
            "ct": st.one_of(_number, st.sampled_from([1, 2, 8, 11])),
            "from": _text,
            "cmn": _text,
            "mid": _number,
            "ts": _number,
            "setting": _number,
            "payload": st.one_of(st.binary(max_size=4), st.text(max_size=2), st.none()),
        },
        optional={
            "to": st.one_of(_text, st.none()),
            "api": st.one_of(st.booleans(), st.integers(0, 1)),
            "hf": _number,
            "tp": _text,
            "subs": st.lists(_text, max_size=2),
        },
    ),
    uid_rule=st.booleans(),
)
def test_the_plain_send_shortcut_never_passes_what_the_full_check_refuses(
    fields: dict[str, Any], uid_rule: bool
) -> None:
    op = {"t": c.OP_SEND, **fields}
    if c._plain_send(op, uid_rule):
        c._check_send(op, uid_rule)  # must not raise


def test_an_ordinary_message_takes_the_shortcut() -> None:
    [op] = c.decode_entry(c.encode_entry([alice_to_bob("m1", 1)]))
    assert c._plain_send(op, False) and c._plain_send(op, True)
    # The SDKs set RedDot on every message: header flags alone must not send it the long way round.
    [flagged] = c.decode_entry(c.encode_entry([alice_to_bob("m2", 2, header=c.HF_RED_DOT)]))
    assert flagged["hf"] == c.HF_RED_DOT and c._plain_send(flagged, False)


_row_bytes = st.builds(
    lambda raw, at, byte: raw[:at] + bytes((byte,)) + raw[at + 1 :],
    st.just(cast(bytes, c.message_row(alice_to_bob("fz", 1)))),
    st.integers(0, 60),
    st.integers(0, 255),
)


def test_arbitrary_rows_never_make_apply_raise(tmp_path: os.PathLike[str]) -> None:
    s = Store(os.path.join(tmp_path, "fuzz"), map_size=64 << 20)
    index = iter(range(1, 1 << 30))

    @settings(max_examples=300, deadline=None)
    @given(items=st.lists(st.one_of(_row_bytes, st.binary(max_size=40)), max_size=6))
    def check(items: list[bytes]) -> None:
        results = apply_entry(s, cbor2.dumps(items), next(index))
        assert len(results) == len(items)
        assert all(isinstance(result["r"], int) for result in results)

    try:
        check()
    finally:
        s.close()


def test_a_row_is_the_op_without_its_type_seq_first() -> None:
    op = dict(alice_to_bob("m1", 1, topic="t"))
    fields = {name: value for name, value in op.items() if name != "t"}
    assert c.message_row(op) == _row_with(fields)  # the shortcut for an op from send_op
    t_last = {**fields, "t": c.OP_SEND}  # `t` not first: the long way round
    row = c.message_row(t_last)
    assert row is not None and cbor2.loads(row) == {"seq": 0, **fields}
    assert c.decode_entry(cbor2.dumps([row])) == [{**op, c.ROW: row}]
