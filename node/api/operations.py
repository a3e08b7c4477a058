"""Operations: liveness, Prometheus metrics, where clients connect, connections and node variables."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.api.app import PlainText
from node.api.fields import F, Json, Route, bad
from node.gateway.registry import Registry
from node.metrics import Metrics
from node.wire.protocol import Reason
from raft.commands import MAX_UID_BYTES


@dataclass(frozen=True)
class Addresses:
    """Where clients reach a node ("" for a listener it does not have)."""

    tcp: str
    ws: str
    tcp_tls: str = ""
    wss: str = ""


@dataclass(frozen=True)
class External:
    """The addresses `/route` gives clients, from the node's `external_tcp`, `external_ws`, `external_wss`
    settings ("" where unset: the bound address is given instead). `ws` and `wss` are URLs."""

    tcp: str = ""
    ws: str = ""
    wss: str = ""


@dataclass(frozen=True)
class Identity:
    """Who this node is and where clients reach it: `configured` as the config says, `listening` the bound
    addresses once the listeners run (a config may ask for port 0), None before; `external` what `/route`
    announces (behind NAT, a load balancer or a proxy the bind address is not where clients connect)."""

    node_id: str
    numeric_id: int
    configured: Addresses
    listening: Callable[[], Addresses | None]
    external: External = External()


# Forwards a JSON body to another node's API path (`/conn/kick` for a connection there): (node, path, body).
Forward = Callable[[int, str, Json], Awaitable[Json]]


CONN_FIELDS = (
    F("uid", "uid", default="", max_bytes=MAX_UID_BYTES),
    F("conn_id", "int", default=0),
    F("node_id", "int", default=0, high=1023),
    F("op_node_id", "int", default=0, high=1023),
)


def routes(
    *,
    identity: Identity,
    status: Callable[[], Json],
    metrics: Metrics,
    registry: Registry,
    gateway_statistics: Callable[[], dict[str, int]],
    manager_token_on: bool,
    forward: Forward | None = None,
) -> dict[str, Route]:
    async def health(body: Json, query: Any) -> Json:
        return {"status": "ok"}

    async def render_metrics(body: Json, query: Any) -> PlainText:
        return PlainText(metrics.render())

    def addresses(intranet: bool) -> Json:
        """WuKongIM's three fields (its wss_addr and ws_addr carry the scheme, its tcp_addr none): the
        configured external addresses, or the bound ones where none is set. `intranet`: the bound TCP
        address only, as WuKongIM's `?intranet=1`. `tcp_tls_addr` only when this node has a TLS TCP
        listener, so the answer is WuKongIM's own shape otherwise."""
        where = identity.listening() or identity.configured
        if intranet:
            return {"tcp_addr": where.tcp, "ws_addr": "", "wss_addr": ""}
        external = identity.external
        answer: Json = {
            "tcp_addr": external.tcp or where.tcp,
            "ws_addr": external.ws or f"ws://{where.ws}",
            "wss_addr": external.wss or (f"wss://{where.wss}" if where.wss else ""),
        }
        if identity.configured.tcp_tls:
            answer["tcp_tls_addr"] = where.tcp_tls
        return answer

    async def route(body: Json, query: Any) -> Json:
        return addresses(bool(body["intranet"]))

    async def route_batch(uids: list[str], query: Any) -> list[Json]:
        """WuKongIM's `/route/batch`: any node serves any user, so every uid gets this node's addresses."""
        intranet = query.get("intranet", ["0"])[0] == "1"
        return [{**addresses(intranet), "uids": uids}]

    def conn_action(kick: bool) -> Callable[[Json, Any], Awaitable[Json]]:
        async def handle(body: Json, query: Any) -> Json:
            """WuKongIM's `/conn/kick` (DISCONNECT reason 12, then close: the SDK stops reconnecting) and
            `/conn/remove` (a close without DISCONNECT: the SDK reconnects). A connection of another node
            (`node_id`, or `op_node_id` as WuKongIM names the node that acts) is handed to that node."""
            if not body["conn_id"]:
                raise bad("conn_id is 0")
            target = body["op_node_id"] or body["node_id"] or identity.numeric_id
            if target != identity.numeric_id:
                if forward is None:
                    raise bad(f"node {target} is not this node and this node cannot reach others")
                return await forward(
                    target,
                    "/conn/kick" if kick else "/conn/remove",
                    {**body, "op_node_id": 0, "node_id": target},
                )
            conn = registry.by_id.get(body["conn_id"])
            if conn is not None and (not body["uid"] or conn.uid == body["uid"]):
                if kick:
                    conn.close(Reason.CONNECT_KICK, "server kick")
                else:
                    conn.close(None, "removed by the server")
                registry.remove(conn)
            return {"status": 200}

        return handle

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
                    "protocol": c.protocol,  # binary or jsonrpc (the codec; the transport is below)
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
        "/route": Route(
            "GET",
            route,
            body="none",
            query=(F("uid", "uid", max_bytes=MAX_UID_BYTES), F("intranet", "flag", default=0)),
            summary="Addresses clients should connect to (the node's external_* settings, else its binds)",
        ),
        "/route/batch": Route(
            "POST",
            route_batch,
            body="uid_array",
            summary="Addresses for many users: [{uids, tcp_addr, ws_addr, wss_addr}] (?intranet=1 as /route)",
        ),
        "/conn/kick": Route(
            "POST",
            conn_action(kick=True),
            CONN_FIELDS,
            summary="Kick one connection (DISCONNECT reason 12, then close; the SDK does not reconnect)",
        ),
        "/conn/remove": Route(
            "POST",
            conn_action(kick=False),
            CONN_FIELDS,
            summary="Close one connection without DISCONNECT (the SDK reconnects)",
        ),
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
