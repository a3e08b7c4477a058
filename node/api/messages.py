"""Messages: send (one, or one per subscriber), and read a channel's messages back."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import trio

from node.api.fields import CHANNEL, U32, F, Json, Route, bad, stored_channel
from node.pools.channel import SEND, open_send
from node.pools.eventbus import EventPool
from node.shapes import message_json
from node.wire.protocol import SETTING_STREAM, Reason
from raft.apply import Result
from raft.commands import (
    CHANNEL_PERSON,
    CHANNEL_TEMP,
    HF_SYNC_ONCE,
    MAX_CHANNEL_ID_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_UID_BYTES,
    PAIR_CHANNEL_TYPES,
    SYSTEM_UID,
    UID_RULE,
    valid_uid,
)
from storage.keys import channel_key, split_dedup_key
from storage.store import Store, Txn

SYNC_LIMIT_MAX = 10_000
LOOKUPS_MAX = 1000  # seqs, ids or client_msg_nos in one /messages request
NOT_FOUND = {"status": 404, "msg": "message not found"}  # WuKongIM answers HTTP 200 {"status": 404}


def find_by_id(txn: Txn, chan: bytes, message_id: int) -> dict[str, Any] | None:
    """The stored message of `chan` with this message_id. Message ids are not indexed: this walks the
    channel's dedup rows (one small row per message), so it costs O(messages in the channel)."""
    for _key, row in txn.scan("dedup", chan):
        if isinstance(row, dict) and row.get("mid") == message_id:
            return txn.message(chan, int(row["seq"]))
    return None


def find_by_client_msg_no(txn: Txn, chan: bytes, client_msg_no: str) -> dict[str, Any] | None:
    """The first stored message of `chan` (lowest seq, whoever sent it) with this client_msg_no; walks the
    channel's dedup keys like `find_by_id`."""
    seqs = [
        int(row["seq"])
        for key, row in txn.scan("dedup", chan)
        if isinstance(row, dict) and split_dedup_key(chan, key)[1] == client_msg_no
    ]
    return txn.message(chan, min(seqs)) if seqs else None


def person_login(channel_type: int, login_uid: str, channel_id: str) -> None:
    if channel_type == CHANNEL_PERSON and not login_uid and "@" not in channel_id:
        raise bad("login_uid is required for a person channel")


_FNV64_OFFSET, _FNV64_PRIME = 0xCBF29CE484222325, 0x100000001B3


