"""raft/apply.py against real LMDB: seqs, dedup, determinism, every permission reason, bad ops, fuzzing."""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any, cast

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.wire.protocol import Reason
from raft import commands as c
from raft.apply import Result, apply_ops
from storage import keys
from storage.store import DB_NAMES, Store

GROUP = c.CHANNEL_GROUP
PERSON = c.CHANNEL_PERSON

_mids = iter(range(1_000, 1 << 40))


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    yield s
    s.close()


def apply(store: Store, ops: list[Any]) -> list[Result]:
    with store.write() as txn:
        return apply_ops(txn, ops)


def send(
    cid: str,
    sender: str,
    cmn: str,
    *,
    ct: int = GROUP,
    to: str | None = None,
    mid: int | None = None,
    payload: bytes = b"hi",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "t": c.OP_SEND,
        "cid": cid,
        "ct": ct,
        "from": sender,
        "cmn": cmn,
        "mid": next(_mids) if mid is None else mid,
        "ts": 1_700_000_000,
        "setting": 0,
        "payload": payload,
    }
    if to is not None:
        op["to"] = to
    return op


def person_send(sender: str, receiver: str, cmn: str) -> dict[str, Any]:
    return send(c.person_channel_id(sender, receiver), sender, cmn, ct=PERSON, to=receiver)


def members(cid: str, member_list: str, action: str, uids: list[str], ct: int = GROUP) -> dict[str, Any]:
    return {"t": c.OP_MEMBERS, "cid": cid, "ct": ct, "list": member_list, "action": action, "uids": uids}


def channel(cid: str, ct: int = GROUP, **fields: Any) -> dict[str, Any]:
    return {"t": c.OP_CHANNEL, "cid": cid, "ct": ct, **fields}


def stored_seqs(store: Store, cid: str, ct: int = GROUP) -> list[int]:
    with store.read() as txn:
        return [m["seq"] for m in txn.messages(keys.channel_key(cid, ct), 0, 0, 1 << 20)]


