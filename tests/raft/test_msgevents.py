"""raft/msgevents.py: persisted message events fold into one state row per streamed message, deterministically
and idempotently by event_id; a terminal key never changes again; stream.finish ends every key."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from raft import commands as c
from raft.apply import apply_ops
from storage import keys
from storage.store import Store

GROUP = c.CHANNEL_GROUP


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    with s.write() as txn:
        apply_ops(
            txn,
            [c.channel_op("g1", GROUP, ban=0, disband=0, send_ban=0, large=0, subscribers=["alice", "bot"])],
            1,
        )
    yield s
    s.close()


def apply(store: Store, op: c.Op, index: int) -> dict[str, Any]:
    with store.write() as txn:
        [result] = apply_ops(txn, [op], index)
    return result


def anchor(store: Store, client_msg_no: str, *, stream: bool = True, index: int = 2) -> None:
    op = c.send_op(
        channel_id="g1",
        channel_type=GROUP,
        sender="bot",
        receiver="",
        client_msg_no=client_msg_no,
        message_id=1000 + index,
        timestamp=1,
        setting=c.SETTING_STREAM if stream else 0,
        payload=b"{}",
        api=True,
    )
    assert apply(store, op, index)["r"] == c.R_SUCCESS


def event(event_id: str, event_type: str, **overrides: Any) -> c.Op:
    fields: dict[str, Any] = {
        "channel_id": "g1",
        "channel_type": GROUP,
        "sender": "bot",
        "client_msg_no": "m1",
        "event_id": event_id,
        "event_key": c.EVENT_KEY_FINISH if event_type == c.EVENT_STREAM_FINISH else "main",
        "event_type": event_type,
        "visibility": "",
        "occurred_at": 5,
        "payload": b'{"kind":"text","text":"hel"}',
    }
    return c.msg_event_op(**{**fields, **overrides})


def state(store: Store, client_msg_no: str = "m1") -> dict[str, Any]:
    with store.read() as txn:
        row = txn.get("msg_events", keys.msg_event_key(keys.channel_key("g1", GROUP), "bot", client_msg_no))
    assert isinstance(row, dict)
    return row


def test_events_take_growing_seqs_and_a_repeated_event_id_gets_its_first_answer(store: Store) -> None:
    anchor(store, "m1")
    first = apply(store, event("e1", c.EVENT_STREAM_SNAPSHOT), 3)
    assert first == {"r": c.R_SUCCESS, "seq": 1, "key": "main", "st": "open", "mid": 1002}
    assert apply(store, event("e2", "tool.call", event_key="tool"), 4)["seq"] == 2
    again = apply(store, event("e1", c.EVENT_STREAM_SNAPSHOT, payload=b"{}"), 5)
    assert again == {**first, "dup": True}
    assert state(store)["keys"]["main"]["snap"] == b'{"kind":"text","text":"hel"}'  # not replaced
    assert state(store)["seq"] == 2


def test_a_terminal_event_keeps_its_merged_snapshot_and_the_key_never_changes_again(store: Store) -> None:
    anchor(store, "m1")
    merged = b'{"kind":"text","text":"hello"}'
    closed = apply(store, event("e1", c.EVENT_STREAM_ERROR, snapshots={"main": merged}, error="boom"), 3)
    assert closed["st"] == c.STATUS_ERROR and closed["seq"] == 1
    later = apply(store, event("e2", c.EVENT_STREAM_SNAPSHOT), 4)
    assert later == {
        "r": c.R_SUCCESS,
        "seq": 1,
        "key": "main",
        "st": c.STATUS_ERROR,
        "mid": 1002,
        "final": True,
    }
    main = state(store)["keys"]["main"]
    assert main["snap"] == merged and main["err"] == "boom" and state(store)["seq"] == 1


def test_finish_ends_every_open_key_with_the_text_its_deltas_built(store: Store) -> None:
    anchor(store, "m1")
    apply(store, event("e1", "tool.call", event_key="tool"), 3)
    text = b'{"kind":"text","text":"all of it"}'
    done = apply(store, event("e2", c.EVENT_STREAM_FINISH, payload=b"{}", snapshots={"main": text}), 4)
    assert done["st"] == c.STATUS_CLOSED and done["key"] == c.EVENT_KEY_FINISH and done["seq"] == 2
    lanes = state(store)["keys"]
    assert {k: v["st"] for k, v in lanes.items()} == {
        "tool": "closed",
        "main": "closed",
        "__finish__": "closed",
    }
    assert lanes["main"]["snap"] == text
    assert apply(store, event("e3", "tool.call", event_key="other"), 5)["final"] is True
    assert "other" not in state(store)["keys"]


def test_events_for_a_message_that_is_not_a_stream_or_not_stored_are_refused(store: Store) -> None:
    anchor(store, "plain", stream=False)
    for client_msg_no in ("plain", "nowhere"):
        result = apply(store, event("e1", c.EVENT_STREAM_SNAPSHOT, client_msg_no=client_msg_no), 3)
        assert result["r"] == c.R_NOT_ALLOW_SEND and client_msg_no in result["err"]


def test_same_log_same_state(tmp_path: os.PathLike[str]) -> None:
    """Deterministic: two stores fed the same entries hold byte-identical event rows."""
    rows = []
    for name in ("a", "b"):
        s = Store(os.path.join(tmp_path, name), map_size=64 << 20)
        with s.write() as txn:
            apply_ops(
                txn,
                [c.channel_op("g1", GROUP, ban=0, disband=0, send_ban=0, large=0, subscribers=["bot"])],
                1,
            )
        anchor(s, "m1")
        apply(s, event("e1", c.EVENT_STREAM_SNAPSHOT), 3)
        apply(s, event("e2", c.EVENT_STREAM_FINISH, snapshots={"main": b"x", "tool": b"y"}), 4)
        with s.read() as txn:
            rows.append(list(txn.raw_items("msg_events")))
        s.close()
    assert rows[0] == rows[1] and rows[0]


def test_a_stream_at_its_event_cap_still_ends(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c, "MAX_PERSISTED_EVENTS", 3)
    anchor(store, "m1")
    for i in range(3):
        assert apply(store, event(f"s{i}", c.EVENT_STREAM_SNAPSHOT), 3 + i)["r"] == c.R_SUCCESS
    assert apply(store, event("s3", c.EVENT_STREAM_SNAPSHOT), 6)["r"] != c.R_SUCCESS  # the cap holds
    closed = apply(store, event("close", c.EVENT_STREAM_CLOSE), 7)
    assert closed["r"] == c.R_SUCCESS and closed["st"] == c.STATUS_CLOSED  # but an ending is always taken
    done = apply(store, event("finish", c.EVENT_STREAM_FINISH), 8)
    assert done["r"] == c.R_SUCCESS and state(store)["keys"][c.EVENT_KEY_FINISH]["st"] == c.STATUS_CLOSED


def test_two_senders_streams_with_the_same_client_msg_no_keep_apart(store: Store) -> None:
    anchor(store, "m1")  # the bot's
    mine = c.send_op(
        channel_id="g1",
        channel_type=GROUP,
        sender="alice",
        receiver="",
        client_msg_no="m1",  # unique per sender only: alice may use the bot's client_msg_no
        message_id=2000,
        timestamp=1,
        setting=c.SETTING_STREAM,
        payload=b"{}",
    )
    assert apply(store, mine, 3)["r"] == c.R_SUCCESS
    assert apply(store, event("e1", c.EVENT_STREAM_SNAPSHOT), 4)["seq"] == 1
    assert apply(store, event("e1", c.EVENT_STREAM_SNAPSHOT, sender="alice"), 5)["seq"] == 1  # not a dup
    chan = keys.channel_key("g1", GROUP)
    with store.read() as txn:
        bots = txn.get("msg_events", keys.msg_event_key(chan, "bot", "m1"))
        alices = txn.get("msg_events", keys.msg_event_key(chan, "alice", "m1"))
    assert bots["seq"] == 1 and alices["seq"] == 1
