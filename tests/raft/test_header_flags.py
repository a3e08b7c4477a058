"""Header flags, expire and topic in the send op; no_persist and command (sync_once) messages in apply."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import cbor2
import pytest

from node.wire import protocol
from raft import cmdqueue
from raft import commands as c
from raft.apply import apply_ops
from raft.conversations import conversations_of
from storage import keys
from storage.store import Store

PERSON, GROUP = c.CHANNEL_PERSON, c.CHANNEL_GROUP


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    yield s
    s.close()


def send(cmn: str, mid: int, **overrides: Any) -> c.Op:
    fields: dict[str, Any] = {
        "channel_id": c.person_channel_id("alice", "bob"),
        "channel_type": PERSON,
        "sender": "alice",
        "receiver": "bob",
        "client_msg_no": cmn,
        "message_id": mid,
        "timestamp": 1_700_000_000,
        "setting": 0,
        "payload": b"hi",
    }
    return c.send_op(**{**fields, **overrides})


_ENTRY_FORMAT = ["rows"]


@pytest.fixture(autouse=True, params=["rows", "maps"])
def entry_format(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test as the proposer encodes entries now (send ops as pre-encoded rows) and as the previous
    version did (send ops as maps), which a journal may still hold."""
    _ENTRY_FORMAT[0] = request.param
    yield


def apply(store: Store, ops: list[Any], index: int) -> list[dict[str, Any]]:
    """Apply `ops` as one committed entry: encoded, then decoded as raft/machine.py decodes it."""
    entry = c.encode_entry(ops) if _ENTRY_FORMAT[0] == "rows" else cbor2.dumps(ops)
    with store.write() as txn:
        return apply_ops(txn, c.decode_entry(entry), index)


def test_flag_values_match_the_wire() -> None:
    assert c.HF_NO_PERSIST == protocol.FLAG_NO_PERSIST
    assert c.HF_RED_DOT == protocol.FLAG_RED_DOT
    assert c.HF_SYNC_ONCE == protocol.FLAG_SYNC_ONCE
    assert c.SETTING_STREAM == protocol.SETTING_STREAM  # the setting bit of a streamed message's anchor


def test_op_is_compact_fields_absent_when_zero() -> None:
    plain = send("m1", 1)
    assert not {"hf", "exp", "tp", "subs"} & set(plain)
    flagged = send("m2", 2, header=c.HF_RED_DOT, expire=60, topic="news")
    assert (flagged["hf"], flagged["exp"], flagged["tp"]) == (c.HF_RED_DOT, 60, "news")
    # One small int per flagged message on top of the plain op.
    without = {k: v for k, v in flagged.items() if k not in ("exp", "tp")}
    assert len(cbor2.dumps(without)) - len(cbor2.dumps({**plain, "cmn": "m2", "mid": 2})) <= 4


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("hf", 0, "hf"),
        ("hf", 8, "hf"),  # DUP is not a message flag
        ("hf", True, "hf"),
        ("exp", 0, "exp"),
        ("exp", 1 << 32, "exp"),
        ("tp", "", "tp"),
        ("tp", "x" * 256, "tp"),
        ("tp", 5, "tp"),
        ("subs", ["bob"], "subs"),  # only a temporary channel of the business server
    ],
)
def test_bad_flag_fields_are_refused_naming_the_field(field: str, value: Any, named: str) -> None:
    op = {**send("m1", 1), field: value}
    with pytest.raises(c.BadCommand, match=named):
        c.check_op(op)


def test_temporary_channel_needs_subscribers_and_sync_once() -> None:
    base = {"channel_id": "t1", "channel_type": c.CHANNEL_TEMP, "receiver": "", "api": True}
    with pytest.raises(c.BadCommand, match="temporary"):
        send("m1", 1, **base, header=c.HF_SYNC_ONCE)
    with pytest.raises(c.BadCommand, match="temporary"):
        send("m1", 1, **base, subscribers=["bob"])
    op = send("m1", 1, **base, header=c.HF_SYNC_ONCE, subscribers=["bob", "carol"])
    assert op["subs"] == ["bob", "carol"]


