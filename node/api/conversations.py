"""Conversations: a user's channels with unread counts and recent messages; clear, set and delete unread."""

from __future__ import annotations

from typing import Any

from node.api.app import propose
from node.api.fields import CHANNEL, U32, UID, F, Json, Route, parse, stored_channel
from node.cluster.proposer import Proposer
from node.shapes import message_json
from raft.commands import CHANNEL_PERSON, SYSTEM_UID, conversation_op, person_peer
from raft.conversations import conversations_of
from storage.keys import channel_key, part
from storage.store import Store, Txn

CONVERSATIONS_MAX = 1000
RECENT_CHANNELS_MAX = 1000  # channels in one /conversation/syncMessages request
RECENT_MSG_COUNT_MAX = 1000


def user_last_seq(txn: Txn, chan: bytes, uid: str) -> int:
    """The seq of the last message `uid` sent to `chan` (0: none): the dedup rows of this sender and
    channel hold every seq it was given (WuKongIM keeps the same figure per user and channel)."""
    seqs = [int(row["seq"]) for _k, row in txn.scan("dedup", chan + part(uid)) if isinstance(row, dict)]
    return max(seqs, default=0)


RECENT_CHANNEL = (*CHANNEL, F("last_msg_seq", "int", default=0, high=U32))


def routes(store: Store, proposer: Proposer) -> dict[str, Route]:
    async def change(action: str, body: Json, unread: int | None = None) -> Json:
        stored = stored_channel(body["uid"], body["channel_id"], body["channel_type"])
        op = conversation_op(action, body["uid"], stored, body["channel_type"], unread=unread)
        await propose(proposer, [op])
        return {"status": 200}

    async def clear_unread(body: Json, query: Any) -> Json:
        return await change("clear", body)

    async def set_unread(body: Json, query: Any) -> Json:
        return await change("set_unread", body, body["unread"])

    async def conversation_delete(body: Json, query: Any) -> Json:
        return await change("delete", body)

    async def conversation_sync(body: Json, query: Any) -> list[Json]:
        uid = body["uid"]
        known: dict[tuple[str, int], int] = {}
        for item in body["last_msg_seqs"].split("|") if body["last_msg_seqs"] else []:
            parts = item.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                known[(parts[0], int(parts[1]))] = int(parts[2])
        excluded = set(body["exclude_channel_types"] or [])
        result: list[Json] = []
        with store.read() as txn:
            rows = conversations_of(txn, uid)[:CONVERSATIONS_MAX]
            # A person conversation with a system uid is left out, as WuKongIM leaves it out (commands
            # never make a conversation: they live in the command queue, /message/sync).
            system = set(txn.meta("system_uids") or ()) | {SYSTEM_UID}
            for row in rows:
                shown_id = row["channel_id"]
                if row["channel_type"] == CHANNEL_PERSON:
                    shown_id = person_peer(shown_id, uid)
                    if shown_id in system:
                        continue
                client_seq = known.get((shown_id, row["channel_type"]))
                if row["channel_type"] in excluded and client_seq is None:
                    continue
                if row["last_seq"] == 0 or row["last_seq"] <= row["deleted"]:
                    continue  # empty, or deleted and nothing newer since
                if body["version"] and row["version"] <= body["version"]:
                    continue
                unread = row["last_seq"] - row["read"]
                if body["only_unread"] and unread <= 0:
                    continue
                if client_seq is not None:
                    first_seq = client_seq + 1
                elif body["version"] or body["only_unread"]:
                    first_seq = row["read"] + 1
                else:
                    first_seq = 1
                first_seq = max(first_seq, row["deleted"] + 1)
                recents: list[Json] = []
                if body["msg_count"]:
                    low = max(first_seq, row["last_seq"] - body["msg_count"] + 1)
                    if low <= row["last_seq"]:
                        recents = [
                            message_json(m)
                            for m in reversed(
                                txn.messages(row["chan"], low, row["last_seq"], body["msg_count"])
                            )
                        ]
                last = txn.message(row["chan"], row["last_seq"]) or {}
                result.append(
                    {
                        "channel_id": shown_id,
                        "channel_type": row["channel_type"],
                        "unread": max(0, unread),
                        "timestamp": last.get("ts", 0),
                        "last_msg_seq": row["last_seq"],
                        "last_client_msg_no": last.get("cmn", ""),
                        "offset_msg_seq": 0,
                        "readed_to_msg_seq": row["read"],
                        "version": row["version"],
                        "recents": recents,
                    }
                )
        result.sort(key=lambda c: (c["timestamp"], c["version"]), reverse=True)
        if body["page"]:
            start = (body["page"] - 1) * body["page_size"]
            result = result[start : start + body["page_size"]]
        return result

    async def sync_messages(body: Json, query: Any) -> list[Json]:
        """WuKongIM's `/conversation/syncMessages`: recent messages of the channels named. order_by_last 1:
        the newest `msg_count` from last_msg_seq on (newest first); 0: `msg_count` from last_msg_seq up."""
        uid, count, newest_first = body["uid"], body["msg_count"] or 15, bool(body["order_by_last"])
        wanted: list[tuple[str, int, int]] = []
        for item in body["channels"] or []:
            channel = parse(RECENT_CHANNEL, item)
            wanted.append((channel["channel_id"], channel["channel_type"], channel["last_msg_seq"]))
        answer: list[Json] = []
        with store.read() as txn:
            for channel_id, channel_type, from_seq in wanted:
                chan = channel_key(stored_channel(uid, channel_id, channel_type), channel_type)
                last = int((txn.channel(chan) or {}).get("last_seq", 0))
                rows: list[dict[str, Any]] = []
                if last and newest_first:
                    end = from_seq - 1 if from_seq > 0 else 0
                    if end <= last:
                        low = last - count + 1 if last - end > count else end + 1
                        rows = list(reversed(txn.messages(chan, max(low, 1), last, count)))
                elif last:
                    rows = txn.messages(chan, from_seq, last, count)
                answer.append(
                    {
                        "channel_id": channel_id,
                        "channel_type": channel_type,
                        "messages": [message_json(row) for row in rows],
                        "user_last_msg_seq": user_last_seq(txn, chan, uid),
                    }
                )
        return answer

    return {
        "/conversation/syncMessages": Route(
            "POST",
            sync_messages,
            (
                UID,
                F(
                    "channels",
                    "objs",
                    high=RECENT_CHANNELS_MAX,
                    description="[{channel_id, channel_type, last_msg_seq}]",
                ),
                F("msg_count", "int", default=15, high=RECENT_MSG_COUNT_MAX),
                F("order_by_last", "flag", default=0),
            ),
            summary="Recent messages of the given channels, per channel, with the user's last sent seq",
        ),
        "/conversation/sync": Route(
            "POST",
            conversation_sync,
            (
                UID,
                F("version", "int", default=0),
                F("last_msg_seqs", default="", max_bytes=1 << 20),
                F("msg_count", "int", default=0, high=100),
                F("only_unread", "flag", default=0),
                F("exclude_channel_types", "ints"),
                F("page", "int", default=0, high=1 << 20),
                F("page_size", "int", default=100, low=1, high=500),
            ),
            summary="A user's conversations with unread counts and recent messages",
        ),
        "/conversations/clearUnread": Route(
            "POST", clear_unread, (UID, *CHANNEL, F("message_seq", "int", default=0, high=U32))
        ),
        "/conversations/setUnread": Route(
            "POST", set_unread, (UID, *CHANNEL, F("unread", "int", required=True, high=U32))
        ),
        "/conversations/delete": Route("POST", conversation_delete, (UID, *CHANNEL)),
    }
