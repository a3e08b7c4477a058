"""Admin endpoints (manager token): status, membership, digests, handler chains, webhook dead letters."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from node.api.app import propose
from node.api.fields import F, HttpError, Json, Route, bad
from node.cluster import digests
from node.cluster.membership import AdminRefused, Membership
from node.cluster.proposer import Proposer
from node.cluster.webhooks import Webhooks
from node.pools.eventbus import EventPool
from raft import outbox
from raft.commands import WEBHOOK_EVENT_OF_STREAM, handler_state_op
from storage.store import Store


def routes(
    *,
    node_id: str,
    status: Callable[[], Json],
    store: Store,
    proposer: Proposer,
    membership: Membership,
    pools: Mapping[str, EventPool[Any]],
    plugin_names: Sequence[str],
    webhooks: Webhooks,
    is_leader: Callable[[], bool],
    trace: Callable[[], Json],
) -> dict[str, Route]:
    """`status`: this node's view, as `imnode admin status --json` prints it per node."""

    async def admin_status(body: Json, query: Any) -> Json:
        return status()

    async def admin_trace(body: Json, query: Any) -> Json:
        """Where the time of a sampled message goes, stage by stage (node/trace.py)."""
        return trace()

    async def admin_pools(body: Json, query: Any) -> Json:
        return {pool.name: pool.statistics() for pool in pools.values()}

    async def admin_members(body: Json, query: Any) -> Json:
        if body["action"] not in ("add", "remove"):
            raise bad("action must be 'add' or 'remove'")
        try:
            if body["action"] == "add":
                return await membership.add(body["node"])
            return await membership.remove(body["node"])
        except AdminRefused as exc:
            raise HttpError(409, str(exc)) from None

    async def admin_transfer(body: Json, query: Any) -> Json:
        try:
            return await membership.transfer_leadership(body["node"] or None)
        except AdminRefused as exc:
            raise HttpError(409, str(exc)) from None

    async def admin_digests(body: Json, query: Any) -> Json:
        return digests.digests(store, node_id)

    async def admin_handlers(body: Json, query: Any) -> Json:
        """Every pool's chains with per-handler counts, and the replicated list of disabled handlers."""
        with store.read() as txn:
            disabled = txn.meta("handlers_disabled") or []
        return {
            "node": node_id,
            "disabled": disabled,
            "plugins": list(plugin_names),
            "pools": {name: pool.statistics()["handlers"] for name, pool in pools.items()},
        }

    async def admin_handler_state(body: Json, query: Any) -> Json:
        name, enabled = body["name"], bool(body["enabled"])
        known = {h.name for pool in pools.values() for t in pool.event_types() for h in pool.chain(t)}
        if name not in known:
            raise bad(f"no handler named {name!r} (known: {', '.join(sorted(known))})")
        if name not in plugin_names:
            # Built-ins (auth, store, push...) are the node itself: without `store` no send is ever answered.
            loaded = ", ".join(sorted(plugin_names)) or "none loaded"
            raise bad(f"{name!r} is a built-in handler and cannot be switched off (plugins: {loaded})")
        await propose(proposer, [handler_state_op(name, enabled)])
        return {"name": name, "enabled": enabled}

    async def admin_deadletters(body: Json, query: Any) -> Json:
        with store.read() as txn:
            letters = outbox.deadletters(txn)
            pending = {s: outbox.head(txn, s) - outbox.cursor(txn, s) for s in outbox.STREAMS}
            kept = {s: outbox.deadletter_count(txn, s) for s in outbox.STREAMS}
            dropped = {s: outbox.deadletters_dropped(txn, s) for s in outbox.STREAMS}
            hook = outbox.config(txn) or {}
        return {
            "deadletters": [
                {
                    "stream": stream,
                    "event": WEBHOOK_EVENT_OF_STREAM[stream],
                    "seq": seq,
                    "error": value["error"],
                    "attempts": value["attempts"],
                }
                for stream, seq, value in letters
            ],
            "pending": pending,
            # Per stream: how many are kept (the list above shows up to 10,000), and how many the cap
            # (`webhook.deadletters_max`, per stream) dropped, oldest first.
            "kept": kept,
            "dropped": dropped,
            "deadletters_max": hook.get("deadletters_max", outbox.DEFAULT_DEADLETTERS_MAX),
            "delivery": webhooks.statistics(),
        }

    async def admin_replay(body: Json, query: Any) -> Json:
        if not is_leader():
            raise HttpError(409, "ask the leader: it delivers webhooks")
        return await webhooks.replay_deadletters()

    return {
        "/admin/status": Route("GET", admin_status, body="none", admin=True),
        "/admin/pools": Route("GET", admin_pools, body="none", admin=True),
        "/admin/trace": Route("GET", admin_trace, body="none", admin=True),
        "/admin/members": Route(
            "POST", admin_members, (F("action", required=True), F("node", required=True)), admin=True
        ),
        "/admin/transfer": Route("POST", admin_transfer, (F("node"),), admin=True),
        "/admin/digests": Route("GET", admin_digests, body="none", admin=True),
        "/admin/handlers": Route("GET", admin_handlers, body="none", admin=True),
        "/admin/handlers/state": Route(
            "POST",
            admin_handler_state,
            (F("name", required=True), F("enabled", "flag", required=True)),
            admin=True,
        ),
        "/admin/deadletters": Route("GET", admin_deadletters, body="none", admin=True),
        "/admin/deadletters/replay": Route("POST", admin_replay, (), admin=True),
    }
