"""The business HTTP API (WuKongIM paths and JSON shapes), served by Hypercorn on trio.

A plain ASGI app with a route table: each route is a small async function from a checked JSON body to a
JSON answer. Bodies are parsed and validated here, before anything is proposed, so a malformed request
gets HTTP 400 with ``{"msg": ..., "status": 400}`` and never reaches Raft. Writes go through the proposer
(Raft) like everything else; reads come from the local LMDB.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from node import admin
from node.protocol import Reason
from raft.commands import (
    CHANNEL_PERSON,
    MAX_ID_BYTES,
    MAX_TOKEN_BYTES,
    MAX_UID_BYTES,
    MAX_UIDS_PER_OP,
    OP_CHANNEL,
    OP_HANDLER_STATE,
    OP_MEMBERS,
    OP_TOKEN,
    person_channel_id,
)
from storage.keys import channel_key

log = logging.getLogger("imnode.http")

MAX_BODY_BYTES = 1 << 20
SYNC_LIMIT_MAX = 10_000

Json = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class PlainText:
    """A non-JSON answer (Prometheus text)."""

    text: str
    content_type: bytes = b"text/plain; version=0.0.4; charset=utf-8"


class HttpError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def bad(msg: str) -> HttpError:
    return HttpError(400, msg)


# -- field checks ----------------------------------------------------------------------------------------
def text(body: Json, field: str, *, required: bool = True, max_bytes: int = MAX_ID_BYTES) -> str:
    value = body.get(field, "")
    if not isinstance(value, str):
        raise bad(f"{field} must be a string")
    if required and not value:
        raise bad(f"{field} must not be empty")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise bad(f"{field} is not valid UTF-8 text") from None
    if size > max_bytes:
        raise bad(f"{field} longer than {max_bytes} bytes")
    return value


def integer(body: Json, field: str, *, default: int = 0, low: int = 0, high: int = (1 << 63) - 1) -> int:
    value = body.get(field, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{field} must be an integer in [{low}, {high}]")
    return value


def uid_list(body: Json, field: str) -> list[str]:
    value = body.get(field) or []
    if not isinstance(value, list) or len(value) > MAX_UIDS_PER_OP:
        raise bad(f"{field} must be a list of at most {MAX_UIDS_PER_OP} uids")
    for uid in value:
        if not isinstance(uid, str) or not uid:
            raise bad(f"every entry of {field} must be a non-empty string")
        text({"uid": uid}, "uid", max_bytes=MAX_UID_BYTES)
    return value


def channel_of(body: Json) -> tuple[str, int]:
    channel_id = text(body, "channel_id")
    channel_type = integer(body, "channel_type", default=-1, low=1, high=255)
    return channel_id, channel_type


@dataclass
class Route:
    method: str
    fn: Callable[[Any, dict[str, list[str]]], Awaitable[Any]]
    admin: bool = False
    body: type = dict  # the JSON type the body must have (WuKongIM takes a bare array in a few places)


class HttpApi:
    """The ASGI application. `node` is the running node (its store, proposer and statistics)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.requests = 0
        self.errors = 0
        self.routes: dict[str, Route] = {
            "/health": Route("GET", self.health),
            "/user/token": Route("POST", self.user_token),
            "/channel": Route("POST", self.channel),
            "/channel/subscriber_add": Route("POST", self.subscriber_add),
            "/channel/subscriber_remove": Route("POST", self.subscriber_remove),
            "/channel/messagesync": Route("POST", self.messagesync),
            "/channel/max_message_seq": Route("GET", self.max_message_seq),
            "/user/onlinestatus": Route("POST", self.online_status, body=list),
            "/admin/status": Route("GET", self.admin_status, admin=True),
            "/admin/pools": Route("GET", self.admin_pools, admin=True),
            "/admin/members": Route("POST", self.admin_members, admin=True),
            "/admin/transfer": Route("POST", self.admin_transfer, admin=True),
            "/admin/digests": Route("GET", self.admin_digests, admin=True),
            "/admin/handlers": Route("GET", self.admin_handlers, admin=True),
            "/admin/handlers/state": Route("POST", self.admin_handler_state, admin=True),
            "/metrics": Route("GET", self.metrics),
        }

    # -- ASGI plumbing -----------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.requests += 1
        try:
            status, answer = 200, await self._handle(scope, receive)
        except HttpError as exc:
            self.errors += 1
            status, answer = exc.status, {"msg": exc.msg, "status": exc.status}
        except Exception:
            self.errors += 1
            log.exception("HTTP %s failed", scope.get("path"))
            status, answer = 500, {"msg": "internal error", "status": 500}
        body = json.dumps(answer, separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: dict[str, Any], receive: Receive) -> Any:
        route = self.routes.get(scope["path"])
        if route is None:
            raise HttpError(404, f"no such path: {scope['path']}")
        if scope["method"] != route.method:
            raise HttpError(405, f"{scope['path']} takes {route.method}")
        token = self.node.config.manager_token
        if token and (route.admin or scope["path"] != "/health"):
            given = dict(scope["headers"]).get(b"token", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise HttpError(401, "missing or wrong token header")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if len(raw) > MAX_BODY_BYTES:
                raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
            if not message.get("more_body"):
                break
        body: Any = {}
        if route.method == "POST":
            try:
                parsed = json.loads(raw or (b"{}" if route.body is dict else b"[]"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise bad(f"body is not JSON: {exc}") from None
            if not isinstance(parsed, route.body):
                raise bad(f"body must be a JSON {'object' if route.body is dict else 'array'}")
            body = parsed
        return await route.fn(body, query)

    async def _propose(self, ops: list[Json]) -> None:
        results = await self.node.proposer.call(ops)
        for result in results:
            if result.get("r") != Reason.SUCCESS:
                reason = int(result.get("r", 0))
                raise bad(result.get("err") or Reason(reason).name.lower())

    # -- routes ------------------------------------------------------------------------------------------
    async def health(self, body: Json, query: dict[str, list[str]]) -> Json:
        return {"status": "ok"}

    async def user_token(self, body: Json, query: dict[str, list[str]]) -> Json:
        op = {
            "t": OP_TOKEN,
            "uid": text(body, "uid", max_bytes=MAX_UID_BYTES),
            "token": text(body, "token", max_bytes=MAX_TOKEN_BYTES),
            "flag": integer(body, "device_flag", high=255),
            "level": integer(body, "device_level", high=255),
        }
        await self._propose([op])
        return {"status": 200}

    async def channel(self, body: Json, query: dict[str, list[str]]) -> Json:
        channel_id, channel_type = channel_of(body)
        op: Json = {
            "t": OP_CHANNEL,
            "cid": channel_id,
            "ct": channel_type,
            "subs": uid_list(body, "subscribers"),
        }
        for flag in ("ban", "disband", "send_ban", "large"):
            if flag in body:
                op[flag] = integer(body, flag, high=1)
        if "reset" in body:
            op["reset"] = bool(integer(body, "reset", high=1))
        await self._propose([op])
        return {"status": 200}

    async def subscriber_add(self, body: Json, query: dict[str, list[str]]) -> Json:
        channel_id, channel_type = channel_of(body)
        action = "set" if integer(body, "reset", high=1) else "add"
        op = {
            "t": OP_MEMBERS,
            "list": "subscribers",
            "action": action,
            "cid": channel_id,
            "ct": channel_type,
            "uids": uid_list(body, "subscribers"),
        }
        await self._propose([op])
        return {"status": 200}

    async def subscriber_remove(self, body: Json, query: dict[str, list[str]]) -> Json:
        channel_id, channel_type = channel_of(body)
        op = {
            "t": OP_MEMBERS,
            "list": "subscribers",
            "action": "remove",
            "cid": channel_id,
            "ct": channel_type,
            "uids": uid_list(body, "subscribers"),
        }
        await self._propose([op])
        return {"status": 200}

    def _stored_channel(self, login_uid: str, channel_id: str, channel_type: int) -> str:
        if channel_type == CHANNEL_PERSON and login_uid and "@" not in channel_id:
            return person_channel_id(login_uid, channel_id)
        return channel_id

    async def messagesync(self, body: Json, query: dict[str, list[str]]) -> Json:
        login_uid = text(body, "login_uid", required=False, max_bytes=MAX_UID_BYTES)
        channel_id, channel_type = channel_of(body)
        start = integer(body, "start_message_seq", high=(1 << 32) - 1)
        end = integer(body, "end_message_seq", high=(1 << 32) - 1)
        limit = integer(body, "limit", default=100, low=1, high=SYNC_LIMIT_MAX)
        pull_mode = integer(body, "pull_mode", high=1)
        chan = channel_key(self._stored_channel(login_uid, channel_id, channel_type), channel_type)
        with self.node.store.read() as txn:
            if pull_mode == 1:  # up: newer messages from start_message_seq on
                rows = txn.messages(chan, max(start, 1), end, limit + 1)
                more = len(rows) > limit
                rows = rows[:limit]
            else:  # down: older messages, ending at start_message_seq (0: the newest)
                record = txn.channel(chan) or {}
                top = start or int(record.get("last_seq", 0))
                low = max(end + 1 if end else 1, top - limit + 1, 1)
                rows = txn.messages(chan, low, top, limit) if top else []
                more = bool(rows) and rows[0]["seq"] > max(end + 1, 1)
        messages = [self._message_json(row, login_uid) for row in rows]
        return {
            "start_message_seq": start,
            "end_message_seq": end,
            "more": int(more),
            "messages": messages,
        }

    def _message_json(self, row: Json, login_uid: str) -> Json:
        channel_id = row["cid"]
        if row["ct"] == CHANNEL_PERSON and "@" in channel_id and login_uid:
            first, _, second = channel_id.partition("@")
            channel_id = second if first == login_uid else first
        return {
            "header": {"no_persist": 0, "red_dot": 1, "sync_once": 0},
            "setting": row["setting"],
            "message_id": row["mid"],
            "message_idstr": str(row["mid"]),
            "client_msg_no": row["cmn"],
            "message_seq": row["seq"],
            "from_uid": row["from"],
            "channel_id": channel_id,
            "channel_type": row["ct"],
            "timestamp": row["ts"],
            "payload": base64.b64encode(row["payload"]).decode(),
        }

    async def max_message_seq(self, body: Json, query: dict[str, list[str]]) -> Json:
        args = {k: v[0] for k, v in query.items() if v}
        channel_id = text(args, "channel_id")
        try:
            channel_type = int(args.get("channel_type", ""))
        except ValueError:
            raise bad("channel_type must be an integer") from None
        with self.node.store.read() as txn:
            record = txn.channel(channel_key(channel_id, channel_type)) or {}
        return {"message_seq": int(record.get("last_seq", 0))}

    async def online_status(self, body: list[Any], query: dict[str, list[str]]) -> list[Json]:
        """WuKongIM's /user/onlinestatus: the online devices among the given uids, cluster-wide."""
        if len(body) > MAX_UIDS_PER_OP:
            raise bad(f"at most {MAX_UIDS_PER_OP} uids")
        uids = uid_list({"uids": body}, "uids")
        online: list[Json] = []
        with self.node.store.read() as txn:
            for uid in dict.fromkeys(uids):
                for _node, _conn, row in txn.presence_of(uid):
                    online.append({"uid": uid, "device_flag": row["flag"], "online": 1})
        return online

    async def admin_status(self, body: Json, query: dict[str, list[str]]) -> Json:
        return admin.status(self.node)

    async def admin_members(self, body: Json, query: dict[str, list[str]]) -> Json:
        action = body.get("action")
        if action not in ("add", "remove"):
            raise bad("action must be 'add' or 'remove'")
        node_id = text(body, "node")
        try:
            if action == "add":
                return await admin.add_member(self.node, node_id)
            return await admin.remove_member(self.node, node_id)
        except admin.AdminRefused as exc:
            raise HttpError(409, str(exc)) from None

    async def admin_transfer(self, body: Json, query: dict[str, list[str]]) -> Json:
        node_id = text(body, "node", required=False) or None
        try:
            return await admin.transfer_leadership(self.node, node_id)
        except admin.AdminRefused as exc:
            raise HttpError(409, str(exc)) from None

    async def metrics(self, body: Json, query: dict[str, list[str]]) -> PlainText:
        return PlainText(self.node.metrics.render())

    async def admin_handlers(self, body: Json, query: dict[str, list[str]]) -> Json:
        """Every pool's chains with per-handler counts, and the replicated list of disabled handlers."""
        with self.node.store.read() as txn:
            disabled = txn.meta("handlers_disabled") or []
        return {
            "node": self.node.spec.id,
            "disabled": disabled,
            "plugins": self.node.plugin_names,
            "pools": {name: pool.statistics()["handlers"] for name, pool in self.node.pools.items()},
        }

    async def admin_handler_state(self, body: Json, query: dict[str, list[str]]) -> Json:
        name = text(body, "name")
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise bad("enabled must be true or false")
        known = {
            h.name for pool in self.node.pools.values() for t in pool.event_types() for h in pool.chain(t)
        }
        if name not in known:
            raise bad(f"no handler named {name!r} (known: {', '.join(sorted(known))})")
        await self._propose([{"t": OP_HANDLER_STATE, "name": name, "enabled": enabled}])
        return {"name": name, "enabled": enabled}

    async def admin_digests(self, body: Json, query: dict[str, list[str]]) -> Json:
        return admin.digests(self.node)

    async def admin_pools(self, body: Json, query: dict[str, list[str]]) -> Json:
        return dict(self.node.pool_statistics())
