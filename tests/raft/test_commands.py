"""raft/commands.py: one constructor per op, checked as apply checks it; old journal entries still apply."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from raft import commands as c
from raft.apply import APPLIERS, apply_ops
from storage import keys
from storage.store import Store

GROUP, PERSON = c.CHANNEL_GROUP, c.CHANNEL_PERSON


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    yield s
    s.close()


def a_send(**overrides: Any) -> c.Op:
    fields: dict[str, Any] = {
        "channel_id": c.person_channel_id("alice", "bob"),
        "channel_type": PERSON,
        "sender": "alice",
        "receiver": "bob",
        "client_msg_no": "m1",
        "message_id": 42,
        "timestamp": 1_700_000_000,
        "setting": 0,
        "payload": b"hi",
    }
    return c.send_op(**{**fields, **overrides})


EVENT: dict[str, Any] = {
    "channel_id": "g1",
    "channel_type": GROUP,
    "sender": "bot",
    "client_msg_no": "m1",
    "event_id": "e1",
    "event_key": "main",
    "event_type": "stream.snapshot",
    "visibility": "",
    "occurred_at": 1,
    "payload": b"{}",
}

# Every op type, built by its constructor.
BUILT: dict[str, Callable[[], c.Op]] = {
    c.OP_SEND: a_send,
    c.OP_TOKEN: lambda: c.token_op("alice", "secret", 1, 0),
    c.OP_DEVICE_QUIT: lambda: c.device_quit_op("alice", -1),
    c.OP_SYSTEM_UIDS: lambda: c.system_uids_op("add", ["sys"]),
    c.OP_CHANNEL: lambda: c.channel_op("g1", GROUP, ban=0, disband=0, send_ban=0, large=0, subscribers=["a"]),
    c.OP_CHANNEL_DELETE: lambda: c.channel_delete_op("g1", GROUP),
    c.OP_MEMBERS: lambda: c.members_op("blacklist", "add", "g1", GROUP, ["x"]),
    c.OP_CONVERSATION: lambda: c.conversation_op("set_unread", "a", "g1", GROUP, unread=2),
    c.OP_PRESENCE: lambda: c.presence_op(1, 5, [c.presence_change("alice", 3, 1, 0, True)]),
    c.OP_NODE_EPOCH: lambda: c.node_epoch_op(1, 5),
    c.OP_NODE_DOWN: lambda: c.node_down_op(1, 5),
    c.OP_HANDLER_STATE: lambda: c.handler_state_op("audit", False),
    c.OP_WEBHOOK_CONFIG: lambda: c.webhook_config_op("http://h/", list(c.WEBHOOK_EVENTS), 10),
    c.OP_WEBHOOK_ADVANCE: lambda: c.webhook_advance_op("notify", 0, 1),
    c.OP_WEBHOOK_DEADLETTER: lambda: c.webhook_deadletter_op("online", 0, 1, "HTTP 500", 5),
    c.OP_DEADLETTER_REMOVE: lambda: c.deadletter_remove_op("offline", [1, 2]),
    c.OP_CMD_SYNC: lambda: c.cmd_sync_op("alice", 3),
    c.OP_CMD_ACK: lambda: c.cmd_ack_op("alice"),
    c.OP_MSG_EVENT: lambda: c.msg_event_op(
        channel_id="g1",
        channel_type=GROUP,
        sender="bot",
        client_msg_no="m1",
        event_id="e1",
        event_key="main",
        event_type="stream.close",
        visibility="",
        occurred_at=1,
        payload=b"{}",
        snapshots={"main": b'{"kind":"text","text":"hi"}'},
    ),
}


def test_every_op_type_apply_knows_has_a_constructor() -> None:
    assert set(BUILT) == set(APPLIERS)


@pytest.mark.parametrize("kind", sorted(BUILT))
def test_a_constructed_op_passes_apply(store: Store, kind: str) -> None:
    op = BUILT[kind]()
    assert op["t"] == kind
    with store.write() as txn:
        [result] = apply_ops(txn, [op], 1)
    # Validated and applied (a group that does not exist yet is apply's answer, not a bad op).
    assert result["r"] != c.R_SYSTEM_ERROR, result


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: a_send(channel_id="x" * (c.MAX_CHANNEL_ID_BYTES + 1)), "cid"),
        (lambda: a_send(client_msg_no=""), "cmn"),
        (lambda: a_send(sender="s" * (c.MAX_UID_BYTES + 1)), "from"),
        (lambda: a_send(payload=b"x" * (c.MAX_PAYLOAD_BYTES + 1)), "payload"),
        (lambda: c.token_op("alice", "t" * (c.MAX_TOKEN_BYTES + 1), 0, 0), "token"),
        (lambda: c.device_quit_op("alice", -2), "flag"),
        (lambda: c.members_op("friends", "add", "g1", GROUP, []), "list"),
        (lambda: c.conversation_op("mark", "a", "g1", GROUP), "action"),
        (lambda: c.presence_op(1, 1, [c.presence_change("", 1, 0, 0, True)]), "uid"),
        (lambda: c.presence_op(1, 1, [{}] * (c.MAX_PRESENCE_CHANGES + 1)), "changes"),
        (lambda: c.webhook_config_op("http://h/", ["msg.other"], 10), "events"),
        (lambda: c.webhook_deadletter_op("online", 0, 1, "e" * 1025, 1), "error"),
        (lambda: c.deadletter_remove_op("nowhere", [1]), "stream"),
        (lambda: c.msg_event_op(**{**EVENT, "event_type": "stream.delta"}), "delta"),
        (lambda: c.msg_event_op(**{**EVENT, "event_key": "k" * 65}), "key"),
        (lambda: c.msg_event_op(**{**EVENT, "error": "e" * 1025}), "err"),
    ],
)
def test_a_constructor_refuses_what_apply_would_refuse(build: Callable[[], c.Op], field: str) -> None:
    with pytest.raises(c.BadCommand, match=field):
        build()


def test_constructors_are_the_only_public_op_builders() -> None:
    """Each returns Op; the proposer takes nothing else (mypy holds node/ to that)."""
    constructors = [
        fn
        for name, fn in vars(c).items()
        if name.endswith("_op") and name != "check_op" and inspect.isfunction(fn)
    ]
    assert len(constructors) == len(BUILT)
    assert all(inspect.signature(fn).return_annotation in ("Op", c.Op) for fn in constructors)


def test_a_send_from_an_older_journal_with_node_and_conn_still_applies(store: Store) -> None:
    """Sends once carried the proposing node and connection; the log no longer does, apply ignores them."""
    old = {**a_send(), "node": 1, "conn": 7}
    with store.write() as txn:
        [result] = apply_ops(txn, [old], 1)
    assert result["r"] == c.R_SUCCESS and result["seq"] == 1
    with store.read() as txn:
        [row] = txn.messages(keys.channel_key(old["cid"], PERSON), 1, 1, 1)
    assert "node" not in row and "conn" not in row
    assert "node" not in a_send() and "conn" not in a_send()


@pytest.mark.parametrize(
    ("stored", "viewer", "shown"),
    [
        ("alice@bob", "alice", "bob"),
        ("alice@bob", "bob", "alice"),
        ("a@b@c", "a@b", "c"),  # matched whole (uids may no longer hold "@"; older stores might)
        ("a@b@c", "c", "a@b"),
        ("g1", "alice", "g1"),
    ],
)
def test_person_peer_is_the_other_party(stored: str, viewer: str, shown: str) -> None:
    assert c.person_peer(stored, viewer) == shown


def test_person_peer_inverts_person_channel_id() -> None:
    for a, b in (("alice", "bob"), ("u1", "u2"), ("x", "yy")):
        stored = c.person_channel_id(a, b)
        assert c.person_peer(stored, a) == b and c.person_peer(stored, b) == a
