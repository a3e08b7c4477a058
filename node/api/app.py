"""The business HTTP API (WuKongIM paths and JSON shapes) as a plain ASGI app, served by Hypercorn on trio.

The app knows routing, the manager token and bodies, nothing of the node: each resource module (users,
channels, messages, conversations, admin) builds its routes from the few things it uses, and server.py
hands them all to `HttpApi`. Writes go through Raft like everything else; reads come from the local LMDB.
With a manager token configured, every path but the public ones (/health, the console's static files)
needs it in a `token` header.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import trio

from node.api import peer_auth
from node.api.fields import F, HttpError, Json, Route, bad, openapi_document, parse
from node.api.guard import Site, WebGuard
from node.api.http1 import SUPPORTED_VERSIONS
from node.cluster.proposer import Proposer
from node.wire.protocol import Reason
from raft.commands import BadCommand, Op

log = logging.getLogger("imnode.http")

# ASCII digits only: str.isdigit() also takes "²" and other digits int() refuses (a 500, not a 400).
QUERY_INTEGER = re.compile(r"-?[0-9]{1,19}")
MAX_BODY_BYTES = 2 << 20

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class PlainText:
    """A non-JSON answer (Prometheus text)."""

    text: str
    content_type: bytes = b"text/plain; version=0.0.4; charset=utf-8"


async def propose(proposer: Proposer, ops: list[Op]) -> None:
    """Commit ops and wait; a rejected op answers HTTP 400 with apply's reason."""
    results = await proposer.call(ops)
    for result in results:
        if result.get("r") != Reason.SUCCESS:
            reason = int(result.get("r", 0))
            raise bad(result.get("err") or Reason(reason).name.lower())


@dataclass
class _PeerCall:
    """A request signed by a member: its signature, which the answer is signed over."""

    signature: str | None = None


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class HttpApi:
    """The ASGI application over a route table."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        manager_token: str,
        *,
        body_timeout_s: float,
        guard: WebGuard,
        peer_key: bytes | None = None,
        node_id: str = "",
    ) -> None:
        self.routes = dict(routes)
        self.routes["/openapi.json"] = Route(
            "GET", self.openapi, body="none", summary="This API's OpenAPI 3.0 description"
        )
        self._manager_token = manager_token
        # Other members sign their calls with this (node/api/peer_auth.py) instead of sending the token.
        self._peer_key = peer_key
        self._node_id = node_id  # what members' signatures must name as the destination
        self._body_timeout_s = body_timeout_s
        self._guard = guard
        self.requests = 0
        self.errors = 0

    async def openapi(self, body: Json, query: Any) -> Json:
        return openapi_document(self.routes, bool(self._manager_token))

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
        own: Site | None = None
        peer = _PeerCall()
        try:
            # First: a Host the node does not serve (DNS rebinding) gets nothing, not even a 404.
            own = self._guard.check_host(scope["headers"])
            status, answer = 200, await self._handle(scope, receive, own, peer)
        except HttpError as exc:
            self.errors += 1
            status, answer = exc.status, {"msg": exc.msg, "status": exc.status}
        except BadCommand as exc:  # an op constructor refused the input, as apply would have
            self.errors += 1
            status, answer = 400, {"msg": str(exc), "status": 400}
        except Exception:
            self.errors += 1
            log.exception("HTTP %s failed", scope.get("path"))
            status, answer = 500, {"msg": "internal error", "status": 500}
        if isinstance(answer, PlainText):
            body, content_type = answer.text.encode(), answer.content_type
        else:
            body, content_type = json.dumps(answer, separators=(",", ":")).encode(), b"application/json"
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *self._guard.response_headers(own),
        ]
        if peer.signature and self._peer_key:
            signature = peer_auth.sign_answer(self._peer_key, peer.signature, status, body)
            headers.append((peer_auth.ANSWER_SIGNATURE_HEADER.encode(), signature.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        log.debug("%s %s -> %d", scope["method"], scope["path"], status)

    async def _handle(
        self, scope: dict[str, Any], receive: Receive, own: Site | None, peer: _PeerCall
    ) -> Any:
        if scope.get("http_version") not in SUPPORTED_VERSIONS:
            # The HTTP/2 preface, let through as a request by node/api/http1.py: answered in HTTP/1.1.
            raise HttpError(505, "this node speaks HTTP/1.1 only")
        route = self.routes.get(scope["path"])
        if route is None:
            raise HttpError(404, f"no such path: {scope['path']}")
        if scope["method"] != route.method:
            raise HttpError(405, f"{scope['path']} takes {route.method}")
        raw_headers = scope["headers"]
        # Before the token: a page on another origin is refused whatever it carries.
        self._guard.check_origin(raw_headers, own)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        # A member's call is checked once its body is in (the signature covers it); anyone else's here.
        peer_signed = bool(self._peer_key) and peer_auth.SIGNATURE_HEADER in headers
        token = self._manager_token
        if token and not route.public and not peer_signed:
            given = headers.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise HttpError(401, "missing or wrong token header")
        if route.method == "POST":
            # Every POST (the writes, and the reads WuKongIM puts on POST) takes JSON only: a form or a
            # `no-cors` fetch from another page cannot send that type. Checked before the body is read.
            self._guard.check_content_type(raw_headers, _has_body(raw_headers))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        raw = b""
        # A client dribbling its body would otherwise hold the request, and what it sent, as long as it likes.
        limit_s = self._body_timeout_s
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
        if peer_signed and self._peer_key:
            query_string = scope.get("query_string", b"").decode("latin-1")
            target = f"{scope['path']}?{query_string}" if query_string else scope["path"]
            peer.signature = peer_auth.verify_request(
                self._peer_key, scope["method"], target, self._node_id, headers, raw
            )
            if peer.signature is None:
                raise HttpError(
                    401,
                    "node-to-node signature not valid (another cluster secret, or a clock "
                    f"more than {peer_auth.MAX_SKEW_S:g} s off)",
                )
        if route.peer and peer.signature is None:
            raise HttpError(403, f"{scope['path']} is for the cluster's own nodes (signed with its secret)")
        if route.body == "none":
            args: dict[str, Any] = {k: v[0] for k, v in query.items() if v}
            for f in route.query:  # a query string carries text: integers arrive as digits
                value = args.get(f.name)
                if f.kind in ("int", "flag") and isinstance(value, str):
                    if not QUERY_INTEGER.fullmatch(value):
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
