"""Calls from one node to the others' HTTP API (TLS and manager token as configured, every call bounded)."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import httpx
import trio

from node import tls
from node.api.fields import Json
from node.config import Config

FANOUT_TIMEOUT_S = 2.0


class Peers:
    """Asks other nodes' HTTP API, with the manager token from the config, each call bounded: the console's
    fan-out and every operation handed to the node that holds a connection (`/conn/*`, `/admin/kick`)."""

    def __init__(self, config: Config, node_id: str, own_http: Callable[[], str]) -> None:
        self._config = config
        self._node_id = node_id
        self._own_http = own_http  # this node's bound address (its config may say port 0)
        self._verify: ssl.SSLContext | bool = False
        self._scheme = "http"
        if config.tls.http:
            self._scheme = "https"
            self._verify = tls.client_context(config.source, "tls.ca_file", config.tls.ca_file)

    def ids(self) -> list[str]:
        return list(self._config.nodes)

    async def call(
        self,
        node_id: str,
        method: str,
        path: str,
        *,
        params: Json | None = None,
        body: Json | None = None,
        timeout_s: float = FANOUT_TIMEOUT_S,
    ) -> Json:
        """{"ok": True, "body": answer} or {"ok": False, "error": why} (a refusal, or the node is down)."""
        address = self._own_http() if node_id == self._node_id else self._config.node(node_id).http
        url = f"{self._scheme}://{address}{path}"
        headers = {"token": self._config.manager_token} if self._config.manager_token else {}
        with trio.move_on_after(timeout_s):
            try:
                async with httpx.AsyncClient(
                    verify=self._verify, timeout=timeout_s, trust_env=False
                ) as client:
                    answer = await client.request(method, url, params=params, json=body, headers=headers)
            except httpx.HTTPError as exc:
                return {"ok": False, "error": f"down: {type(exc).__name__} {exc}".strip()}
            try:
                parsed = answer.json()
            except ValueError:
                parsed = None
            if answer.status_code != 200:
                msg = parsed.get("msg") if isinstance(parsed, dict) else answer.text[:200]
                return {
                    "ok": False,
                    "error": f"HTTP {answer.status_code}: {msg}",
                    "status": answer.status_code,
                }
            return {"ok": True, "body": parsed}
        return {"ok": False, "error": f"down: no answer within {timeout_s:g} s"}
