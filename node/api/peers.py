"""Calls from one node to the others' HTTP API: only to current members, signed with the cluster secret
(node/api/peer_auth.py; never the manager token), every answer authenticated, size-capped and time-limited."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Callable
from urllib.parse import urlencode

import httpx
import trio

from node import tls
from node.api import peer_auth
from node.api.fields import Json
from node.config import Config

FANOUT_TIMEOUT_S = 2.0
# The largest answer taken from a peer (a full /connz page is well under it); a bigger one is refused
# after this many bytes instead of being held whole.
ANSWER_MAX_BYTES = 4 << 20


class Peers:
    """Asks other members' HTTP API, each call bounded: the console's fan-out and every operation handed to
    the node that holds a connection (`/conn/*`, `/admin/kick`)."""

    def __init__(
        self,
        config: Config,
        node_id: str,
        own_http: Callable[[], str],
        members: Callable[[], list[str]],
        secret: str,
    ) -> None:
        self._config = config
        self._node_id = node_id
        self._own_http = own_http  # this node's bound address (its config may say port 0)
        self._members = members  # node ids of the current Raft membership (the config only bootstraps it)
        self._key = peer_auth.derive_key(secret)
        # One pooled client for the calls made often (a stream's events): building a client costs an SSL
        # context and a connection per call, milliseconds of the trio thread each.
        self._pooled: httpx.AsyncClient | None = None
        self._verify: ssl.SSLContext | bool = False
        self._scheme = "http"
        if config.tls.http:
            self._scheme = "https"
            self._verify = tls.client_context(config.source, "tls.ca_file", config.tls.ca_file)

    def ids(self) -> list[str]:
        """The current members, by node id: a node configured but never joined (or removed) is not asked."""
        return self._members()

    async def call(
        self,
        node_id: str,
        method: str,
        path: str,
        *,
        params: Json | None = None,
        body: Json | None = None,
        timeout_s: float = FANOUT_TIMEOUT_S,
        pooled: bool = False,
    ) -> Json:
        """{"ok": True, "body": answer} or {"ok": False, "error": why} (a refusal, or the node is down).

        `pooled`: over this node's one kept-alive client (frequent calls), not a client of its own."""
        if node_id != self._node_id and node_id not in self._members():
            return {"ok": False, "error": f"{node_id} is not a member of the cluster", "status": 409}
        address = self._own_http() if node_id == self._node_id else self._config.node(node_id).http
        target = f"{path}?{urlencode(params)}" if params else path
        content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = peer_auth.sign_request(self._key, method, target, self._node_id, node_id, content)
        if body is not None:
            headers["content-type"] = "application/json"
        with trio.move_on_after(timeout_s):
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if pooled:
                        if self._pooled is None:
                            self._pooled = httpx.AsyncClient(verify=self._verify, trust_env=False)
                        client = self._pooled
                    else:
                        client = await stack.enter_async_context(
                            httpx.AsyncClient(verify=self._verify, timeout=timeout_s, trust_env=False)
                        )
                    answer = await stack.enter_async_context(
                        client.stream(
                            method,
                            f"{self._scheme}://{address}{target}",
                            content=content,
                            headers=headers,
                            timeout=timeout_s,
                        )
                    )
                    raw = bytearray()
                    async for chunk in answer.aiter_bytes():
                        raw += chunk
                        if len(raw) > ANSWER_MAX_BYTES:
                            return {"ok": False, "error": f"answer larger than {ANSWER_MAX_BYTES} bytes"}
            except httpx.HTTPError as exc:
                return {"ok": False, "error": f"down: {type(exc).__name__} {exc}".strip()}
            given = answer.headers.get(peer_auth.ANSWER_SIGNATURE_HEADER, "")
            signed = headers[peer_auth.SIGNATURE_HEADER]
            if not peer_auth.verify_answer(self._key, signed, answer.status_code, bytes(raw), given):
                # Whatever listens there does not hold the cluster secret: not one of ours.
                return {"ok": False, "error": "answer not signed with the cluster secret"}
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if answer.status_code != 200:
                msg = parsed.get("msg") if isinstance(parsed, dict) else bytes(raw[:200]).decode("latin-1")
                return {
                    "ok": False,
                    "error": f"HTTP {answer.status_code}: {msg}",
                    "status": answer.status_code,
                }
            return {"ok": True, "body": parsed}
        return {"ok": False, "error": f"down: no answer within {timeout_s:g} s"}
