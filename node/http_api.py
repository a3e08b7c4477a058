"""The business HTTP API (WuKongIM paths and JSON shapes), served by Hypercorn on trio.

A plain ASGI app with a route table. Each route declares its request fields (`F`): the same declaration
validates every body before anything is proposed (a malformed request gets HTTP 400 with
``{"msg": ..., "status": 400}`` and never reaches Raft) and generates the OpenAPI document served at
/openapi.json, so the two cannot drift apart. Writes go through Raft like everything else; reads come
from the local LMDB. With a manager token configured, every path but /health needs it in a `token` header.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio

from node import admin
from node.channel_pool import ChannelSend
from node.protocol import Reason
from node.webhooks import SYSTEM_UID, message_json
from raft import outbox
from raft.commands import (
    CHANNEL_PERSON,
    MAX_ID_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_TOKEN_BYTES,
    MAX_UID_BYTES,
    MAX_UIDS_PER_OP,
    OP_CHANNEL,
    OP_CHANNEL_DELETE,
    OP_CONVERSATION,
    OP_DEVICE_QUIT,
    OP_HANDLER_STATE,
    OP_MEMBERS,
    OP_SYSTEM_UIDS,
    OP_TOKEN,
    PERSON_SEPARATOR,
    SUPPORTED_CHANNEL_TYPES,
    UID_RULE,
    person_channel_id,
    valid_uid,
)
from raft.conversations import conversations_of
from storage.keys import channel_key

log = logging.getLogger("imnode.http")

MAX_BODY_BYTES = 2 << 20
SYNC_LIMIT_MAX = 10_000
CONVERSATIONS_MAX = 1000
U32 = (1 << 32) - 1
I63 = (1 << 63) - 1
UID_PATTERN = f"^[^{PERSON_SEPARATOR}]*$"  # raft.commands.valid_uid, as JSON Schema says it

Json = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class HttpError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def bad(msg: str) -> HttpError:
    return HttpError(400, msg)


@dataclass(frozen=True)
class PlainText:
    """A non-JSON answer (Prometheus text)."""

    text: str
    content_type: bytes = b"text/plain; version=0.0.4; charset=utf-8"


# -- request fields: one declaration validates and documents ---------------------------------------------
@dataclass(frozen=True)
class F:
    """One request field. kind: str, uid (str without `@`), int, flag (0/1), uids (list of uids), obj, b64."""

    name: str
    kind: str = "str"
    required: bool = False
    default: Any = None
    max_bytes: int = MAX_ID_BYTES
    low: int = 0
    high: int = I63
    description: str = ""

    def parse(self, body: Json) -> Any:
        value = body.get(self.name)
        if value is None:
            if self.required:
                raise bad(f"{self.name} is required")
            return self.default
        if self.kind in ("str", "uid", "b64"):
            if not isinstance(value, str):
                raise bad(f"{self.name} must be a string")
            if self.required and not value:
                raise bad(f"{self.name} must not be empty")
            try:
                size = len(value.encode())
            except UnicodeEncodeError:
                raise bad(f"{self.name} is not valid UTF-8 text") from None
            if size > self.max_bytes:
                raise bad(f"{self.name} longer than {self.max_bytes} bytes")
            if self.kind == "uid" and not valid_uid(value):
                raise bad(f"{self.name} {UID_RULE}")
            if self.kind == "b64":
                import base64
                import binascii

                try:
                    return base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise bad(f"{self.name} must be base64") from None
            return value
        if self.kind in ("int", "flag"):
            high = 1 if self.kind == "flag" else self.high
            if not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= high:
                raise bad(f"{self.name} must be an integer in [{self.low}, {high}]")
            return value
        if self.kind == "uids":
            if not isinstance(value, list) or len(value) > MAX_UIDS_PER_OP:
                raise bad(f"{self.name} must be a list of at most {MAX_UIDS_PER_OP} uids")
            for uid in value:
                if not isinstance(uid, str) or not uid:
                    raise bad(f"every entry of {self.name} must be a non-empty string")
                F(self.name, "uid", max_bytes=MAX_UID_BYTES).parse({self.name: uid})
            if self.required and not value:
                raise bad(f"{self.name} must not be empty")
            return list(dict.fromkeys(value))
        if self.kind == "ints":
            if (
                not isinstance(value, list)
                or len(value) > 256
                or any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255 for v in value)
            ):
                raise bad(f"{self.name} must be a list of integers in [0, 255]")
            return value
        if self.kind == "obj":
            if not isinstance(value, dict):
                raise bad(f"{self.name} must be an object")
            return value
        raise AssertionError(self.kind)

    def schema(self) -> Json:
        # Lengths are limits in UTF-8 bytes (they keep LMDB keys in range); for ASCII that is maxLength.
        if self.kind in ("str", "uid", "b64"):
            out: Json = {"type": "string", "maxLength": self.max_bytes, "x-max-utf8-bytes": self.max_bytes}
            if self.kind == "uid":
                out["pattern"] = UID_PATTERN
            if self.required:
                out["minLength"] = 1
            if self.kind == "b64":
                out["format"] = "byte"
        elif self.kind in ("int", "flag"):
            out = {"type": "integer", "minimum": self.low, "maximum": 1 if self.kind == "flag" else self.high}
        elif self.kind == "uids":
            item = {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_UID_BYTES,
                "x-max-utf8-bytes": MAX_UID_BYTES,
                "pattern": UID_PATTERN,
            }
            out = {"type": "array", "maxItems": MAX_UIDS_PER_OP, "items": item}
            if self.required:
                out["minItems"] = 1
        elif self.kind == "ints":
            out = {
                "type": "array",
                "maxItems": 256,
                "items": {"type": "integer", "minimum": 0, "maximum": 255},
            }
        else:
            out = {"type": "object"}
        if self.default is not None:
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        return out


def parse(fields: tuple[F, ...], body: Json) -> Json:
    return {f.name: f.parse(body) for f in fields}


UID = F("uid", "uid", required=True, max_bytes=MAX_UID_BYTES)
CHANNEL = (F("channel_id", required=True), F("channel_type", "int", required=True, low=1, high=255))
CHANNEL_INFO = (
    *CHANNEL,
    F("ban", "flag", default=0),
    F("disband", "flag", default=0),
    F("send_ban", "flag", default=0),
    F("large", "flag", default=0),
)


@dataclass
class Route:
    method: str
    fn: Callable[[Any, dict[str, list[str]]], Awaitable[Any]]
    fields: tuple[F, ...] = ()
    body: str = "object"  # "object", "uid_array" (WuKongIM takes a bare array in a few places), "none"
    admin: bool = False
    summary: str = ""
    query: tuple[F, ...] = field(default_factory=tuple)


class HttpApi:
    """The ASGI application. `node` is the running node (its store, pools, proposer and statistics)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.requests = 0
        self.errors = 0
        R = Route
        self.routes: dict[str, Route] = {
            "/health": R("GET", self.health, body="none", summary="Liveness"),
            "/openapi.json": R(
                "GET", self.openapi, body="none", summary="This API's OpenAPI 3.0 description"
            ),
            "/metrics": R("GET", self.metrics, body="none", summary="Prometheus metrics"),
            "/route": R("GET", self.route, body="none", summary="Addresses clients should connect to"),
            "/connz": R(
                "GET",
                self.connz,
                body="none",
                summary="Connections on this node",
                query=(
                    F("offset", "int", default=0),
                    F("limit", "int", default=20, low=1, high=1000),
                    F("uid", "uid", max_bytes=MAX_UID_BYTES),
                ),
            ),
            "/varz": R("GET", self.varz, body="none", summary="Node variables"),
            # users
            "/user/token": R(
                "POST",
                self.user_token,
                (
                    UID,
                    F("token", required=True, max_bytes=MAX_TOKEN_BYTES),
                    F("device_flag", "int", default=0, high=255),
                    F("device_level", "int", default=0, high=1),
                ),
                summary="Set a device's login token (device_level 1 kicks older logins of that device flag)",
            ),
            "/user/device_quit": R(
                "POST",
                self.device_quit,
                (UID, F("device_flag", "int", default=-1, low=-1, high=255)),
                summary="Log a device out (-1: every device) and clear its token",
            ),
            "/user/onlinestatus": R(
                "POST",
                self.online_status,
                body="uid_array",
                summary="Online devices among the given uids, cluster-wide",
            ),
            "/user/systemuids_add": R("POST", self.system_uids_add, (F("uids", "uids", required=True),)),
            "/user/systemuids_remove": R(
                "POST", self.system_uids_remove, (F("uids", "uids", required=True),)
            ),
            "/user/systemuids": R("GET", self.system_uids, body="none"),
            # channels
            "/channel": R(
                "POST",
                self.channel,
                (*CHANNEL_INFO, F("reset", "flag", default=0), F("subscribers", "uids")),
                summary="Create or update a channel (every flag is written; omitted ones become 0)",
            ),
            "/channel/info": R("POST", self.channel_info, CHANNEL_INFO, summary="Update a channel's flags"),
            "/channel/delete": R("POST", self.channel_delete, CHANNEL),
            "/channel/subscriber_add": R(
                "POST",
                self.subscriber_add,
                (
                    F("channel_id", required=True),
                    F("channel_type", "int", default=2, low=1, high=255),
                    F("reset", "flag", default=0),
                    F("temp_subscriber", "flag", default=0),
                    F("subscribers", "uids", required=True),
                ),
            ),
            "/channel/subscriber_remove": R(
                "POST", self.subscriber_remove, (*CHANNEL, F("subscribers", "uids", required=True))
            ),
            "/channel/max_message_seq": R(
                "GET",
                self.max_message_seq,
                body="none",
                query=(
                    F("channel_id", required=True),
                    F("channel_type", "int", required=True, low=1, high=255),
                    F("login_uid", "uid", max_bytes=MAX_UID_BYTES),
                ),
            ),
            "/channel/whitelist": R("GET", self.whitelist, body="none", query=CHANNEL),
            # messages
            "/message/send": R(
                "POST",
                self.message_send,
                (
                    F("header", "obj"),
                    F("client_msg_no", default=""),
                    F("from_uid", "uid", default="", max_bytes=MAX_UID_BYTES),
                    F("channel_id", default=""),
                    F("channel_type", "int", default=0, high=255),
                    F("subscribers", "uids"),
                    F("payload", "b64", required=True, max_bytes=MAX_PAYLOAD_BYTES * 2),
                    F("expire", "int", default=0, high=U32),
                    F("is_stream", "flag", default=0),
                ),
                summary="Send a message and wait for its commit; answers message_id and message_seq",
            ),
            "/message/sendbatch": R(
                "POST",
                self.message_sendbatch,
                (
                    F("header", "obj"),
                    F("from_uid", "uid", required=True, max_bytes=MAX_UID_BYTES),
                    F("subscribers", "uids", required=True),
                    F("payload", "b64", required=True, max_bytes=MAX_PAYLOAD_BYTES * 2),
                ),
                summary="Send one person message to each subscriber",
            ),
            "/channel/messagesync": R(
                "POST",
                self.messagesync,
                (
                    F("login_uid", "uid", required=True, max_bytes=MAX_UID_BYTES),
                    *CHANNEL,
                    F("start_message_seq", "int", default=0, high=U32),
                    F("end_message_seq", "int", default=0, high=U32),
                    F("limit", "int", default=100, low=0, high=SYNC_LIMIT_MAX),
                    F("pull_mode", "flag", default=0),
                ),
                summary="Messages of a channel (pull_mode 1: up from start, end exclusive; 0: down to end)",
            ),
            # conversations
            "/conversation/sync": R(
                "POST",
                self.conversation_sync,
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
            "/conversations/clearUnread": R(
                "POST", self.clear_unread, (UID, *CHANNEL, F("message_seq", "int", default=0, high=U32))
            ),
            "/conversations/setUnread": R(
                "POST", self.set_unread, (UID, *CHANNEL, F("unread", "int", required=True, high=U32))
            ),
            "/conversations/delete": R("POST", self.conversation_delete, (UID, *CHANNEL)),
            # admin
            "/admin/status": R("GET", self.admin_status, body="none", admin=True),
            "/admin/pools": R("GET", self.admin_pools, body="none", admin=True),
            "/admin/members": R(
                "POST", self.admin_members, (F("action", required=True), F("node", required=True)), admin=True
            ),
            "/admin/transfer": R("POST", self.admin_transfer, (F("node"),), admin=True),
            "/admin/digests": R("GET", self.admin_digests, body="none", admin=True),
            "/admin/handlers": R("GET", self.admin_handlers, body="none", admin=True),
            "/admin/handlers/state": R(
                "POST",
                self.admin_handler_state,
                (F("name", required=True), F("enabled", "flag", required=True)),
                admin=True,
            ),
            "/admin/deadletters": R("GET", self.admin_deadletters, body="none", admin=True),
            "/admin/deadletters/replay": R("POST", self.admin_replay, (), admin=True),
        }
        for action in ("add", "set", "remove"):
            for member_list in ("blacklist", "whitelist"):
                self.routes[f"/channel/{member_list}_{action}"] = R(
                    "POST",
                    self._member_list(member_list, action),
                    (*CHANNEL, F("uids", "uids", required=action != "set")),
                    summary=f"{action} uids ({member_list})",
                )

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
        if isinstance(answer, PlainText):
            body, content_type = answer.text.encode(), answer.content_type
        else:
            body, content_type = json.dumps(answer, separators=(",", ":")).encode(), b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
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
        if token and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"token", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise HttpError(401, "missing or wrong token header")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        raw = b""
        # A client dribbling its body would otherwise hold the request, and what it sent, as long as it likes.
        limit_s = self.node.config.tuning.http_body_timeout_s
        with trio.move_on_after(limit_s) as body_time:
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if len(raw) > MAX_BODY_BYTES:
                    raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
                if not message.get("more_body"):
                    break
        if body_time.cancelled_caught:
            # Answering before the body is complete makes Hypercorn close the connection after the answer.
            raise HttpError(408, f"request body not received within {limit_s:g} s")
        if route.body == "none":
            args: dict[str, Any] = {k: v[0] for k, v in query.items() if v}
            for f in route.query:  # a query string carries text: integers arrive as digits
                value = args.get(f.name)
                if f.kind in ("int", "flag") and isinstance(value, str):
                    if not value.lstrip("-").isdigit() or len(value) > 20:
                        raise bad(f"{f.name} must be an integer")
                    args[f.name] = int(value)
            return await route.fn(parse(route.query, args) if route.query else {}, query)
        try:
            parsed = json.loads(raw or (b"[]" if route.body == "uid_array" else b"{}"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"body is not JSON: {exc}") from None
        except RecursionError:
            # The parser recurses per bracket: client input, not a fault of the node (no 500, no traceback).
            raise bad("body is nested too deeply for the JSON parser") from None
        if route.body == "uid_array":
            return await route.fn(F("uids", "uids").parse({"uids": parsed}) or [], query)
        if not isinstance(parsed, dict):
            raise bad("body must be a JSON object")
        return await route.fn(parse(route.fields, parsed), query)

    async def _propose(self, ops: list[Json]) -> None:
        results = await self.node.proposer.call(ops)
        for result in results:
            if result.get("r") != Reason.SUCCESS:
                reason = int(result.get("r", 0))
                raise bad(result.get("err") or Reason(reason).name.lower())

    # -- operations --------------------------------------------------------------------------------------
    async def health(self, body: Json, query: Any) -> Json:
        return {"status": "ok"}

    async def openapi(self, body: Json, query: Any) -> Json:
        return openapi_document(self)

    async def metrics(self, body: Json, query: Any) -> PlainText:
        return PlainText(self.node.metrics.render())

    async def route(self, body: Json, query: Any) -> Json:
        """WuKongIM's three fields (its wss_addr carries the scheme, its tcp_addr none), and `tcp_tls_addr`
        only when this node has a TLS TCP listener, so the answer is WuKongIM's own shape otherwise."""
        listening = self.node.listening
        spec = self.node.spec
        wss = listening.wss if listening else spec.wss
        answer: Json = {
            "tcp_addr": listening.tcp if listening else spec.tcp,
            "ws_addr": f"ws://{listening.ws if listening else spec.ws}",
            "wss_addr": f"wss://{wss}" if wss else "",
        }
        if spec.tcp_tls:
            answer["tcp_tls_addr"] = listening.tcp_tls if listening else spec.tcp_tls
        return answer

    async def connz(self, body: Json, query: Any) -> Json:
        now = trio.current_time()
        conns = [c for c in self.node.registry if not body["uid"] or c.uid == body["uid"]]
        page = conns[body["offset"] : body["offset"] + body["limit"]]
        return {
            "connections": [
                {
                    "id": c.id,
                    "uid": c.uid,
                    "ip": c.remote.rsplit(":", 1)[0],
                    "port": int(c.remote.rsplit(":", 1)[1]) if c.remote.rsplit(":", 1)[-1].isdigit() else 0,
                    "last_activity": round(now - c.last_activity, 3),
                    "uptime": round(now - c.connected_at, 3),
                    "pending_bytes": c.pending_bytes,
                    "pending_frames": c.outbound.statistics().current_buffer_used,
                    "in_packets": c.received_frames,
                    "out_packets": c.sent_frames,
                    "inflight_recvs": len(c.inflight),
                    "device": c.device_flag,
                    "device_id": c.device_id,
                    "version": c.version,
                    "proxy_type_format": c.transport,
                    "node_id": self.node.spec.numeric_id,
                }
                for c in page
            ],
            "now": int(time.time()),
            "total": len(conns),
            "offset": body["offset"],
            "limit": body["limit"],
        }

    async def varz(self, body: Json, query: Any) -> Json:
        status = admin.status(self.node)
        return {
            "server_id": self.node.spec.numeric_id,
            "server_name": self.node.spec.id,
            "connections": status["connections"],
            "in_msgs": self.node.gateway.statistics()["accepted"],
            "tcp_addr": self.node.spec.tcp,
            "ws_addr": f"ws://{self.node.spec.ws}",
            "manager_token_on": int(bool(self.node.config.manager_token)),
            "raft": {k: status[k] for k in ("role", "term", "commit_index", "applied_index", "leader")},
            "messages": status["messages"],
        }

    # -- users -------------------------------------------------------------------------------------------
    async def user_token(self, body: Json, query: Any) -> Json:
        await self._propose(
            [
                {
                    "t": OP_TOKEN,
                    "uid": body["uid"],
                    "token": body["token"],
                    "flag": body["device_flag"],
                    "level": body["device_level"],
                }
            ]
        )
        return {"status": 200}

    async def device_quit(self, body: Json, query: Any) -> Json:
        await self._propose([{"t": OP_DEVICE_QUIT, "uid": body["uid"], "flag": body["device_flag"]}])
        return {"status": 200}

    async def online_status(self, uids: list[str], query: Any) -> list[Json]:
        online: list[Json] = []
        with self.node.store.read() as txn:
            for uid in uids:
                for _node, _conn, row in txn.presence_of(uid):
                    online.append({"uid": uid, "device_flag": row["flag"], "online": 1})
        return online

    async def system_uids_add(self, body: Json, query: Any) -> Json:
        await self._propose([{"t": OP_SYSTEM_UIDS, "action": "add", "uids": body["uids"]}])
        return {"status": 200}

    async def system_uids_remove(self, body: Json, query: Any) -> Json:
        await self._propose([{"t": OP_SYSTEM_UIDS, "action": "remove", "uids": body["uids"]}])
        return {"status": 200}

    async def system_uids(self, body: Json, query: Any) -> list[str]:
        with self.node.store.read() as txn:
            return list(txn.meta("system_uids") or [])

    # -- channels ----------------------------------------------------------------------------------------
    def _channel_op(self, body: Json) -> Json:
        return {
            "t": OP_CHANNEL,
            "cid": body["channel_id"],
            "ct": body["channel_type"],
            "ban": body["ban"],
            "disband": body["disband"],
            "send_ban": body["send_ban"],
            "large": body["large"],
        }

    async def channel(self, body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON and body["subscribers"]:
            raise bad("a person channel takes no subscribers")
        op = self._channel_op(body)
        op["subs"] = body["subscribers"] or []
        op["reset"] = bool(body["reset"])
        await self._propose([op])
        return {"status": 200}

    async def channel_info(self, body: Json, query: Any) -> Json:
        await self._propose([self._channel_op(body)])
        return {"status": 200}

    async def channel_delete(self, body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON:
            raise bad("a person channel cannot be deleted")
        results = await self.node.proposer.call(
            [{"t": OP_CHANNEL_DELETE, "cid": body["channel_id"], "ct": body["channel_type"]}]
        )
        if results[0].get("r") not in (Reason.SUCCESS, Reason.CHANNEL_NOT_EXIST):
            raise bad(results[0].get("err", "delete failed"))
        return {"status": 200}

    def _members_op(self, member_list: str, action: str, body: Json, uids: list[str]) -> Json:
        return {
            "t": OP_MEMBERS,
            "list": member_list,
            "action": action,
            "cid": body["channel_id"],
            "ct": body["channel_type"],
            "uids": uids,
        }

    async def subscriber_add(self, body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON:
            raise bad("a person channel's subscribers are its two parties")
        if body["temp_subscriber"]:
            raise bad("temporary subscribers are not supported")
        action = "set" if body["reset"] else "add"
        await self._propose([self._members_op("subscribers", action, body, body["subscribers"])])
        return {"status": 200}

    async def subscriber_remove(self, body: Json, query: Any) -> Json:
        if body["channel_type"] == CHANNEL_PERSON:
            raise bad("a person channel's subscribers are its two parties")
        await self._propose([self._members_op("subscribers", "remove", body, body["subscribers"])])
        return {"status": 200}

    def _member_list(self, member_list: str, action: str) -> Callable[[Json, Any], Awaitable[Json]]:
        async def handle(body: Json, query: Any) -> Json:
            if body["channel_type"] == CHANNEL_PERSON and not valid_uid(body["channel_id"]):
                # A person channel's lists belong to the user named by channel_id.
                raise bad(f"channel_id {UID_RULE}")
            await self._propose([self._members_op(member_list, action, body, body["uids"] or [])])
            return {"status": 200}

        return handle

    async def whitelist(self, body: Json, query: Any) -> list[str]:
        with self.node.store.read() as txn:
            return txn.members("whitelist", channel_key(body["channel_id"], body["channel_type"]))

    # -- messages ----------------------------------------------------------------------------------------
    def _stored_channel(self, login_uid: str, channel_id: str, channel_type: int) -> str:
        if channel_type == CHANNEL_PERSON and login_uid and "@" not in channel_id:
            return person_channel_id(login_uid, channel_id)
        return channel_id

    async def _send_one(
        self, sender: str, channel_id: str, channel_type: int, payload: bytes, client_msg_no: str
    ) -> Json:
        """One send through the channel pool (same order and batching as client sends), to its commit."""
        if channel_type not in SUPPORTED_CHANNEL_TYPES:
            return {"r": Reason.NOT_SUPPORT_CHANNEL_TYPE}
        if channel_type == CHANNEL_PERSON:
            if channel_id == sender:
                return {"r": Reason.CHANNEL_ID_ERROR}
            stored, peer = person_channel_id(sender, channel_id), channel_id
        else:
            stored, peer = channel_id, ""
        done = trio.Event()
        box: list[Json] = []

        def reply(result: Json) -> None:
            box.append(result)
            done.set()

        send = ChannelSend(
            None,
            0,
            client_msg_no or uuid.uuid4().hex + "0",
            stored,
            channel_type,
            peer,
            sender,
            0,
            payload,
            api=True,
            reply=reply,
        )
        await self.node.channel_pool.submit(send.route_key, "send", send)
        with trio.move_on_after(self.node.config.tuning.commit_timeout_s + 5):
            await done.wait()
        if not box:
            return {"r": Reason.SYSTEM_ERROR}
        return {**box[0], "cmn": send.client_msg_no}

    async def message_send(self, body: Json, query: Any) -> Json:
        if body["subscribers"]:
            raise bad(
                "sending to a subscriber list (a temporary channel) is not supported; use /message/sendbatch"
            )
        if not body["channel_id"]:
            raise bad("channel_id is required")
        if body["channel_type"] == CHANNEL_PERSON and not valid_uid(body["channel_id"]):
            raise bad(f"channel_id {UID_RULE}")  # a person channel is named by the receiver's uid
        sender = body["from_uid"] or SYSTEM_UID
        result = await self._send_one(
            sender, body["channel_id"], body["channel_type"], body["payload"], body["client_msg_no"]
        )
        reason = int(result["r"])
        if reason != Reason.SUCCESS:
            raise bad(f"message not sent: {Reason(reason).name.lower()} (reason {reason})")
        data = {"message_id": result["mid"], "message_seq": result["seq"], "client_msg_no": result["cmn"]}
        return {"status": 200, "reason": reason, **data, "data": data}

    async def message_sendbatch(self, body: Json, query: Any) -> Json:
        results = []
        async with trio.open_nursery() as nursery:

            async def one(uid: str) -> None:
                results.append(
                    (uid, await self._send_one(body["from_uid"], uid, CHANNEL_PERSON, body["payload"], ""))
                )

            for uid in body["subscribers"]:
                nursery.start_soon(one, uid)
        failed = [(uid, r) for uid, r in results if r["r"] != Reason.SUCCESS]
        return {"fail_uids": [uid for uid, _ in failed], "reason": [int(r["r"]) for _, r in failed]}

    async def messagesync(self, body: Json, query: Any) -> Json:
        """WuKongIM's windows: start=end=0 → the newest `limit`; up → [start, end); down → (end, start]."""
        start, end, limit = body["start_message_seq"], body["end_message_seq"], body["limit"]
        chan = channel_key(
            self._stored_channel(body["login_uid"], body["channel_id"], body["channel_type"]),
            body["channel_type"],
        )
        with self.node.store.read() as txn:
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
        return {
            "start_message_seq": start,
            "end_message_seq": end,
            "more": int(limit > 0 and len(rows) >= limit),
            "messages": [message_json(row) for row in rows],
        }

    async def max_message_seq(self, body: Json, query: Any) -> Json:
        stored = self._stored_channel(body["login_uid"] or "", body["channel_id"], body["channel_type"])
        if body["channel_type"] == CHANNEL_PERSON and "@" not in stored:
            raise bad("login_uid is required for a person channel")
        with self.node.store.read() as txn:
            record = txn.channel(channel_key(stored, body["channel_type"])) or {}
        return {"message_seq": int(record.get("last_seq", 0))}

    # -- conversations -----------------------------------------------------------------------------------
    def _conversation_op(self, action: str, body: Json, **extra: Any) -> Json:
        stored = self._stored_channel(body["uid"], body["channel_id"], body["channel_type"])
        return {
            "t": OP_CONVERSATION,
            "action": action,
            "uid": body["uid"],
            "cid": stored,
            "ct": body["channel_type"],
            **extra,
        }

    async def clear_unread(self, body: Json, query: Any) -> Json:
        await self._propose([self._conversation_op("clear", body)])
        return {"status": 200}

    async def set_unread(self, body: Json, query: Any) -> Json:
        await self._propose([self._conversation_op("set_unread", body, unread=body["unread"])])
        return {"status": 200}

    async def conversation_delete(self, body: Json, query: Any) -> Json:
        await self._propose([self._conversation_op("delete", body)])
        return {"status": 200}

    async def conversation_sync(self, body: Json, query: Any) -> list[Json]:
        uid = body["uid"]
        known: dict[tuple[str, int], int] = {}
        for item in body["last_msg_seqs"].split("|") if body["last_msg_seqs"] else []:
            parts = item.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                known[(parts[0], int(parts[1]))] = int(parts[2])
        excluded = set(body["exclude_channel_types"] or [])
        result: list[Json] = []
        with self.node.store.read() as txn:
            rows = conversations_of(txn, uid)[:CONVERSATIONS_MAX]
            for row in rows:
                shown_id = row["channel_id"]
                if row["channel_type"] == CHANNEL_PERSON and "@" in shown_id:
                    first, _, second = shown_id.partition("@")
                    shown_id = second if first == uid else first
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

    # -- admin -------------------------------------------------------------------------------------------
    async def admin_status(self, body: Json, query: Any) -> Json:
        return admin.status(self.node)

    async def admin_pools(self, body: Json, query: Any) -> Json:
        return dict(self.node.pool_statistics())

    async def admin_members(self, body: Json, query: Any) -> Json:
        if body["action"] not in ("add", "remove"):
            raise bad("action must be 'add' or 'remove'")
        try:
            if body["action"] == "add":
                return await admin.add_member(self.node, body["node"])
            return await admin.remove_member(self.node, body["node"])
        except admin.AdminRefused as exc:
            raise HttpError(409, str(exc)) from None

    async def admin_transfer(self, body: Json, query: Any) -> Json:
        try:
            return await admin.transfer_leadership(self.node, body["node"] or None)
        except admin.AdminRefused as exc:
            raise HttpError(409, str(exc)) from None

    async def admin_digests(self, body: Json, query: Any) -> Json:
        return admin.digests(self.node)

    async def admin_handlers(self, body: Json, query: Any) -> Json:
        """Every pool's chains with per-handler counts, and the replicated list of disabled handlers."""
        with self.node.store.read() as txn:
            disabled = txn.meta("handlers_disabled") or []
        return {
            "node": self.node.spec.id,
            "disabled": disabled,
            "plugins": self.node.plugin_names,
            "pools": {name: pool.statistics()["handlers"] for name, pool in self.node.pools.items()},
        }

    async def admin_handler_state(self, body: Json, query: Any) -> Json:
        name, enabled = body["name"], bool(body["enabled"])
        known = {
            h.name for pool in self.node.pools.values() for t in pool.event_types() for h in pool.chain(t)
        }
        if name not in known:
            raise bad(f"no handler named {name!r} (known: {', '.join(sorted(known))})")
        if name not in self.node.plugin_names:
            # Built-ins (auth, store, push...) are the node itself: without `store` no send is ever answered.
            plugins = ", ".join(sorted(self.node.plugin_names)) or "none loaded"
            raise bad(f"{name!r} is a built-in handler and cannot be switched off (plugins: {plugins})")
        await self._propose([{"t": OP_HANDLER_STATE, "name": name, "enabled": enabled}])
        return {"name": name, "enabled": enabled}

    async def admin_deadletters(self, body: Json, query: Any) -> Json:
        with self.node.store.read() as txn:
            letters = outbox.deadletters(txn)
            pending = {s: outbox.head(txn, s) - outbox.cursor(txn, s) for s in outbox.STREAMS}
        return {
            "deadletters": [
                {
                    "stream": stream,
                    "event": outbox.STREAM_EVENTS[stream],
                    "seq": seq,
                    "error": value["error"],
                    "attempts": value["attempts"],
                }
                for stream, seq, value in letters
            ],
            "pending": pending,
            "delivery": self.node.webhooks.statistics(),
        }

    async def admin_replay(self, body: Json, query: Any) -> Json:
        if self.node.raft.status()["role"] != "leader":
            raise HttpError(409, "ask the leader: it delivers webhooks")
        return await self.node.webhooks.replay_deadletters()


def openapi_document(api: HttpApi) -> Json:
    """OpenAPI 3.0 from the route table: the same field declarations that validate every request."""
    paths: Json = {}
    error = {
        "description": "bad request",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"msg": {"type": "string"}, "status": {"type": "integer"}},
                }
            }
        },
    }
    for path, route in sorted(api.routes.items()):
        operation: Json = {
            "summary": route.summary or path,
            "responses": {"200": {"description": "ok"}, "400": error},
        }
        if api.node.config.manager_token and path != "/health":
            operation["security"] = [{"managerToken": []}]
        if route.query:
            operation["parameters"] = [
                {"name": f.name, "in": "query", "required": f.required, "schema": f.schema()}
                for f in route.query
            ]
        if route.body == "object" and route.method == "POST":
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {f.name: f.schema() for f in route.fields},
                            "required": [f.name for f in route.fields if f.required],
                        }
                    }
                },
            }
        elif route.body == "uid_array":
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "maxItems": MAX_UIDS_PER_OP,
                            "items": {"type": "string", "minLength": 1, "pattern": UID_PATTERN},
                        }
                    }
                },
            }
        paths[path] = {route.method.lower(): operation}
    return {
        "openapi": "3.0.3",
        "info": {"title": "imnode HTTP API (WuKongIM-compatible)", "version": "0.1.0"},
        "paths": paths,
        "components": {
            "securitySchemes": {"managerToken": {"type": "apiKey", "in": "header", "name": "token"}}
        },
    }