def dump_all(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every key and value of every named database."""
    with store.env.begin(buffers=False) as txn:
        return {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store._dbs[name])] for name in DB_NAMES}


# -- seqs and dedup ----------------------------------------------------------------------------------------


def test_seq_starts_at_one_and_has_no_gaps_per_channel(store: Store) -> None:
    apply(store, [members("g1", "subscribers", "add", ["u1"]), members("g2", "subscribers", "add", ["u1"])])
    given_seqs: dict[str, list[int]] = {"g1": [], "g2": []}
    for entry in range(3):
        ops = [send(f"g{1 + n % 2}", "u1", f"e{entry}-{n}") for n in range(5)]
        for op, result in zip(ops, apply(store, ops), strict=True):
            assert result["r"] == c.R_SUCCESS
            given_seqs[op["cid"]].append(result["seq"])
    assert given_seqs == {"g1": list(range(1, 10)), "g2": list(range(1, 7))}
    assert stored_seqs(store, "g1") == list(range(1, 10))
    assert stored_seqs(store, "g2") == list(range(1, 7))
    with store.read() as txn:
        assert (txn.channel(keys.channel_key("g1", GROUP)) or {})["last_seq"] == 9
        assert (txn.channel(keys.channel_key("g2", GROUP)) or {})["last_seq"] == 6
        last = txn.message(keys.channel_key("g1", GROUP), 9)
    assert last is not None and last["from"] == "u1" and last["payload"] == b"hi"


def test_person_channel_seq_and_subscribers(store: Store) -> None:
    results = apply(store, [person_send("alice", "bob", "m1"), person_send("bob", "alice", "m2")])
    assert [(r["r"], r["seq"]) for r in results] == [(1, 1), (1, 2)]
    fake = c.person_channel_id("alice", "bob")
    assert stored_seqs(store, fake, PERSON) == [1, 2]
    with store.read() as txn:
        assert sorted(txn.members("subscribers", keys.channel_key(fake, PERSON))) == ["alice", "bob"]
        assert txn.user_channels("bob") == [(fake, PERSON)]


def test_dedup_returns_the_original_and_stores_nothing(store: Store) -> None:
    apply(store, [members("g", "subscribers", "add", ["u1", "u2"])])
    first = apply(store, [send("g", "u1", "cmn-1", mid=500)])[0]
    assert first == {"r": 1, "mid": 500, "seq": 1}
    before = dump_all(store)
    again = apply(store, [send("g", "u1", "cmn-1", mid=999, payload=b"other")])[0]
    assert again == {"r": 1, "mid": 500, "seq": 1, "dup": True}
    assert dump_all(store) == before
    # Within one entry too, and keyed by sender and channel: another sender's cmn-1 is a new message.
    results = apply(store, [send("g", "u1", "cmn-2", mid=600), send("g", "u1", "cmn-2", mid=601)])
    assert results == [{"r": 1, "mid": 600, "seq": 2}, {"r": 1, "mid": 600, "seq": 2, "dup": True}]
    assert apply(store, [send("g", "u2", "cmn-1", mid=700)])[0] == {"r": 1, "mid": 700, "seq": 3}
    assert stored_seqs(store, "g") == [1, 2, 3]


def test_rejected_send_leaves_no_dedup_row(store: Store) -> None:
    apply(store, [members("g", "subscribers", "add", ["u1"]), members("g", "blacklist", "add", ["u1"])])
    assert apply(store, [send("g", "u1", "x", mid=1)]) == [{"r": c.R_IN_BLACKLIST}]
    assert stored_seqs(store, "g") == []
    apply(store, [members("g", "blacklist", "remove", ["u1"])])
    assert apply(store, [send("g", "u1", "x", mid=2)]) == [{"r": 1, "mid": 2, "seq": 1}]


def test_a_retry_of_a_committed_send_is_a_duplicate_even_where_it_would_now_be_refused(store: Store) -> None:
    # apply checks permission before dedup (the cheap path writes the dedup row only if new); the answer
    # must stay the one of "dedup first": the original ids, not the refusal, and nothing written.
    apply(store, [members("g", "subscribers", "add", ["u1"])])
    assert apply(store, [send("g", "u1", "x", mid=1)]) == [{"r": 1, "mid": 1, "seq": 1}]
    apply(store, [members("g", "blacklist", "add", ["u1"])])
    before = dump_all(store)
    results = apply(store, [send("g", "u1", "x", mid=2), send("g", "u1", "y", mid=3)])
    assert results == [{"r": 1, "mid": 1, "seq": 1, "dup": True}, {"r": c.R_IN_BLACKLIST}]
    assert dump_all(store) == before


def test_membership_read_once_per_entry_stays_right_across_member_ops(store: Store) -> None:
    # The entry's cached membership is dropped by every member op, so a later send in the same entry
    # sees the change.
    ops = [
        send("g", "u1", "a"),
        members("g", "subscribers", "add", ["u1"]),
        send("g", "u1", "b"),
        members("g", "blacklist", "add", ["u1"]),
        send("g", "u1", "c"),
        members("g", "blacklist", "remove", ["u1"]),
        send("g", "u1", "d"),
    ]
    reasons = [r["r"] for r in apply(store, ops)]
    assert reasons == [c.R_CHANNEL_NOT_EXIST, 1, 1, 1, c.R_IN_BLACKLIST, 1, 1]
    assert stored_seqs(store, "g") == [1, 2]


# -- determinism ---------------------------------------------------------------------------------------


def _mixed_ops() -> list[list[Any]]:
    """A log of entries touching every op type, rejects and bad ops included."""
    return [
        [
            {"t": c.OP_TOKEN, "uid": "u1", "flag": 0, "level": 1, "token": "t0"},
            {"t": c.OP_TOKEN, "uid": "u1", "flag": 1, "level": 0, "token": "t1"},
            channel("g1", subs=["u1", "u2", "u3"], large=1),
            members("g2", "subscribers", "add", ["u2"]),
        ],
        [send("g1", "u1", f"a{n}", mid=10 + n) for n in range(4)]
        + [person_send("u1", "u2", "p1"), send("g2", "u1", "rej", mid=30), {"t": "bogus"}, 7],
        [
            members("g1", "whitelist", "set", ["u2"]),
            send("g1", "u1", "wl", mid=40),
            send("g1", "u2", "wl", mid=41),
            members("g1", "blacklist", "add", ["u3"]),
            channel("g2", send_ban=1),
            send("g2", "u2", "sb", mid=42),
            person_send("u2", "u1", "p2"),
        ],
        [
            {"t": c.OP_CHANNEL_DELETE, "cid": "g2", "ct": GROUP},
            channel("g1", reset=True, subs=["u4"]),
            send("g1", "u4", "after-reset", mid=50),
            members("u2", "blacklist", "add", ["u1"], ct=PERSON),
            person_send("u1", "u2", "p3"),
        ],
    ]


def test_same_log_gives_byte_identical_stores(tmp_path: os.PathLike[str]) -> None:
    stores = [Store(os.path.join(tmp_path, name), map_size=16 << 20) for name in ("a", "b")]
    log = _mixed_ops()
    try:
        outputs = [[apply(s, entry) for entry in log] for s in stores]
        assert outputs[0] == outputs[1]
        # The log really exercised rejects and bad ops, not only the happy path.
        assert [[r["r"] for r in entry] for entry in outputs[0]] == [
            [1, 1, 1, 1],
            [1, 1, 1, 1, 1, 3, 15, 15],
            [1, 13, 1, 1, 1, 25, 1],
            [1, 1, 13, 1, 4],
        ]
        dumps = [dump_all(s) for s in stores]
        assert dumps[0] == dumps[1]
        assert all(dumps[0][name] for name in ("messages", "channels", "subscribers", "users", "dedup"))
    finally:
        for s in stores:
            s.close()


_uid = st.sampled_from(["u1", "u2", "u3"])
_group = st.sampled_from(["g1", "g2"])
_log_op = st.one_of(
    st.builds(lambda g, u, n: send(g, u, f"c{n}", mid=n + 1), _group, _uid, st.integers(0, 5)),
    st.builds(lambda a, b, n: person_send(a, b, f"p{n}"), _uid, _uid, st.integers(0, 5)),
    st.builds(
        members,
        _group,
        st.sampled_from(c.MEMBER_LISTS),
        st.sampled_from(c.MEMBER_ACTIONS),
        st.lists(_uid, max_size=3),
    ),
    st.builds(
        lambda g, flag, value: channel(g, **{flag: value}),
        _group,
        st.sampled_from(["ban", "disband", "send_ban", "large"]),
        st.integers(0, 1),
    ),
    st.builds(lambda g: {"t": c.OP_CHANNEL_DELETE, "cid": g, "ct": GROUP}, _group),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log=st.lists(st.lists(_log_op, max_size=6), max_size=5))
def test_any_log_gives_byte_identical_stores(tmp_path: os.PathLike[str], log: list[list[Any]]) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        stores = [Store(os.path.join(root, name), map_size=16 << 20) for name in ("a", "b")]
        try:
            results = [[apply(s, entry) for entry in log] for s in stores]
            assert results[0] == results[1]
            assert dump_all(stores[0]) == dump_all(stores[1])
        finally:
            for s in stores:
                s.close()


# -- permissions ---------------------------------------------------------------------------------------

PERMISSION_CASES: dict[str, tuple[list[Any], dict[str, Any], int]] = {
    "group missing": ([], send("g", "u1", "m"), c.R_CHANNEL_NOT_EXIST),
    "not subscriber": ([members("g", "subscribers", "add", ["u2"])], send("g", "u1", "m"), 3),
    "blacklist": (
        [members("g", "subscribers", "add", ["u1"]), members("g", "blacklist", "add", ["u1"])],
        send("g", "u1", "m"),
        4,
    ),
    "whitelist without sender": (
        [members("g", "subscribers", "add", ["u1", "u2"]), members("g", "whitelist", "add", ["u2"])],
        send("g", "u1", "m"),
        13,
    ),
    "ban": ([channel("g", ban=1, subs=["u1"])], send("g", "u1", "m"), 19),
    "disband": ([channel("g", disband=1, subs=["u1"])], send("g", "u1", "m"), 24),
    "send_ban": ([channel("g", send_ban=1, subs=["u1"])], send("g", "u1", "m"), 25),
    "unsupported type": (
        [members("c", "subscribers", "add", ["u1"], ct=3)],
        send("c", "u1", "m", ct=3),
        23,
    ),
    "person wrong fake id": (
        [],
        send("u1@u2", "u1", "m", ct=PERSON, to="u2"),  # the stored id is u2@u1
        16,
    ),
    "person without receiver": ([], send(c.person_channel_id("u1", "u2"), "u1", "m", ct=PERSON), 16),
    "person receiver blacklist": (
        [members("u2", "blacklist", "add", ["u1"], ct=PERSON)],
        person_send("u1", "u2", "m"),
        4,
    ),
    "person receiver whitelist": (
        [members("u2", "whitelist", "add", ["u3"], ct=PERSON)],
        person_send("u1", "u2", "m"),
        13,
    ),
    "person ban": (
        [channel(c.person_channel_id("u1", "u2"), ct=PERSON, ban=1)],
        person_send("u1", "u2", "m"),
        19,
    ),
}


@pytest.mark.parametrize("case", list(PERMISSION_CASES))
def test_permission_reason(store: Store, case: str) -> None:
    setup, op, reason = PERMISSION_CASES[case]
    assert all(r["r"] == c.R_SUCCESS for r in apply(store, setup))
    before = dump_all(store)
    assert apply(store, [op]) == [{"r": reason}]
    assert Reason(reason).value == reason
    # A rejected send writes nothing: no message, no seq, no dedup row, no subscriber.
    assert dump_all(store) == before


def test_permission_allows_the_right_sender(store: Store) -> None:
    apply(store, [members("g", "subscribers", "add", ["u1", "u2"]), members("g", "whitelist", "add", ["u2"])])
    apply(store, [members("u2", "blacklist", "add", ["u1"], ct=PERSON)])
    results = apply(store, [send("g", "u2", "m"), person_send("u2", "u1", "m"), person_send("u3", "u2", "m")])
    assert [r["r"] for r in results] == [1, 1, 1]


def test_system_uid_bypasses_every_check(store: Store) -> None:
    apply(
        store,
        [channel("g", ban=1, disband=1, send_ban=1, subs=["u1"]), members("g", "blacklist", "add", ["sys"])],
    )
    with store.write() as txn:
        txn.set_meta("system_uids", ["sys"])
    results = apply(
        store,
        [
            send("g", "sys", "m1"),
            send("g", "u1", "m2"),
            send("nowhere", "sys", "m3"),
            send("anything", "sys", "m4", ct=PERSON),
            send("c", "sys", "m5", ct=3),  # an unsupported type stays unsupported, system or not
        ],
    )
    assert [r["r"] for r in results] == [1, 24, 1, 1, 23]
    assert stored_seqs(store, "g") == [1]


# -- bad ops -------------------------------------------------------------------------------------------

BAD_OPS: dict[str, tuple[Any, str]] = {
    "not a map": ([1, 2], "op must be a map"),
    "none": (None, "op must be a map"),
    "unknown type": ({"t": "explode"}, "unknown op type"),
    "no type": ({"cid": "g"}, "unknown op type"),
    "over-long uid": ({**send("g", "u" * (c.MAX_UID_BYTES + 1), "m")}, "from"),
    "over-long cid": ({**send("g" * 300, "u1", "m")}, "cid"),
    "empty cmn": ({**send("g", "u1", "")}, "cmn"),
    "payload not bytes": ({**send("g", "u1", "m"), "payload": "text"}, "payload"),
    "payload too big": ({**send("g", "u1", "m"), "payload": b"x" * (c.MAX_PAYLOAD_BYTES + 1)}, "payload"),
    "bool channel type": ({**send("g", "u1", "m"), "ct": True}, "ct"),
    "bool mid": ({**send("g", "u1", "m"), "mid": False}, "mid"),
    "negative mid": ({**send("g", "u1", "m"), "mid": -1}, "mid"),
    "float ts": ({**send("g", "u1", "m"), "ts": 1.5}, "ts"),
    "channel type 256": ({**send("g", "u1", "m"), "ct": 256}, "ct"),
    "int as api flag": ({**send("g", "u1", "m"), "api": 1}, "api"),
    "bad member list": (members("g", "graylist", "add", ["u1"]), "list"),
    "bad member action": (members("g", "subscribers", "promote", ["u1"]), "action"),
    "uid not a string": (members("g", "subscribers", "add", ["u1", 5]), "uids"),  # type: ignore[list-item]
    "empty uid in list": (members("g", "subscribers", "add", [""]), "uids"),
    "ban flag 2": (channel("g", ban=2), "ban"),
    "subs not a list": (channel("g", subs="u1"), "subs"),
    "token not a string": ({"t": c.OP_TOKEN, "uid": "u", "flag": 0, "level": 0, "token": b"x"}, "token"),
    "delete without type": ({"t": c.OP_CHANNEL_DELETE, "cid": "g"}, "ct"),
}


# `@` joins the two uids of a person channel's stored id: no uid may hold one (issue 10). The rule is checked
# where uids enter and by every op constructor, not by apply: entries committed before it must apply alike
# on every node and version.
AT_UID_OPS: dict[str, tuple[Any, str]] = {
    "sender with @": (person_send("eve@mail.com", "bob", "m"), "from"),
    "receiver with @": (person_send("eve", "mail.com@bob", "m"), "to"),
    "token uid with @": ({"t": c.OP_TOKEN, "uid": "a@b", "flag": 0, "level": 0, "token": "t"}, "uid"),
    "member with @": (members("g", "subscribers", "add", ["u1", "a@b"]), "uids"),
    "subscriber with @": (channel("g", subs=["a@b"]), "subs"),
    "device quit uid with @": ({"t": c.OP_DEVICE_QUIT, "uid": "a@b", "flag": 0}, "uid"),
    "conversation uid with @": (
        {"t": c.OP_CONVERSATION, "action": "clear", "uid": "a@b", "cid": "g", "ct": GROUP},
        "uid",
    ),
    "presence uid with @": (
        {
            "t": c.OP_PRESENCE,
            "node": 1,
            "epoch": 1,
            "changes": [{"uid": "a@b", "conn": 1, "flag": 0, "level": 0, "online": True}],
        },
        "uid",
    ),
}


@pytest.mark.parametrize("case", list(AT_UID_OPS))
def test_an_op_with_an_at_uid_is_refused_before_it_is_proposed(case: str) -> None:
    op, field = AT_UID_OPS[case]
    with pytest.raises(c.BadCommand, match=field):
        c.check_op(op)


@pytest.mark.parametrize("case", list(AT_UID_OPS))
def test_apply_does_not_judge_an_op_by_the_later_at_rule(store: Store, case: str) -> None:
    op, _field = AT_UID_OPS[case]
    [result] = apply(store, [op])
    assert "must not contain" not in result.get("err", "")


@pytest.mark.parametrize("case", list(BAD_OPS))
def test_bad_op_becomes_an_error_result(store: Store, case: str) -> None:
    op, field = BAD_OPS[case]
    before = dump_all(store)
    [result] = apply(store, [op])
    assert set(result) == {"r", "err"}
    assert result["r"] == c.R_SYSTEM_ERROR
    assert field in result["err"]
    assert dump_all(store) == before


def test_bad_op_among_good_ones_leaves_them_applied(store: Store) -> None:
    apply(store, [members("g", "subscribers", "add", ["u1"])])
    results = apply(
        store,
        [
            send("g", "u1", "a", mid=1),
            "garbage",
            {**send("g", "u1", "b"), "payload": 3},
            send("g", "u1", "c", mid=2),
        ],
    )
    assert [r["r"] for r in results] == [1, 15, 15, 1]
    assert [r.get("seq") for r in results] == [1, None, None, 2]
    assert stored_seqs(store, "g") == [1, 2]


def test_members_on_a_missing_group(store: Store) -> None:
    results = apply(
        store,
        [
            members("g", "blacklist", "add", ["u1"]),
            members("g", "subscribers", "remove", ["u1"]),
            {"t": c.OP_CHANNEL_DELETE, "cid": "g", "ct": GROUP},
        ],
    )
    assert [r["r"] for r in results] == [5, 5, 5]
    with store.read() as txn:
        assert txn.channel(keys.channel_key("g", GROUP)) is None


def test_decode_entry_rejects_garbage() -> None:
    assert c.decode_entry(c.encode_entry([cast(c.Op, {"t": "x"})])) == [{"t": "x"}]
    with pytest.raises(c.BadCommand):
        c.decode_entry(b"\xff\x00garbage")
    with pytest.raises(c.BadCommand):
        c.decode_entry(cbor2.dumps({"t": "send"}))


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=300),
    st.binary(max_size=64),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
_field_value = st.one_of(_value, _uid, _group, st.integers(0, 3), st.just(b"payload"))
_near_op = st.builds(
    lambda kind, fields: {"t": kind, **fields},
    st.sampled_from([c.OP_SEND, c.OP_TOKEN, c.OP_CHANNEL, c.OP_MEMBERS, c.OP_CHANNEL_DELETE, "other"]),
    st.dictionaries(
        st.sampled_from(
            [
                *("cid", "ct", "from", "cmn", "mid", "ts", "setting", "payload", "to", "system", "uid"),
                *("flag", "level", "token", "ban", "disband", "send_ban", "large", "subs", "reset"),
                *("list", "action", "uids"),
            ]
        ),
        _field_value,
    ),
)


def test_arbitrary_cbor_values_never_make_apply_raise(tmp_path: os.PathLike[str]) -> None:
    s = Store(os.path.join(tmp_path, "fuzz"), map_size=64 << 20)
    seen: set[int] = set()

    @settings(max_examples=300, deadline=None)
    @given(ops=st.lists(st.one_of(_value, _near_op, _log_op), max_size=8))
    def check(ops: list[Any]) -> None:
        # Only what survives CBOR reaches apply from the log.
        decoded = c.decode_entry(cbor2.dumps(ops))
        results = apply(s, decoded)
        assert len(results) == len(decoded)
        for result in results:
            assert isinstance(result["r"], int)
            seen.add(result["r"])

    try:
        check()
    finally:
        s.close()
    assert c.R_SYSTEM_ERROR in seen and c.R_SUCCESS in seen


def test_check_op_names_a_surrogate_field_instead_of_crashing() -> None:
    # json.loads('"\\ud800"') yields such a string, so the HTTP API can hand one to check_op.
    with pytest.raises(c.BadCommand, match="cid"):
        c.check_op({"t": c.OP_CHANNEL_DELETE, "cid": "\ud800", "ct": GROUP})


def test_person_channel_between_two_long_valid_uids(store: Store) -> None:
    alice, bob = "a" * c.MAX_UID_BYTES, "b" * c.MAX_UID_BYTES  # the longest uids CONNECT accepts
    # With the longest client_msg_no too, the dedup key is the longest key apply writes: it must fit LMDB.
    cmn = "c" * c.MAX_ID_BYTES
    [result] = apply(store, [person_send(alice, bob, cmn)])
    assert (result["r"], result.get("seq")) == (c.R_SUCCESS, 1)
    assert apply(store, [person_send(alice, bob, cmn)])[0]["dup"] is True
    [too_long] = apply(store, [person_send(alice + "a", bob, "m2")])
    assert too_long["r"] == c.R_SYSTEM_ERROR


# -- person channel ids and reason codes ----------------------------------------------------------------


def test_person_channel_id_follows_the_protocol_rule() -> None:
    # crc32("a") = 0xe8b7be43 > crc32("b") = 0x71beeff9: the crc decides, against byte order.
    assert c.person_channel_id("a", "b") == c.person_channel_id("b", "a") == "a@b"
    # crc32("u2") > crc32("u1"); crc32("bob") > crc32("alice").
    assert c.person_channel_id("u1", "u2") == "u2@u1"
    assert c.person_channel_id("alice", "bob") == "bob@alice"
    # "plumless" and "buckeroo" share a crc32: the bytes break the tie.
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    assert c.person_channel_id("buckeroo", "plumless") == c.person_channel_id("plumless", "buckeroo")
    assert c.person_channel_id("buckeroo", "plumless") == "plumless@buckeroo"
    assert c.person_channel_id("x", "x") == "x@x"


@given(a=st.text(min_size=1, max_size=20), b=st.text(min_size=1, max_size=20))
def test_person_channel_id_is_the_same_whoever_sends(a: str, b: str) -> None:
    fake = c.person_channel_id(a, b)
    assert fake == c.person_channel_id(b, a)
    first = (zlib.crc32(a.encode()), a.encode()) > (zlib.crc32(b.encode()), b.encode())
    assert fake == (f"{a}@{b}" if first else f"{b}@{a}")


_valid_uid = st.text(min_size=1, max_size=8).filter(c.valid_uid)


@given(pair=st.tuples(_valid_uid, _valid_uid), other=st.tuples(_valid_uid, _valid_uid))
def test_person_channel_ids_of_valid_uids_never_collide(
    pair: tuple[str, str], other: tuple[str, str]
) -> None:
    # Without `@` in uids, the stored id names exactly one unordered pair.
    same_pair = sorted(pair) == sorted(other)
    assert (c.person_channel_id(*pair) == c.person_channel_id(*other)) == same_pair


def test_person_channel_ids_collide_once_a_uid_holds_the_separator() -> None:
    # Why valid_uid exists: these two pairs would share one stored channel.
    assert c.person_channel_id("eve", "mail.com@bob") == c.person_channel_id("eve@mail.com", "bob")
    assert not c.valid_uid("mail.com@bob") and c.valid_uid("eve")


def test_reason_constants_match_the_protocol() -> None:
    constants = {name[2:]: value for name, value in vars(c).items() if name.startswith("R_")}
    assert len(constants) >= 12
    for name, value in constants.items():
        assert Reason[name] == value, name
