"""A running imnode node: the store, Raft, the three event pools, the gateway and the HTTP API, wired.

Start-up order matters: the store opens first, then Raft (which replays its journal into the store at once),
then the pools and the distributor that feeds committed entries to them, and only then the listeners, so
no client is accepted before there is somewhere for its events to go.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as serve_http

from node import calls, datadir, memory, plugins, tls
from node.api import admin as admin_api
from node.api import channels as channels_api
from node.api import commands as commands_api
from node.api import console as console_api
from node.api import conversations as conversations_api
from node.api import events as events_api
from node.api import messages as messages_api
from node.api import operations as operations_api
from node.api import peer_auth
from node.api import users as users_api
from node.api.app import HttpApi
from node.api.fields import HttpError, Route
from node.api.guard import WebGuard, WsOriginCheck
from node.api.http1 import http11_only
from node.api.peers import Peers
from node.cluster.ids import Snowflake
from node.cluster.membership import Membership
from node.cluster.presence import Presence
from node.cluster.proposer import Proposer
from node.cluster.webhooks import Webhooks
from node.config import Config, ConfigError, Listening, NodeSpec
from node.gateway.listeners import Gateway
from node.gateway.registry import Registry
from node.metrics import Metrics, Sample
from node.plugins import PluginHost
from node.pools.channel import ChannelContext, build_channel_pool
from node.pools.committed import CommittedStream, sync_handler_states
from node.pools.eventbus import EventPool
from node.pools.pusher import PushContext, build_pusher_pool, resend_due
from node.pools.user import UserContext, build_user_pool
from node.stats import StatsHistory, Totals
from node.streams import PEER_EVENTS_PATH, RELAY_TIMEOUT_S, Relay, StreamHub
from node.trace import Tracer
from raft import outbox
from raft.bridge import RaftNode
from raft.machine import RaftSettings
from raft.secret import SecretError, local_secret, read_secret_file
from storage.store import Store, Txn

log = logging.getLogger("imnode.node")

# Short GIL switch interval: LMDB and PySyncObj release the GIL on every call, and with the default 5 ms a
# busy trio thread makes each re-acquire wait (RAFT_NOTES.md: ~75 ms per apply transaction under load).
SWITCH_INTERVAL_S = 0.0001


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def cluster_secret(config: Config, spec: NodeSpec) -> str:
    """The secret from the config, its secret file, or (a node alone) the node's own; a ConfigError says
    what to do when the file is missing or unsafe."""
    if config.secret:
        return config.secret
    try:
        if config.secret_file:
            return read_secret_file(config.secret_file)
        return local_secret(os.path.join(spec.data_dir, "raft"))
    except (SecretError, OSError) as exc:
        raise ConfigError(
            f"{config.source}: cluster.secret_file: {exc}. `imnode cluster up --config {config.source}` "
            "creates the secret file once (or `imnode cluster secret`); copy that same file, mode 0600, "
            "to every machine of the cluster"
        ) from None


class Node:
    """One node, built from its parts. Each part gets the few things it uses; nothing gets the Node."""

    def __init__(self, config: Config, node_id: str) -> None:
        self.config = config
        self.spec: NodeSpec = config.node(node_id)
        # First: a bad certificate stops the start before anything opens (ConfigError names the key).
        self.tls_context = tls.server_context(config)
        tuning = config.tuning
        # Before anything is opened in it: refuses a data dir others can write, tightens one they can read.
        datadir.secure(self.spec.data_dir)
        self.store = Store(os.path.join(self.spec.data_dir, "store"), map_size=tuning.store_map_bytes)
        # The cluster secret: it authenticates Raft traffic and every node-to-node call. Never empty.
        self.cluster_secret = cluster_secret(config, self.spec)
        self.raft = RaftNode(
            RaftSettings(
                self_addr=self.spec.raft,
                partners=config.partners(node_id),
                data_dir=os.path.join(self.spec.data_dir, "raft"),
                password=self.cluster_secret,
                # Never None: PySyncObj would then bind every interface (0.0.0.0), not the configured host.
                bind_addr=self.spec.raft_bind or self.spec.raft,
                min_timeout_s=tuning.raft_min_timeout_s,
                max_timeout_s=tuning.raft_max_timeout_s,
                leader_fallback_timeout_s=tuning.leader_fallback_timeout_s,
                append_entries_batch_bytes=max(4 << 20, 2 * tuning.batch_max_bytes + tuning.max_frame_bytes),
                compaction_min_entries=tuning.log_compaction_min_entries,
                compaction_min_time_s=tuning.log_compaction_min_time_s,
            ),
            self.store,
            max_in_flight=tuning.proposals_in_flight,
        )
        self.proposer = Proposer(
            self.raft,
            batch_window_ms=tuning.batch_window_ms,
            batch_window_busy_ms=tuning.batch_window_busy_ms,
            batch_max_bytes=tuning.batch_max_bytes,
            commit_timeout_s=tuning.commit_timeout_s,
            max_in_flight=tuning.proposals_in_flight,
        )
        # Followers' batches reach the leader's proposer as member messages (one proposal stream).
        self.raft.on_member_message = self.proposer.on_member_message
        self.registry = Registry()
        numeric_id = self.spec.numeric_id
        self.membership = Membership(self.raft, config.nodes, self.spec.id)
        self.presence = Presence(
            numeric_id,
            self.store,
            self.registry,
            node_down_after_s=tuning.node_down_after_s,
            numeric_ids={spec.raft: spec.numeric_id for spec in config.nodes.values()},
        )
        self.push_ctx = PushContext(tuning, self.registry, self.presence.online_among)
        self.pusher_pool = build_pusher_pool(self.push_ctx)
        self.channel_ctx = ChannelContext(tuning, self.store, self.proposer, Snowflake(numeric_id))
        self.channel_pool = build_channel_pool(self.channel_ctx)
        self.user_ctx = UserContext(
            config, numeric_id, self.store, self.registry, self.channel_pool, self.presence
        )
        self.user_pool = build_user_pool(self.user_ctx)
        self.tracer = Tracer(tuning.trace_sample_every)
        self.gateway = Gateway(
            tuning,
            self.registry,
            self.user_pool,
            self.tracer,
            ws_origins=WsOriginCheck(config, self.spec.id, self._own_http),
            jsonrpc=config.jsonrpc,
        )
        self.pools: dict[str, EventPool[Any]] = {
            "user": self.user_pool,
            "channel": self.channel_pool,
            "pusher": self.pusher_pool,
        }
        self.metrics = Metrics()
        self.plugin_names = self._install_plugins()
        self._sync_handler_states()
        self.raft.on_snapshot_installed = self._on_snapshot_installed
        self.committed = CommittedStream(
            self.raft.committed,
            self.store,
            self.channel_pool,
            self.pusher_pool,
            self.channel_ctx.origins,
            self.presence,
            self.registry,
            self._sync_handler_states,
            self.tracer,
        )
        webhook_tls = None
        if config.webhook.url.startswith("https://"):
            # A CA file that cannot be read stops the start with a ConfigError naming webhook.ca_file.
            webhook_tls = tls.client_context(config.source, "webhook.ca_file", config.webhook.ca_file)
        self.webhooks = Webhooks(config.webhook, self.store, self.proposer, self.raft.is_leader, webhook_tls)
        self.stats = StatsHistory(self._totals, self.tracer)
        self.listening: Listening | None = None
        # The other nodes' HTTP API: the console's fan-out and `/conn/*` handed to the node holding one.
        self.peers = Peers(config, self.spec.id, self._own_http, self._member_ids, self.cluster_secret)
        # Streamed messages: deltas in memory, sent where subscribers are online (node/streams.py).
        node_ids = {spec.numeric_id: spec.id for spec in config.nodes.values()}
        self.relay = Relay(
            self._post_stream_events,
            node_ids.get,
            tuning.stream_relay_queue_max,
            queue_bytes_max=tuning.stream_relay_queue_bytes,
        )
        self.streams = StreamHub(tuning, self.store, self.proposer, self.registry, self.relay, numeric_id)
        self.http = HttpApi(
            self._routes(),
            config.manager_token,
            body_timeout_s=tuning.http_body_timeout_s,
            peer_key=peer_auth.derive_key(self.cluster_secret),
            node_id=self.spec.id,
            guard=WebGuard(config, self.spec.id, self._own_http, self._ws_urls),
        )
        self._register_metrics()

    def _routes(self) -> dict[str, Route]:
        """The HTTP API, resource by resource, each given only what it uses."""
        store, proposer = self.store, self.proposer
        spec = self.spec
        configured = operations_api.Addresses(spec.tcp, spec.ws, spec.tcp_tls, spec.wss)
        external = operations_api.External(spec.external_tcp, spec.external_ws, spec.external_wss)
        identity = operations_api.Identity(
            spec.id, spec.numeric_id, configured, self._listening_addresses, external
        )
        return {
            **operations_api.routes(
                identity=identity,
                status=self.status,
                metrics=self.metrics,
                registry=self.registry,
                gateway_statistics=self.gateway.statistics,
                manager_token_on=bool(self.config.manager_token),
                forward=self._forward,
            ),
            **users_api.routes(store, proposer),
            **channels_api.routes(store, proposer),
            **messages_api.routes(
                store,
                self.channel_pool,
                self.config.tuning.commit_timeout_s,
                functools.partial(events_api.fill_event_meta, store, self.streams),
            ),
            **events_api.routes(
                store, self.streams, self.registry, self.config.tuning.stream_deltas_queued_max
            ),
            **conversations_api.routes(store, proposer),
            **commands_api.routes(store, proposer),
            **admin_api.routes(
                node_id=self.spec.id,
                status=self.status,
                store=store,
                proposer=proposer,
                membership=self.membership,
                pools=self.pools,
                plugin_names=self.plugin_names,
                webhooks=self.webhooks,
                is_leader=self.raft.is_leader,
                trace=self.tracer.summary,
            ),
            **console_api.static_routes(),
            **console_api.routes(
                node_id=self.spec.id,
                config=self.config,
                status=self.status,
                stats=self.stats,
                store=store,
                registry=self.registry,
                peers=self.peers,
            ),
        }

    async def _forward(self, numeric_id: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to another node's API (an operation on its own connections) and return its answer;
        a node that is not configured, or does not answer in time, is a 400 naming it."""
        spec = next((n for n in self.config.nodes.values() if n.numeric_id == numeric_id), None)
        if spec is None:
            raise HttpError(400, f"no node with numeric id {numeric_id}")
        answer = await self.peers.call(
            spec.id, "POST", path, body=body, timeout_s=self.config.tuning.http_body_timeout_s
        )
        if not answer["ok"] or not isinstance(answer["body"], dict):
            why = answer.get("error") or f"answered {answer['body']!r}"
            raise HttpError(400, f"node {spec.id} ({spec.http}) did not answer {path}: {why}")
        return dict(answer["body"])

    async def _post_stream_events(self, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.peers.call(
            node_id, "POST", PEER_EVENTS_PATH, body=body, timeout_s=RELAY_TIMEOUT_S, pooled=True
        )

    def _member_ids(self) -> list[str]:
        """The current Raft members by node id (an address no config table names is left out)."""
        ids = {spec.raft: node_id for node_id, spec in self.config.nodes.items()}
        return [ids[address] for address in self.raft.members() if address in ids]

    def _own_http(self) -> str:
        return self.listening.http if self.listening else self.spec.http

    def _ws_urls(self) -> list[str]:
        """Every WebSocket URL of the cluster's nodes (this one's as bound): what the console's page may
        connect to (its Content-Security-Policy)."""
        urls: list[str] = []
        at = self.listening
        for spec in self.config.nodes.values():
            ws, wss = (at.ws, at.wss) if at is not None and spec.id == self.spec.id else (spec.ws, spec.wss)
            urls += [f"ws://{ws}", *([f"wss://{wss}"] if wss else [])]
            urls += [url for url in (spec.external_ws, spec.external_wss) if url]
        return urls

    def _listening_addresses(self) -> operations_api.Addresses | None:
        at = self.listening
        return None if at is None else operations_api.Addresses(at.tcp, at.ws, at.tcp_tls, at.wss)

    def _install_plugins(self) -> list[str]:
        """Load every configured and published plugin; a bad one stops the start (PluginError names it)."""
        host = PluginHost(self.metrics, self.spec.id)
        plugins.add_search_dir(self.config.base_dir)
        refs = [plugins.PluginRef(ref, options) for ref, options in self.config.plugins]
        if self.config.entry_point_plugins:
            refs += plugins.entry_point_plugins()
        names: list[str] = []
        for ref in refs:
            specs = plugins.load(ref, host)
            plugins.install(ref, specs, self.pools)
            names += [spec.name for spec in specs]
        return names

    def _sync_handler_states(self) -> None:
        sync_handler_states(self.store, self.pools)

    # -- running -----------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        memory.map_large_buffers()  # clients' large frames: freed memory goes back (node/memory.py)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.raft.run)
                for pool in (self.pusher_pool, self.channel_pool, self.user_pool):
                    await nursery.start(pool.run)
                nursery.start_soon(self.committed.run)
                nursery.start_soon(self.proposer.run)
                nursery.start_soon(self._resend_loop)
                nursery.start_soon(self._sync_loop)
                nursery.start_soon(self._stats_loop)
                nursery.start_soon(self.presence.watch_nodes, self.raft)
                nursery.start_soon(self.membership.log_changes)
                nursery.start_soon(self.webhooks.run)
                nursery.start_soon(self.relay.run)
                nursery.start_soon(self.streams.expire_idle)
                # Accept clients once a leader is known (bounded: a node of a cluster whose other members
                # are still down starts listening anyway, and its sends wait for the commit timeout).
                with trio.move_on_after(self.config.tuning.raft_max_timeout_s * 4):
                    # Polled: PySyncObj's state lives on its own thread and offers no trio event.
                    while not self.raft.is_ready():  # noqa: ASYNC110
                        await trio.sleep(0.01)
                # Before clients (DESIGN.md): the new epoch clears this node's rows from its previous
                # life, and presence changes wait for it. Bounded: without a quorum the node starts
                # anyway and keeps trying.
                with trio.move_on_after(self.config.tuning.commit_timeout_s) as epoch_wait:
                    await self.presence.announce_epoch(self.proposer)
                if epoch_wait.cancelled_caught:
                    nursery.start_soon(self.presence.announce_epoch, self.proposer)
                # Before clients: messages applied before the webhook settings are would have no events
                # (or events for a webhook switched off). Only the leader publishes its settings.
                with trio.move_on_after(self.config.tuning.commit_timeout_s):
                    await self.webhooks.publish_config()
                tcp_host, tcp_port = _split(self.spec.tcp)
                ws_host, ws_port = _split(self.spec.ws)
                http_host, http_port = _split(self.spec.http)
                tcp_bound = await nursery.start(self.gateway.serve_tcp, tcp_host, tcp_port)
                ws_bound = await nursery.start(self.gateway.serve_ws, ws_host, ws_port)
                tcp_tls, wss = "", ""
                if self.spec.tcp_tls:
                    host, port = _split(self.spec.tcp_tls)
                    serve = functools.partial(self.gateway.serve_tcp, ssl_context=self.tls_context)
                    tcp_tls = f"{host}:{await nursery.start(serve, host, port)}"
                if self.spec.wss:
                    host, port = _split(self.spec.wss)
                    serve = functools.partial(self.gateway.serve_ws, ssl_context=self.tls_context)
                    wss = f"{host}:{await nursery.start(serve, host, port)}"
                binds = await nursery.start(
                    functools.partial(
                        serve_http, cast(Any, self.http), self._http_config(http_host, http_port)
                    )
                )
                http_bound = int(binds[0].rsplit(":", 1)[1])
                self.listening = Listening(
                    self.spec.id,
                    f"{tcp_host}:{tcp_bound}",
                    f"{ws_host}:{ws_bound}",
                    f"{http_host}:{http_bound}",
                    self.spec.raft,
                    tcp_tls=tcp_tls,
                    wss=wss,
                    https=self.config.tls.http,
                )
                task_status.started(self.listening)
        finally:
            self.raft.close()
            self.store.close()

    def _http_config(self, host: str, port: int) -> HypercornConfig:
        http11_only()  # neither listener speaks HTTP/2 (h2c upgrade, prior knowledge): node/api/http1.py
        config = HypercornConfig()
        config.bind = [f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("imnode.http.server")
        config.graceful_timeout = 1.0
        if self.config.tls.http:
            # Already loaded once by tls.server_context, so a bad file was refused before anything started.
            config.certfile = self.config.tls.cert_file
            config.keyfile = self.config.tls.key_file
            # HTTP/1.1 only, what business servers use: HTTP/2 would expose one more parser for no gain.
            config.alpn_protocols = ["http/1.1"]
            config.ssl_handshake_timeout = self.config.tuning.connect_timeout_s
        return config

    def _on_snapshot_installed(self) -> None:
        """After a snapshot replaced the store: re-read replicated settings, and have clients resync.

        Entries that arrive inside a snapshot produce no apply call here, so no push: a connected client
        would silently miss them. Disconnecting makes it reconnect and sync what it missed.
        """
        log.info(
            "store replaced by a snapshot (applied index %d): settings re-read, %d clients asked to resync",
            self.store.applied_index(),
            len(self.registry),
        )
        self._sync_handler_states()
        for conn in list(self.registry):
            # No DISCONNECT: the SDKs take any DISCONNECT for a kick and stop reconnecting (WuKongIM sends
            # one only for a kick); a plain close makes them reconnect and sync.
            conn.close(None, "state replaced by a snapshot: reconnect and sync")

    async def _resend_loop(self) -> None:
        interval = max(0.05, self.config.tuning.recv_resend_interval_s / 4)
        while True:
            await trio.sleep(interval)
            resend_due(self.push_ctx, trio.current_time())

    async def _sync_loop(self) -> None:
        """Flush LMDB to disk now and then (its commits are unsynced; see the durability note in README)."""
        while True:
            await trio.sleep(self.config.tuning.store_sync_interval_s)
            await trio.to_thread.run_sync(self.store.sync)

    async def _stats_loop(self) -> None:
        """One sample a second of counters already kept, for the console's charts (node/stats.py)."""
        while True:
            self.stats.sample()
            await trio.sleep(1.0)

    def _totals(self) -> Totals:
        raft = self.raft.status()
        return Totals(
            acked=self.channel_ctx.acked,
            delivered=self.push_ctx.delivered,
            committed=self.committed.committed_messages,
            commit_index=raft.get("commit_index") or 0,
            applied_index=raft.get("applied_index") or 0,
            connections=len(self.registry),
        )

    # -- inspection ----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """This node's view, in the shape `imnode admin status --json` prints per node."""
        raft = self.raft.status()
        name_of = self.membership.name_of
        commit, applied = raft.get("commit_index") or 0, raft.get("applied_index") or 0
        return {
            "id": self.spec.id,
            # Which process answers: `cluster up` reports only a cluster of the processes it started.
            "pid": os.getpid(),
            "role": raft["role"],
            "leader": name_of(raft["leader"]),
            "term": raft["term"],
            "commit_index": commit,
            "applied_index": applied,
            "lag": max(0, commit - applied),
            "store_applied_index": raft["store_applied_index"],
            "log_len": raft["log_len"],
            "members": [name_of(m) for m in raft["members"]],
            "connected": {name_of(k): v for k, v in raft["connected"].items()},
            "has_quorum": raft["has_quorum"],
            "connections": len(self.registry),
            "online_users": self.registry.online_users(),
            "pools": {
                pool.name: {"queue_depth": sum(pool.queue_depths()), "dead_letters": len(pool.dead_letters)}
                for pool in self.pools.values()
            },
            "dead_letters": sum(len(pool.dead_letters) for pool in self.pools.values()),
            "proposer": self.proposer.statistics(),
            "streams": self.streams.statistics(),
            "messages": {
                "committed": self.committed.committed_messages,
                "acked": self.channel_ctx.acked,
                "delivered": self.push_ctx.delivered,
                "resent": self.push_ctx.resent,
                "expired": self.push_ctx.expired,
                "offline_notices": self.push_ctx.offline_notices,
            },
            "gateway": self.gateway.statistics(),
            "store": self.store.stats(),
            "process": {
                # ru_maxrss is in KiB on Linux: the process's peak resident set since it started.
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "cpu_s": round(time.process_time(), 2),
                # Only with IMNODE_COUNT_CALLS=1 (node/calls.py): Python calls since the counter went on.
                **(
                    {"python_calls": calls.total(), "python_calls_by_thread": calls.by_thread()}
                    if calls.installed()
                    else {}
                ),
            },
        }

    def _register_metrics(self) -> None:
        """The node's own series: connections, Raft, messages, pools, handlers, HTTP."""
        node, m = self, self.metrics

        def one(value: float) -> list[Sample]:
            return [({}, value)]

        m.gauge("imnode_connections", "Client connections on this node", lambda: one(len(node.registry)))
        m.gauge(
            "imnode_online_users",
            "Users with a connection on this node",
            lambda: one(node.registry.online_users()),
        )

        def raft_series(key: str) -> Callable[[], list[Sample]]:
            return lambda: one(float(node.raft.status().get(key) or 0))

        m.gauge("imnode_raft_term", "Current Raft term", raft_series("term"))
        m.gauge("imnode_raft_commit_index", "Raft commit index", raft_series("commit_index"))
        m.gauge("imnode_raft_applied_index", "Raft last applied index", raft_series("applied_index"))
        m.gauge(
            "imnode_raft_is_leader",
            "1 on the leader",
            lambda: one(1.0 if node.raft.status()["role"] == "leader" else 0.0),
        )

        def total(read: Callable[[], float]) -> Callable[[], list[Sample]]:
            return lambda: one(float(read()))

        counters: tuple[tuple[str, str, Callable[[], float]], ...] = (
            (
                "imnode_messages_committed_total",
                "Messages committed (applied here)",
                lambda: node.committed.committed_messages,
            ),
            ("imnode_messages_acked_total", "SENDACKs written by this node", lambda: node.channel_ctx.acked),
            (
                "imnode_messages_delivered_total",
                "RECVs written by this node",
                lambda: node.push_ctx.delivered,
            ),
            ("imnode_messages_resent_total", "RECVs resent with DUP", lambda: node.push_ctx.resent),
            (
                "imnode_offline_notices_total",
                "Recipients offline cluster-wide",
                lambda: node.push_ctx.offline_notices,
            ),
            (
                "imnode_raft_entries_total",
                "Raft entries this node proposed",
                lambda: node.proposer.entries,
            ),
            ("imnode_http_requests_total", "HTTP API requests", lambda: node.http.requests),
            (
                "imnode_http_errors_total",
                "HTTP API requests answered with an error",
                lambda: node.http.errors,
            ),
        )
        for name, text, read in counters:
            m.gauge(name, text, total(read), kind="counter")

        def pool_series(attr: str) -> Callable[[], list[Sample]]:
            def read() -> list[Sample]:
                return [({"pool": name}, float(getattr(pool, attr))) for name, pool in node.pools.items()]

            return read

        m.gauge(
            "imnode_pool_queue_depth",
            "Events waiting in a pool's shards",
            lambda: [({"pool": name}, float(sum(pool.queue_depths()))) for name, pool in node.pools.items()],
        )
        m.gauge(
            "imnode_pool_processed_total", "Events a pool handled", pool_series("processed"), kind="counter"
        )
        m.gauge(
            "imnode_pool_rejected_total",
            "Events a pool's chain rejected",
            pool_series("rejected"),
            kind="counter",
        )
        m.gauge(
            "imnode_pool_dead_letters",
            "Events dead-lettered by failing handlers (kept, bounded)",
            lambda: [({"pool": name}, float(len(pool.dead_letters))) for name, pool in node.pools.items()],
        )

        def handler_series(attr: str) -> Callable[[], list[Sample]]:
            def read() -> list[Sample]:
                samples: list[Sample] = []
                for pool_name, pool in node.pools.items():
                    for event in sorted(pool.event_types()):
                        for h in pool.chain(event):
                            labels = {"pool": pool_name, "event": event, "handler": h.name}
                            samples.append((labels, float(getattr(h.stats, attr))))
                return samples

            return read

        def webhook_series(attr: str) -> Callable[[], list[Sample]]:
            return lambda: [
                ({"stream": name}, float(getattr(state, attr)))
                for name, state in node.webhooks.streams.items()
            ]

        m.gauge(
            "imnode_webhook_delivered_total",
            "Webhook events delivered (HTTP 200)",
            webhook_series("delivered"),
            kind="counter",
        )
        m.gauge(
            "imnode_webhook_dead_lettered_total",
            "Webhook events moved to dead letters",
            webhook_series("dead_lettered"),
            kind="counter",
        )
        m.gauge("imnode_webhook_failures", "Failed attempts in a row on a stream", webhook_series("failures"))

        def webhook_backlog() -> list[Sample]:
            with node.store.read() as txn:
                return [
                    ({"stream": s}, float(outbox.head(txn, s) - outbox.cursor(txn, s)))
                    for s in outbox.STREAMS
                ]

        m.gauge("imnode_webhook_backlog", "Webhook events waiting in the replicated outbox", webhook_backlog)

        def webhook_deadletters(read: Callable[[Txn, str], int]) -> Callable[[], list[Sample]]:
            def samples() -> list[Sample]:
                with node.store.read() as txn:
                    return [({"stream": s}, float(read(txn, s))) for s in outbox.STREAMS]

            return samples

        m.gauge(
            "imnode_webhook_deadletters",
            "Webhook dead letters kept (replicated; at most webhook.deadletters_max per stream)",
            webhook_deadletters(outbox.deadletter_count),
        )
        m.gauge(
            "imnode_webhook_deadletters_dropped_total",
            "Webhook dead letters dropped, oldest first, to keep a stream within webhook.deadletters_max",
            webhook_deadletters(outbox.deadletters_dropped),
            kind="counter",
        )
        m.gauge("imnode_handler_calls_total", "Handler calls", handler_series("calls"), kind="counter")
        m.gauge(
            "imnode_handler_errors_total",
            "Handler calls that raised",
            handler_series("errors"),
            kind="counter",
        )
        m.gauge(
            "imnode_handler_rejects_total",
            "Events a handler rejected",
            handler_series("rejects"),
            kind="counter",
        )


async def run_node(config: Config, node_id: str, on_ready: Callable[[Listening], None] | None = None) -> None:
    """Run one node until cancelled."""
    node = Node(config, node_id)
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(node.run)
        if on_ready is not None:
            on_ready(listening)
