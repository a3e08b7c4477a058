"""The web console: its static files under /console/, and the few admin endpoints it reads.

The page (static/index.html, console.js, console.css) is plain files in the package: no build step, nothing
fetched from elsewhere. It reads the HTTP API that exists (messagesync, conversation/sync, handlers, dead
letters) plus what is here:

- `GET /admin/stats`: this node's status and its rate history (node/stats.py), for the live charts;
- `GET /admin/cluster?path=...`: one read-only admin path asked of every configured node at once, so the
  page talks to the node that served it only (a browser cannot send the token to other origins without
  CORS) and a node that is down is an answer ("down: ...") rather than a failed page;
- `POST /admin/kick`: close one client connection on any node (forwarded to that node);
- `POST /admin/cluster/replay`: replay the webhook dead letters on the leader, whichever node is asked;
- `GET /admin/channel`, `GET /admin/user`: a channel's record and lists, a user's devices per node.

The static files are public (they hold no data, and a browser cannot put the token on a navigation); every
data call needs the manager token like the rest of the API.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import trio

from node.api.app import PlainText
from node.api.fields import F, HttpError, Json, Route, bad, stored_channel
from node.api.peers import Peers
from node.config import Config
from node.gateway.registry import Registry
from node.stats import StatsHistory
from node.wire.protocol import Reason
from raft.commands import CHANNEL_PERSON, MAX_UID_BYTES, person_channel_id
from storage.keys import channel_key
from storage.store import Store

# What `/admin/cluster` may ask of the members: reads only, so a console cannot turn it into a write relay.
FANOUT_PATHS = ("/admin/status", "/admin/stats", "/admin/handlers", "/admin/deadletters", "/connz", "/route")
REPLAY_TIMEOUT_S = 60.0  # one POST per dead letter, each bounded by the webhook's own timeout
LIST_MAX = 1000  # subscribers and list entries shown per channel
STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
}


def static_files() -> dict[str, PlainText]:
    """The console's files, read once when the node starts (a missing one is a broken install: fail early)."""
    folder = resources.files(__name__).joinpath("static")
    return {name: PlainText(folder.joinpath(name).read_text("utf-8"), kind) for name, kind in STATIC.items()}


def static_routes() -> dict[str, Route]:
    files = static_files()

    def serve(name: str) -> Route:
        async def handle(body: Json, query: Any) -> PlainText:
            return files[name]

        return Route("GET", handle, body="none", public=True, summary=f"The web console ({name})")

    return {
        "/console": serve("index.html"),
        "/console/": serve("index.html"),
        "/console/console.js": serve("console.js"),
        "/console/console.css": serve("console.css"),
    }


