"""Channel type 11 (agent) as WuKongIM's code has it: the stored id is `sender@addressed`, its two parties
are its recipients and subscribers, no list or ban of a person channel applies, and no msg.offline event
is written for it. Real LMDB, apply as every node runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from node.pools.channel import ChannelSend, open_send
from node.wire.protocol import Reason
from raft import commands as c
from raft import outbox
from storage import keys
from storage.store import Store
from tests.raft.test_apply import apply, dump_all, members, person_send, send

AGENT = c.CHANNEL_AGENT


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s = Store(os.path.join(tmp_path, "db"), map_size=64 << 20)
    yield s
    s.close()


def agent_send(sender: str, addressed: str, cmn: str, **more: Any) -> dict[str, Any]:
    return send(c.agent_channel_id(sender, addressed), sender, cmn, ct=AGENT, to=addressed, **more)


def test_the_stored_id_names_the_sender_first_so_each_direction_has_its_own() -> None:
    assert c.agent_channel_id("alice", "bot") == "alice@bot"
    assert c.agent_channel_id("bot", "alice") == "bot@alice"
    assert AGENT == 11 and AGENT in c.SUPPORTED_CHANNEL_TYPES


def test_a_question_and_its_answer_are_two_channels_each_with_both_parties(store: Store) -> None:
    question, answer = agent_send("alice", "bot", "q1"), agent_send("bot", "alice", "a1")
    results = apply(store, [question, answer, agent_send("alice", "bot", "q2")])
    assert [(r["r"], r["seq"]) for r in results] == [(1, 1), (1, 1), (1, 2)]
    # A retry is a duplicate within its channel, as on every channel.
    again = apply(store, [agent_send("alice", "bot", "q1")])[0]
    assert again == {**results[0], "dup": True}
    asked, answered = keys.channel_key("alice@bot", AGENT), keys.channel_key("bot@alice", AGENT)
    with store.read() as txn:
        for chan in (asked, answered):
            assert sorted(txn.members("subscribers", chan)) == ["alice", "bot"]
        assert sorted(txn.user_channels("alice")) == [("alice@bot", AGENT), ("bot@alice", AGENT)]
        assert [m["cmn"] for m in txn.messages(asked, 0, 0, 10)] == ["q1", "q2"]
        assert [m["cmn"] for m in txn.messages(answered, 0, 0, 10)] == ["a1"]


PERMISSION_CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any], int]] = {
    # The id of the other direction, or a pair the sender is no party of: refused as a person channel's is.
    "other direction": ([], send("bot@alice", "alice", "m", ct=AGENT, to="bot"), c.R_CHANNEL_ID_ERROR),
    "not a party": ([], send("alice@bot", "mallory", "m", ct=AGENT, to="bot"), c.R_CHANNEL_ID_ERROR),
    "no receiver": ([], send("alice@bot", "alice", "m", ct=AGENT), c.R_CHANNEL_ID_ERROR),
    # WuKongIM's permission.go: an agent channel is public to its parties. The lists a person keeps on
    # its person channel do not apply.
    "receiver's blacklist": (
        [members("bot", "blacklist", "add", ["alice"], ct=c.CHANNEL_PERSON)],
        agent_send("alice", "bot", "m"),
        c.R_SUCCESS,
    ),
    "receiver's whitelist": (
        [members("alice", "whitelist", "add", ["carol"], ct=c.CHANNEL_PERSON)],
        agent_send("bot", "alice", "m"),
        c.R_SUCCESS,
    ),
}


@pytest.mark.parametrize("case", list(PERMISSION_CASES))
def test_permission(store: Store, case: str) -> None:
    setup, op, reason = PERMISSION_CASES[case]
    assert all(r["r"] == c.R_SUCCESS for r in apply(store, setup))
    before = dump_all(store)
    result = apply(store, [op])[0]
    assert result["r"] == reason
    if reason != c.R_SUCCESS:
        assert dump_all(store) == before  # a refused send writes nothing


def test_a_command_to_an_agent_channel_is_queued_for_both_parties(store: Store) -> None:
    op = agent_send("bot", "alice", "cmd")
    op["hf"] = c.HF_SYNC_ONCE
    assert apply(store, [op])[0]["r"] == c.R_SUCCESS
    with store.read() as txn:
        queued = {uid for uid in ("alice", "bot", "carol") if txn.scan("cmd_queue", keys.part(uid))}
    assert queued == {"alice", "bot"}


def test_no_msg_offline_event_for_an_agent_channel_but_msg_notify_as_any_message(store: Store) -> None:
    apply(store, [c.webhook_config_op("http://h/", ["msg.notify", "msg.offline"], 100)])
    apply(store, [agent_send("alice", "bot", "q"), agent_send("bot", "alice", "a")])
    volatile = agent_send("bot", "alice", "v")
    volatile["hf"] = c.HF_NO_PERSIST
    apply(store, [volatile])
    with store.read() as txn:
        assert outbox.head(txn, "notify") == 2
        assert outbox.head(txn, "offline") == 0
    # A person channel's send, the control: it does write one.
    apply(store, [person_send("alice", "bob", "p")])
    with store.read() as txn:
        assert (outbox.head(txn, "notify"), outbox.head(txn, "offline")) == (3, 1)


def test_open_send_stores_under_sender_at_addressed_and_refuses_what_a_person_channel_refuses() -> None:
    sent = open_send(sender="alice", channel_id="bot", channel_type=AGENT, client_msg_no="m", payload=b"x")
    assert isinstance(sent, ChannelSend)
    assert (sent.channel_id, sent.peer, sent.route_key) == ("alice@bot", "bot", "11:alice@bot")
    for addressed in ("alice", "a@b", "", "x" * (c.MAX_UID_BYTES + 1)):
        refused = open_send(
            sender="alice", channel_id=addressed, channel_type=AGENT, client_msg_no="m", payload=b"x"
        )
        assert refused == Reason.CHANNEL_ID_ERROR, addressed
