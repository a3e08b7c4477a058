"""Operations: liveness, Prometheus metrics, where clients connect, connections and node variables."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.api.app import PlainText
from node.api.fields import F, Json, Route
from node.gateway.registry import Registry
from node.metrics import Metrics
from raft.commands import MAX_UID_BYTES


@dataclass(frozen=True)
class Addresses:
    """Where clients reach a node ("" for a listener it does not have)."""

    tcp: str
    ws: str
    tcp_tls: str = ""
    wss: str = ""


@dataclass(frozen=True)
class Identity:
    """Who this node is and where clients reach it: `configured` as the config says, `listening` the bound
    addresses once the listeners run (a config may ask for port 0), None before."""

    node_id: str
    numeric_id: int
    configured: Addresses
    listening: Callable[[], Addresses | None]


def routes(
    *,
    identity: Identity,
    status: Callable[[], Json],
    metrics: Metrics,
    registry: Registry,
    gateway_statistics: Callable[[], dict[str, int]],
    manager_token_on: bool,
) -> dict[str, Route]:
    async def health(body: Json, query: Any) -> Json:
        return {"status": "ok"}

    async def render_metrics(body: Json, query: Any) -> PlainText:
        return PlainText(metrics.render())

    async def route(body: Json, query: Any) -> Json:
        """WuKongIM's three fields (its wss_addr carries the scheme, its tcp_addr none), and `tcp_tls_addr`
        only when this node has a TLS TCP listener, so the answer is WuKongIM's own shape otherwise."""
        where = identity.listening() or identity.configured
        answer: Json = {
            "tcp_addr": where.tcp,
            "ws_addr": f"ws://{where.ws}",
            "wss_addr": f"wss://{where.wss}" if where.wss else "",
        }
        if identity.configured.tcp_tls:
            answer["tcp_tls_addr"] = where.tcp_tls
        return answer

    async def connz(body: Json, query: Any) -> Json:
        now = trio.current_time()
        conns = [c for c in registry if not body["uid"] or c.uid == body["uid"]]
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
                    "node_id": identity.numeric_id,
                }
                for c in page
            ],
            "now": int(time.time()),
            "total": len(conns),
            "offset": body["offset"],
            "limit": body["limit"],
        }

    async def varz(body: Json, query: Any) -> Json:
        node_status = status()
        return {
            "server_id": identity.numeric_id,
            "server_name": identity.node_id,
            "connections": node_status["connections"],
            "in_msgs": gateway_statistics()["accepted"],
            "tcp_addr": identity.configured.tcp,
            "ws_addr": f"ws://{identity.configured.ws}",
            "manager_token_on": int(manager_token_on),
            "raft": {k: node_status[k] for k in ("role", "term", "commit_index", "applied_index", "leader")},
            "messages": node_status["messages"],
        }

    return {
        "/health": Route("GET", health, body="none", summary="Liveness", public=True),
        "/metrics": Route("GET", render_metrics, body="none", summary="Prometheus metrics"),
        "/route": Route("GET", route, body="none", summary="Addresses clients should connect to"),
        "/connz": Route(
            "GET",
            connz,
            body="none",
            summary="Connections on this node",
            query=(
                F("offset", "int", default=0),
                F("limit", "int", default=20, low=1, high=1000),
                F("uid", "uid", max_bytes=MAX_UID_BYTES),
            ),
        ),
        "/varz": Route("GET", varz, body="none", summary="Node variables"),
    }
