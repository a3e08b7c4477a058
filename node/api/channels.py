"""Channels: create, update, delete; subscribers, blacklists and whitelists."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from node.api.app import propose
from node.api.fields import CHANNEL, CHANNEL_INFO, F, Json, Route, bad
from node.cluster.proposer import Proposer
from node.wire.protocol import Reason
from raft.commands import CHANNEL_PERSON, UID_RULE, channel_delete_op, channel_op, members_op, valid_uid
from storage.keys import channel_key
from storage.store import Store


def routes(store: Store, proposer: Proposer) -> dict[str, Route]:
    async def channel(body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON and body["subscribers"]:
            raise bad("a person channel takes no subscribers")
        op = channel_op(
            body["channel_id"],
            body["channel_type"],
            ban=body["ban"],
            disband=body["disband"],
            send_ban=body["send_ban"],
            large=body["large"],
            allow_stranger=body["allow_stranger"],
            subscribers=body["subscribers"] or [],
            reset=bool(body["reset"]),
        )
        await propose(proposer, [op])
        return {"status": 200}

    async def channel_info(body: Json, query: Any) -> Json:
        op = channel_op(
            body["channel_id"],
            body["channel_type"],
            ban=body["ban"],
            disband=body["disband"],
            send_ban=body["send_ban"],
            large=body["large"],
            allow_stranger=body["allow_stranger"],
        )
        await propose(proposer, [op])
        return {"status": 200}

    async def channel_delete(body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON:
            raise bad("a person channel cannot be deleted")
        results = await proposer.call([channel_delete_op(body["channel_id"], body["channel_type"])])
        if results[0].get("r") not in (Reason.SUCCESS, Reason.CHANNEL_NOT_EXIST):
            raise bad(results[0].get("err", "delete failed"))
        return {"status": 200}

    async def subscriber_add(body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON:
            raise bad("a person channel's subscribers are its two parties")
        if body["temp_subscriber"]:
            raise bad("temporary subscribers are not supported")
        action = "set" if body["reset"] else "add"
        op = members_op("subscribers", action, body["channel_id"], body["channel_type"], body["subscribers"])
        await propose(proposer, [op])
        return {"status": 200}

    async def subscriber_remove(body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON:
            raise bad("a person channel's subscribers are its two parties")
        op = members_op(
            "subscribers", "remove", body["channel_id"], body["channel_type"], body["subscribers"]
        )
        await propose(proposer, [op])
        return {"status": 200}

    def member_list(name: str, action: str) -> Callable[[Json, Any], Awaitable[Json]]:
        async def handle(body: Json, query: Any) -> Json:
            if body["channel_type"] == CHANNEL_PERSON and not valid_uid(body["channel_id"]):
                # A person channel's lists belong to the user named by channel_id.
                raise bad(f"channel_id {UID_RULE}")
            op = members_op(name, action, body["channel_id"], body["channel_type"], body["uids"] or [])
            await propose(proposer, [op])
            return {"status": 200}

        return handle

    def remove_all(name: str) -> Callable[[Json, Any], Awaitable[Json]]:
        async def handle(body: Json, query: Any) -> Json:
            """WuKongIM's `/channel/<list>_remove_all`: the list becomes empty (a `set` to nothing)."""
            if body["channel_type"] == CHANNEL_PERSON:
                if name == "subscribers":
                    raise bad("a person channel's subscribers are its two parties")
                if not valid_uid(body["channel_id"]):
                    raise bad(f"channel_id {UID_RULE}")
            else:
                with store.read() as txn:  # a `set` of subscribers would create a channel that is not there
                    if txn.channel(channel_key(body["channel_id"], body["channel_type"])) is None:
                        raise bad("channel does not exist")
            await propose(proposer, [members_op(name, "set", body["channel_id"], body["channel_type"], [])])
            return {"status": 200}

        return handle

    async def whitelist(body: Json, query: Any) -> list[str]:
        with store.read() as txn:
            return txn.members("whitelist", channel_key(body["channel_id"], body["channel_type"]))

    table = {
        "/channel": Route(
            "POST",
            channel,
            (*CHANNEL_INFO, F("reset", "flag", default=0), F("subscribers", "uids")),
            summary="Create or update a channel (every flag is written; omitted ones become 0)",
        ),
        "/channel/info": Route("POST", channel_info, CHANNEL_INFO, summary="Update a channel's flags"),
        "/channel/delete": Route("POST", channel_delete, CHANNEL),
        "/channel/subscriber_add": Route(
            "POST",
            subscriber_add,
            (
                F("channel_id", required=True),
                F("channel_type", "int", default=2, low=1, high=255),
                F("reset", "flag", default=0),
                F("temp_subscriber", "flag", default=0),
                F("subscribers", "uids", required=True),
            ),
        ),
        "/channel/subscriber_remove": Route(
            "POST", subscriber_remove, (*CHANNEL, F("subscribers", "uids", required=True))
        ),
        "/channel/whitelist": Route("GET", whitelist, body="none", query=CHANNEL),
    }
    for name in ("subscriber", "blacklist", "whitelist"):
        stored_name = "subscribers" if name == "subscriber" else name
        table[f"/channel/{name}_remove_all"] = Route(
            "POST",
            remove_all(stored_name),
            CHANNEL,
            summary=f"Remove every entry of the channel's {name} list",
        )
    for action in ("add", "set", "remove"):
        for name in ("blacklist", "whitelist"):
            table[f"/channel/{name}_{action}"] = Route(
                "POST",
                member_list(name, action),
                (*CHANNEL, F("uids", "uids", required=action != "set")),
                summary=f"{action} uids ({name})",
            )
    return table
