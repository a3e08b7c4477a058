"""Command messages (sync_once): a user's queue, /message/sync to fetch it, /message/syncack to acknowledge.

WuKongIM's shapes (`api/message.go`): sync takes `uid`, `message_seq` (unused there too) and `limit` (0: 200)
and answers a bare JSON array of messages; syncack takes `uid` and a non-zero `last_message_seq` and drops
what the user's last sync handed out. Both steps go through Raft (raft/cmdqueue.py), so the two calls may
reach different nodes.
"""

from __future__ import annotations

from typing import Any

from node.api.app import propose
from node.api.fields import UID, F, Json, Route, bad
from node.cluster.proposer import Proposer
from node.shapes import message_json
from raft.cmdqueue import pending
from raft.commands import cmd_ack_op, cmd_sync_op
from storage.store import Store

SYNC_LIMIT_DEFAULT = 200  # WuKongIM's answer to a limit of 0
SYNC_LIMIT_MAX = 10_000


def routes(store: Store, proposer: Proposer) -> dict[str, Route]:
    async def sync(body: Json, query: Any) -> list[Json]:
        limit = body["limit"] or SYNC_LIMIT_DEFAULT
        with store.read() as txn:
            found = pending(txn, body["uid"], limit)
        if not found:
            return []
        # Recorded before answering: a syncack, on whichever node, then drops exactly these.
        await propose(proposer, [cmd_sync_op(body["uid"], found[-1][0])])
        return [message_json(message) for _position, message in found if message]

    async def syncack(body: Json, query: Any) -> Json:
        if not body["last_message_seq"]:
            raise bad("last_message_seq must not be 0")
        await propose(proposer, [cmd_ack_op(body["uid"])])
        return {"status": 200}

    return {
        "/message/sync": Route(
            "POST",
            sync,
            (
                UID,
                F("message_seq", "int", default=0, description="the client's newest command seq (unused)"),
                F("limit", "int", default=0, high=SYNC_LIMIT_MAX, description="0: 200"),
            ),
            summary="A user's command messages (sync_once) not yet acknowledged, oldest first",
        ),
        "/message/syncack": Route(
            "POST",
            syncack,
            (UID, F("last_message_seq", "int", required=True)),
            summary="Acknowledge what the user's last /message/sync answered: none of it comes again",
        ),
    }