def test_an_entry_written_before_flags_still_applies_and_reads_as_no_flags(store: Store) -> None:
    old = dict(send("m1", 1))  # what older nodes proposed: no hf, exp, tp
    [result] = apply(store, [old], 1)
    assert result["r"] == c.R_SUCCESS and result["seq"] == 1
    with store.read() as txn:
        [row] = txn.messages(keys.channel_key(old["cid"], PERSON), 1, 1, 1)
    assert not {"hf", "exp", "tp"} & set(row)


def test_flags_expire_topic_are_stored_with_the_message(store: Store) -> None:
    op = send("m1", 1, header=c.HF_RED_DOT, expire=30, topic="t")
    [result] = apply(store, [op], 1)
    with store.read() as txn:
        row = txn.message(keys.channel_key(op["cid"], PERSON), result["seq"])
    assert row is not None and (row["hf"], row["exp"], row["tp"]) == (c.HF_RED_DOT, 30, "t")


def test_no_persist_is_committed_but_never_stored(store: Store) -> None:
    op = send("m1", 7, header=c.HF_NO_PERSIST | c.HF_RED_DOT)
    [result] = apply(store, [op], 1)
    assert result == {"r": c.R_SUCCESS, "mid": 7, "seq": 0}
    chan = keys.channel_key(op["cid"], PERSON)
    with store.read() as txn:
        assert txn.channel(chan) is None and txn.messages(chan, 0, 0, 10) == []
        assert txn.dedup(chan, "alice", "m1") is None
        assert conversations_of(txn, "alice") == [] and conversations_of(txn, "bob") == []


def test_no_persist_still_checks_permissions(store: Store) -> None:
    apply(store, [c.members_op("blacklist", "add", "bob", PERSON, ["alice"])], 1)
    [result] = apply(store, [send("m1", 7, header=c.HF_NO_PERSIST)], 2)
    assert result["r"] == c.R_IN_BLACKLIST


def test_a_command_is_queued_for_each_recipient_out_of_conversations(store: Store) -> None:
    apply(
        store, [c.channel_op("g1", GROUP, ban=0, disband=0, send_ban=0, large=0, subscribers=["a", "b"])], 1
    )
    [plain] = apply(store, [send("p1", 1, channel_id="g1", channel_type=GROUP, sender="a", receiver="")], 2)
    cmd = send("c1", 2, channel_id="g1", channel_type=GROUP, sender="a", receiver="", header=c.HF_SYNC_ONCE)
    [result] = apply(store, [cmd], 3)
    assert result["r"] == c.R_SUCCESS and result["seq"] == 1  # the command channel's own seq
    [again] = apply(store, [cmd], 4)
    assert again["dup"] and again["seq"] == 1
    with store.read() as txn:
        assert int((txn.channel(keys.channel_key("g1", GROUP)) or {})["last_seq"]) == plain["seq"] == 1
        for uid in ("a", "b"):
            [(position, message)] = cmdqueue.pending(txn, uid, 10)
            assert position == 1 and message["mid"] == 2 and message["hf"] == c.HF_SYNC_ONCE
            [conv] = conversations_of(txn, uid)
            assert (conv["channel_id"], conv["last_seq"]) == ("g1", 1)  # the command is not in it
        assert [cid for cid, _ct in txn.user_channels("a")] == ["g1"]


