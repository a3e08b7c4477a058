"""Users: login tokens, device logout, online status, system uids."""

from __future__ import annotations

from typing import Any

from node.api.app import propose
from node.api.fields import UID, F, Json, Route, bad
from node.cluster.proposer import Proposer
from node.wire.protocol import Reason
from raft.commands import (
    CHANNEL_PERSON,
    MAX_TOKEN_BYTES,
    SYSTEM_UID,
    device_quit_op,
    system_uids_op,
    token_op,
)
from storage.keys import channel_key
from storage.store import Store


def routes(store: Store, proposer: Proposer) -> dict[str, Route]:
    async def user_token(body: Json, query: Any) -> Json:
        """As WuKongIM's `updateToken`: a banned (or disbanded) user's person channel answers HTTP 200 with
        the reason as `status` (19 ban, 24 disband) and stores nothing, so the user cannot log in."""
        if body["uid"] == SYSTEM_UID:
            raise bad("the system uid takes no token")
        with store.read() as txn:
            person = txn.channel(channel_key(body["uid"], CHANNEL_PERSON)) or {}
        if person.get("ban"):
            return {"status": int(Reason.BAN)}
        if person.get("disband"):
            return {"status": int(Reason.DISBAND)}
        op = token_op(body["uid"], body["token"], body["device_flag"], body["device_level"])
        await propose(proposer, [op])
        return {"status": 200}

    async def device_quit(body: Json, query: Any) -> Json:
        await propose(proposer, [device_quit_op(body["uid"], body["device_flag"])])
        return {"status": 200}

    async def online_status(uids: list[str], query: Any) -> list[Json]:
        online: list[Json] = []
        with store.read() as txn:
            for uid in uids:
                for _node, _conn, row in txn.presence_of(uid):
                    online.append({"uid": uid, "device_flag": row["flag"], "online": 1})
        return online

    async def system_uids_add(body: Json, query: Any) -> Json:
        await propose(proposer, [system_uids_op("add", body["uids"])])
        return {"status": 200}

    async def system_uids_remove(body: Json, query: Any) -> Json:
        await propose(proposer, [system_uids_op("remove", body["uids"])])
        return {"status": 200}

    async def system_uids(body: Json, query: Any) -> list[str]:
        with store.read() as txn:
            return list(txn.meta("system_uids") or [])

    return {
        "/user/token": Route(
            "POST",
            user_token,
            (
                UID,
                F("token", required=True, max_bytes=MAX_TOKEN_BYTES),
                F("device_flag", "int", default=0, high=255),
                F("device_level", "int", default=0, high=1),
            ),
            summary=(
                "Set a device's login token (device_level 1 kicks older logins of that device flag); "
                'a banned user gets {"status": 19} and no token'
            ),
        ),
        "/user/device_quit": Route(
            "POST",
            device_quit,
            (UID, F("device_flag", "int", default=-1, low=-1, high=255)),
            summary="Log a device out (-1: every device) and clear its token",
        ),
        "/user/onlinestatus": Route(
            "POST",
            online_status,
            body="uid_array",
            summary="Online devices among the given uids, cluster-wide",
        ),
        "/user/systemuids_add": Route("POST", system_uids_add, (F("uids", "uids", required=True),)),
        "/user/systemuids_remove": Route("POST", system_uids_remove, (F("uids", "uids", required=True),)),
        "/user/systemuids": Route("GET", system_uids, body="none"),
    }