def temp_channel_id(subscribers: list[str]) -> str:
    """The temporary channel of a uid list, named as WuKongIM names it: FNV-1a 64 of the uids joined by
    commas, in decimal."""
    value = _FNV64_OFFSET
    for byte in ",".join(subscribers).encode():
        value = ((value ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return str(value)


# How long a send waits beyond the commit timeout: the proposer answers every send by then.
ANSWER_SLACK_S = 5.0


# Adds the event fields of streamed messages to a messagesync answer: (channel key, stored rows, the rows as
# answered, event_summary_mode) (node/api/events.py `fill_event_meta`).
EventMeta = Callable[[bytes, list[dict[str, Any]], list[Json], str], None]


def routes(
    store: Store, channel_pool: EventPool[Any], commit_timeout_s: float, event_meta: EventMeta | None = None
) -> dict[str, Route]:
    async def send_one(
        sender: str,
        channel_id: str,
        channel_type: int,
        payload: bytes,
        client_msg_no: str,
        *,
        header: int = 0,
        expire: int = 0,
        subscribers: list[str] | None = None,
        setting: int = 0,
    ) -> Json:
        """One send through the channel pool (same order and batching as client sends), to its commit."""
        done = trio.Event()
        box: list[Result] = []

        def reply(result: Result) -> None:
            box.append(result)
            done.set()

        send = open_send(
            sender=sender,
            channel_id=channel_id,
            channel_type=channel_type,
            client_msg_no=client_msg_no or uuid.uuid4().hex + "0",
            payload=payload,
            setting=setting,
            api=True,
            reply=reply,
            header=header,
            expire=expire,
            subscribers=subscribers,
        )
        if isinstance(send, int):
            return {"r": send}
        await channel_pool.submit(send.route_key, SEND, send)
        with trio.move_on_after(commit_timeout_s + ANSWER_SLACK_S):
            await done.wait()
        if not box:
            return {"r": Reason.SYSTEM_ERROR}
        return {**box[0], "cmn": send.client_msg_no}

    async def message_send(body: Json, query: Any) -> Json:
        header = body["header"]
        subscribers = body["subscribers"]
        sender = body["from_uid"] or SYSTEM_UID
        if subscribers:
            # WuKongIM (`api/message.go`): a message to an explicit uid list is a command to a temporary
            # channel (type 8) named after the list; it is never given with a channel.
            if body["channel_id"]:
                raise bad("channel_id and subscribers cannot both be given")
            if not header & HF_SYNC_ONCE:
                raise bad("subscribers needs header.sync_once 1 (a message to a uid list is a command)")
            channel_id, channel_type = temp_channel_id(subscribers), CHANNEL_TEMP
        else:
            if not body["channel_id"]:
                raise bad("channel_id is required")
            channel_id, channel_type = body["channel_id"], body["channel_type"]
            if channel_type in PAIR_CHANNEL_TYPES and not valid_uid(channel_id):
                # A person or agent channel is named by the receiver's uid.
                raise bad(f"channel_id {UID_RULE}")
        result = await send_one(
            sender,
            channel_id,
            channel_type,
            body["payload"],
            body["client_msg_no"],
            header=header,
            expire=body["expire"],
            subscribers=subscribers or None,
            # The anchor of a streamed message (WuKongIM `is_stream`): `/message/event` appends to it.
            setting=SETTING_STREAM if body["is_stream"] else 0,
        )
        reason = int(result["r"])
        if reason != Reason.SUCCESS:
            raise bad(f"message not sent: {Reason(reason).name.lower()} (reason {reason})")
        data = {"message_id": result["mid"], "message_seq": result["seq"], "client_msg_no": result["cmn"]}
        return {"status": 200, "reason": reason, **data, "data": data}

    async def message_sendbatch(body: Json, query: Any) -> Json:
        results = []
        async with trio.open_nursery() as nursery:

            async def one(uid: str) -> None:
                answer = await send_one(
                    body["from_uid"], uid, CHANNEL_PERSON, body["payload"], "", header=body["header"]
                )
                results.append((uid, answer))

            for uid in body["subscribers"]:
                nursery.start_soon(one, uid)
        failed = [(uid, r) for uid, r in results if r["r"] != Reason.SUCCESS]
        return {"fail_uids": [uid for uid, _ in failed], "reason": [int(r["r"]) for _, r in failed]}

    async def messagesync(body: Json, query: Any) -> Json:
        """WuKongIM's windows: start=end=0 → the newest `limit`; up → [start, end); down → (end, start]."""
        start, end, limit = body["start_message_seq"], body["end_message_seq"], body["limit"]
        chan = channel_key(
            stored_channel(body["login_uid"], body["channel_id"], body["channel_type"]), body["channel_type"]
        )
        with store.read() as txn:
            last = int((txn.channel(chan) or {}).get("last_seq", 0))
            if limit == 0 or last == 0:
                rows: list[Json] = []
            elif start == 0 and end == 0:
                rows = txn.messages(chan, max(1, last - limit + 1), last, limit)
            elif body["pull_mode"] == 1:
                high = min(end - 1, last) if end else last
                rows = txn.messages(chan, max(start, 1), high, limit) if high >= max(start, 1) else []
            elif end > start:
                rows = []
            else:  # down from start (counted from start, then clipped to the last seq)
                top = min(start, last)
                low = max(end + 1, start - limit + 1, 1)
                rows = txn.messages(chan, low, top, limit) if top >= low else []
        shown = [message_json(row) for row in rows]
        if event_meta is not None:
            event_meta(chan, rows, shown, body["event_summary_mode"].strip().lower() or "full")
        return {
            "start_message_seq": start,
            "end_message_seq": end,
            "more": int(limit > 0 and len(rows) >= limit),
            "messages": shown,
        }

    async def max_message_seq(body: Json, query: Any) -> Json:
        stored = stored_channel(body["login_uid"] or "", body["channel_id"], body["channel_type"])
        if body["channel_type"] == CHANNEL_PERSON and "@" not in stored:
            raise bad("login_uid is required for a person channel")
        with store.read() as txn:
            record = txn.channel(channel_key(stored, body["channel_type"])) or {}
        return {"message_seq": int(record.get("last_seq", 0))}

    async def messages(body: Json, query: Any) -> Json:
        """WuKongIM's `/messages`: the messages of one channel by seqs, ids and client_msg_nos (in that
        order, as asked; what is not stored is left out)."""
        person_login(body["channel_type"], body["login_uid"], body["channel_id"])
        stored = stored_channel(body["login_uid"], body["channel_id"], body["channel_type"])
        chan = channel_key(stored, body["channel_type"])

        def read() -> list[Json]:
            found: list[dict[str, Any]] = []
            with store.read() as txn:
                found += [m for seq in body["message_seqs"] or [] if (m := txn.message(chan, seq))]
                found += [m for mid in body["message_ids"] or [] if (m := find_by_id(txn, chan, mid))]
                found += [
                    m for cmn in body["client_msg_nos"] or [] if (m := find_by_client_msg_no(txn, chan, cmn))
                ]
            return [message_json(m) for m in found]

        rows = await trio.to_thread.run_sync(read)  # id lookups walk the channel: off the trio thread
        return {"start_message_seq": 0, "end_message_seq": 0, "more": 0, "messages": rows}

    async def message(body: Json, query: Any) -> Json:
        """WuKongIM's `/message`: one message by message_id (or client_msg_no); {"status": 404} if none."""
        if not body["message_id"] and not body["client_msg_no"]:
            raise bad("message_id or client_msg_no is required")
        person_login(body["channel_type"], body["login_uid"], body["channel_id"])
        stored = stored_channel(body["login_uid"], body["channel_id"], body["channel_type"])
        chan = channel_key(stored, body["channel_type"])

        def read() -> dict[str, Any] | None:
            with store.read() as txn:
                if body["message_id"]:
                    return find_by_id(txn, chan, body["message_id"])
                return find_by_client_msg_no(txn, chan, body["client_msg_no"])

        row = await trio.to_thread.run_sync(read)
        return NOT_FOUND if row is None else message_json(row)

    async def by_client_msg_no(body: Json, query: Any) -> Json:
        """WuKongIM's `GET /message/byclientmsgno`; a person channel is named by its stored id (`a@b`)."""
        chan = channel_key(body["channel_id"], body["channel_type"])

        def read() -> dict[str, Any] | None:
            with store.read() as txn:
                return find_by_client_msg_no(txn, chan, body["client_msg_no"])

        row = await trio.to_thread.run_sync(read)
        return NOT_FOUND if row is None else message_json(row)

    async def last_message(body: Json, query: Any) -> Json:
        """WuKongIM's `GET /channel/last_message`; {"status": 404} for a channel with no message."""
        login_uid = body["login_uid"] or ""
        person_login(body["channel_type"], login_uid, body["channel_id"])
        stored = stored_channel(login_uid, body["channel_id"], body["channel_type"])
        chan = channel_key(stored, body["channel_type"])
        with store.read() as txn:
            last = int((txn.channel(chan) or {}).get("last_seq", 0))
            row = txn.message(chan, last) if last else None
        return NOT_FOUND if row is None else message_json(row)

    channel_named = (
        F("login_uid", "uid", default="", max_bytes=MAX_UID_BYTES),
        F("channel_id", required=True),
        F("channel_type", "int", required=True, low=1, high=255),
    )
    return {
        "/messages": Route(
            "POST",
            messages,
            (
                *channel_named,
                F("message_seqs", "ints32", high=LOOKUPS_MAX),
                F("message_ids", "ints63", high=LOOKUPS_MAX),
                F("client_msg_nos", "strs", high=LOOKUPS_MAX),
            ),
            summary="Messages of one channel by message_seqs, message_ids and client_msg_nos",
        ),
        "/message": Route(
            "POST",
            message,
            (*channel_named, F("message_id", "int", default=0), F("client_msg_no", default="")),
            summary='One message by message_id or client_msg_no; {"status": 404} when not stored',
        ),
        "/message/byclientmsgno": Route(
            "GET",
            by_client_msg_no,
            body="none",
            query=(
                F("channel_id", required=True, max_bytes=MAX_CHANNEL_ID_BYTES),
                F("channel_type", "int", required=True, low=1, high=255),
                F("client_msg_no", required=True),
            ),
            summary='One message by client_msg_no (a person channel by its stored id "a@b")',
        ),
        "/channel/last_message": Route(
            "GET",
            last_message,
            body="none",
            query=channel_named,
            summary='The last message of a channel; {"status": 404} when it has none',
        ),
        "/message/send": Route(
            "POST",
            message_send,
            (
                F("header", "header", default=0),
                F("client_msg_no", default=""),
                F("from_uid", "uid", default="", max_bytes=MAX_UID_BYTES),
                F("channel_id", default=""),
                F("channel_type", "int", default=0, high=255),
                F(
                    "subscribers",
                    "uids",
                    description="a command (header.sync_once 1) to these uids: WuKongIM's temporary channel",
                ),
                F("payload", "b64", required=True, max_bytes=MAX_PAYLOAD_BYTES * 2),
                F("expire", "int", default=0, high=U32),
                F("is_stream", "flag", default=0),
            ),
            summary="Send a message and wait for its commit; answers message_id and message_seq",
        ),
        "/message/sendbatch": Route(
            "POST",
            message_sendbatch,
            (
                F("header", "header", default=0),
                F("from_uid", "uid", required=True, max_bytes=MAX_UID_BYTES),
                F("subscribers", "uids", required=True),
                F("payload", "b64", required=True, max_bytes=MAX_PAYLOAD_BYTES * 2),
            ),
            summary="Send one person message to each subscriber",
        ),
        "/channel/messagesync": Route(
            "POST",
            messagesync,
            (
                F("login_uid", "uid", required=True, max_bytes=MAX_UID_BYTES),
                *CHANNEL,
                F("start_message_seq", "int", default=0, high=U32),
                F("end_message_seq", "int", default=0, high=U32),
                F("limit", "int", default=100, low=0, high=SYNC_LIMIT_MAX),
                F("pull_mode", "flag", default=0),
                F(
                    "event_summary_mode",
                    default="",
                    description="streamed messages: full (snapshots) or basic",
                ),
            ),
            summary="Messages of a channel (pull_mode 1: up from start, end exclusive; 0: down to end)",
        ),
        "/channel/max_message_seq": Route(
            "GET",
            max_message_seq,
            body="none",
            query=(
                F("channel_id", required=True),
                F("channel_type", "int", required=True, low=1, high=255),
                F("login_uid", "uid", max_bytes=MAX_UID_BYTES),
            ),
        ),
    }