def test_sync_then_ack_drops_exactly_what_the_sync_handed_out(store: Store) -> None:
    for n in range(1, 4):
        apply(store, [send(f"c{n}", n, header=c.HF_SYNC_ONCE)], n)
    with store.read() as txn:
        assert [p for p, _m in cmdqueue.pending(txn, "bob", 10)] == [1, 2, 3]
    [ack] = apply(store, [c.cmd_ack_op("bob")], 10)  # nothing handed out yet: nothing dropped
    assert ack["acked"] == 0
    apply(store, [c.cmd_sync_op("bob", 2)], 11)
    apply(store, [send("c4", 4, header=c.HF_SYNC_ONCE)], 12)  # arrives between sync and ack
    [ack] = apply(store, [c.cmd_ack_op("bob")], 13)
    assert ack["acked"] == 2
    with store.read() as txn:
        assert [m["mid"] for _p, m in cmdqueue.pending(txn, "bob", 10)] == [3, 4]
        assert [m["mid"] for _p, m in cmdqueue.pending(txn, "alice", 10)] == [1, 2, 3, 4]
    apply(store, [c.cmd_sync_op("bob", 99)], 14)  # clamped to what was queued
    [ack] = apply(store, [c.cmd_ack_op("bob")], 15)
    assert ack["acked"] == 2
    with store.read() as txn:
        assert cmdqueue.pending(txn, "bob", 10) == []


def test_a_queue_is_bounded_oldest_dropped(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c, "CMD_QUEUE_MAX", 3)
    for n in range(1, 6):
        apply(store, [send(f"c{n}", n, header=c.HF_SYNC_ONCE)], n)
    with store.read() as txn:
        assert [(p, m["mid"]) for p, m in cmdqueue.pending(txn, "bob", 10)] == [(3, 3), (4, 4), (5, 5)]
    apply(store, [c.cmd_sync_op("bob", 5)], 10)
    apply(store, [c.cmd_ack_op("bob")], 11)
    with store.read() as txn:
        assert cmdqueue.pending(txn, "bob", 10) == []
        assert txn.scan("cmd_queue", keys.part("bob")) == []
        assert len(txn.scan("cmd_queue", keys.part("alice"))) == 3


def test_system_uids_get_no_queue(store: Store) -> None:
    op = send(
        "c1",
        1,
        sender=c.SYSTEM_UID,
        channel_id=c.person_channel_id(c.SYSTEM_UID, "bob"),
        api=True,
        header=c.HF_SYNC_ONCE,
    )
    [result] = apply(store, [op], 1)
    assert result["r"] == c.R_SUCCESS
    with store.read() as txn:
        assert cmdqueue.pending(txn, c.SYSTEM_UID, 10) == []
        assert len(cmdqueue.pending(txn, "bob", 10)) == 1


def test_a_temporary_channel_command_is_queued_for_its_uid_list(store: Store) -> None:
    op = send(
        "c1",
        1,
        channel_id="t1",
        channel_type=c.CHANNEL_TEMP,
        receiver="",
        api=True,
        header=c.HF_SYNC_ONCE,
        subscribers=["bob", "carol"],
    )
    [result] = apply(store, [op], 1)
    assert result["r"] == c.R_SUCCESS and result["seq"] == 1
    with store.read() as txn:
        for uid in ("bob", "carol"):
            [(_p, message)] = cmdqueue.pending(txn, uid, 10)
            assert message["subs"] == ["bob", "carol"]
        assert cmdqueue.pending(txn, "alice", 10) == []
        assert conversations_of(txn, "bob") == []


def test_same_log_same_store_with_flags(tmp_path: os.PathLike[str]) -> None:
    ops = [
        send("m1", 1, header=c.HF_RED_DOT, topic="t"),
        send("m2", 2, header=c.HF_NO_PERSIST),
        send("m3", 3, header=c.HF_SYNC_ONCE),
        c.cmd_sync_op("bob", 1),
        c.cmd_ack_op("bob"),
    ]
    dumps = []
    for name in ("one", "two"):
        s = Store(os.path.join(tmp_path, name), map_size=64 << 20)
        for index, op in enumerate(ops, start=1):
            apply(s, [op], index)
        with s.read() as txn:
            dumps.append(
                {db: list(txn.raw_items(db)) for db in ("messages", "cmd_queue", "cmd_state", "dedup")}
            )
        s.close()
    assert dumps[0] == dumps[1]