def routes(
    *,
    node_id: str,
    config: Config,
    status: Callable[[], Json],
    stats: StatsHistory,
    store: Store,
    registry: Registry,
    peers: Peers,
) -> dict[str, Route]:
    name_of_numeric = {spec.numeric_id: name for name, spec in config.nodes.items()}

    async def admin_stats(body: Json, query: Any) -> Json:
        return {"node": node_id, "status": status(), "interval_s": 1.0, "samples": stats.since(body["since"])}

    async def admin_cluster(body: Json, query: Any) -> Json:
        path = body["path"]
        if path not in FANOUT_PATHS:
            raise bad(f"path must be one of {', '.join(FANOUT_PATHS)}")
        params = {k: body[k] for k in ("since", "uid", "offset", "limit") if body[k] not in (None, "")}
        answers: dict[str, Json] = {}

        async def ask(member: str) -> None:
            answers[member] = await peers.call(member, "GET", path, params=params)

        async with trio.open_nursery() as nursery:
            for member in peers.ids():
                nursery.start_soon(ask, member)
        return {
            "path": path,
            "asked_by": node_id,
            "nodes": [{"id": m, **answers[m]} for m in peers.ids()],
            # Every node of the config, members or not: the overview lists a configured non-member as such
            # (it is not asked: node-to-node calls go to current members only).
            "configured": list(config.nodes),
        }

    async def admin_kick(body: Json, query: Any) -> Json:
        target = body["node"] or node_id
        if target not in config.nodes:
            raise bad(f"no node named {target!r} (configured: {', '.join(config.nodes)})")
        if target != node_id:
            answer = await peers.call(target, "POST", "/admin/kick", body={"node": target, "id": body["id"]})
            if not answer["ok"]:
                raise HttpError(answer.get("status", 502), f"{target}: {answer['error']}")
            return dict(answer["body"])
        conn = registry.by_id.get(body["id"])
        if conn is None:
            raise HttpError(404, f"no connection {body['id']} on {node_id}")
        # As a second login kicks: DISCONNECT with reason 12, and the connection's close runs the user
        # pool's `close` chain (registry, replicated presence) like any other.
        conn.close(Reason.CONNECT_KICK, "kicked by an operator")
        return {"node": node_id, "id": conn.id, "uid": conn.uid, "kicked": True}

    async def admin_replay(body: Json, query: Any) -> Json:
        leader = status()["leader"]
        if leader is None or leader not in config.nodes:
            raise HttpError(409, "no leader known: webhooks are delivered (and replayed) by the leader")
        answer = await peers.call(
            leader, "POST", "/admin/deadletters/replay", body={}, timeout_s=REPLAY_TIMEOUT_S
        )
        if not answer["ok"]:
            raise HttpError(answer.get("status", 502), f"{leader}: {answer['error']}")
        return {"leader": leader, **answer["body"]}

    async def admin_channel(body: Json, query: Any) -> Json:
        channel_type = body["channel_type"]
        stored = stored_channel(body["login_uid"] or "", body["channel_id"], channel_type)
        first, _, second = stored.partition("@")
        if channel_type == CHANNEL_PERSON and first and second and "@" not in second:
            # `alice@bob` or `bob@alice`: either order names the one channel (stored in one order only).
            stored = person_channel_id(first, second)
        if channel_type == CHANNEL_PERSON and "@" not in stored:
            raise bad("a person channel is named a@b, or by the other party with login_uid")
        chan = channel_key(stored, channel_type)
        with store.read() as txn:
            record = txn.channel(chan)
            if record is None:
                raise HttpError(404, f"no channel {stored!r} of type {channel_type}")
            lists = {
                name: txn.members(name, chan, limit=LIST_MAX + 1)
                for name in ("subscribers", "blacklist", "whitelist")
            }
        info = {k: v for k, v in record.items() if isinstance(v, int | str | bool | float)}
        return {
            "channel_id": stored,
            "channel_type": channel_type,
            "info": info,
            "last_message_seq": int(record.get("last_seq", 0)),
            **{name: uids[:LIST_MAX] for name, uids in lists.items()},
            "truncated": {name: len(uids) > LIST_MAX for name, uids in lists.items()},
        }

    async def admin_user(body: Json, query: Any) -> Json:
        uid = body["uid"]
        with store.read() as txn:
            presence = txn.presence_of(uid)
            user = txn.user(uid) or {}
        devices = [
            {
                "node": name_of_numeric.get(numeric, str(numeric)),
                "conn": conn,
                "device_flag": row.get("flag", 0),
                "device_level": row.get("level", 0),
            }
            for numeric, conn, row in presence
        ]
        return {
            "uid": uid,
            "online": bool(devices),
            "devices": devices,
            "token_device_flags": sorted(int(f) for f in user.get("tokens", {})),
        }

    uid_field = F("uid", "uid", max_bytes=MAX_UID_BYTES)
    return {
        "/admin/stats": Route(
            "GET",
            admin_stats,
            body="none",
            admin=True,
            summary="This node's status and its per-second rates of the last five minutes (console charts)",
            query=(F("since", "int", default=0, description="only samples after this unix time (s)"),),
        ),
        "/admin/cluster": Route(
            "GET",
            admin_cluster,
            body="none",
            admin=True,
            summary="Ask every configured node one read-only admin path at once ({ok, body} or {ok, error})",
            query=(
                F("path", required=True, description=f"one of {', '.join(FANOUT_PATHS)}"),
                F("since", "int"),
                uid_field,
                F("offset", "int"),
                F("limit", "int", low=1, high=1000),
            ),
        ),
        "/admin/kick": Route(
            "POST",
            admin_kick,
            (
                F("node", description="the node the connection is on (default: this one)"),
                F("id", "int", required=True, low=1),
            ),
            admin=True,
            summary="Close one client connection (DISCONNECT reason 12), on any node",
        ),
        "/admin/cluster/replay": Route(
            "POST",
            admin_replay,
            (),
            admin=True,
            summary="Post the webhook dead letters again, on the leader (asked of any node)",
        ),
        "/admin/channel": Route(
            "GET",
            admin_channel,
            body="none",
            admin=True,
            summary="A channel's record, subscribers, blacklist and whitelist (404 if there is none)",
            query=(
                F("channel_id", required=True),
                F("channel_type", "int", required=True, low=1, high=255),
                F("login_uid", "uid", max_bytes=MAX_UID_BYTES),
            ),
        ),
        "/admin/user": Route(
            "GET",
            admin_user,
            body="none",
            admin=True,
            summary="A user's online devices, cluster-wide, with the node each is on",
            query=(F("uid", "uid", required=True, max_bytes=MAX_UID_BYTES),),
        ),
    }
