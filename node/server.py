"""A running imnode node: the store, Raft, the three event pools, the gateway and the HTTP API, wired.

Start-up order matters: the store opens first, then Raft (which replays its journal into the store at once),
then the pools and the distributor that feeds committed entries to them, and only then the listeners, so
no client is accepted before there is somewhere for its events to go.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as serve_http

from node import plugins, tls
from node.channel_pool import ChannelContext, Delivery, build_channel_pool
from node.config import Config, NodeSpec
from node.eventbus import EventPool
from node.gateway import Gateway
from node.http_api import HttpApi
from node.ids import Snowflake
from node.metrics import Metrics, register_node_metrics
from node.plugins import PluginHost
from node.presence import Presence
from node.proposer import Proposer
from node.protocol import Reason
from node.pusher_pool import PushContext, build_pusher_pool, resend_due
from node.registry import Registry
from node.user_pool import UserContext, build_user_pool
from node.webhooks import Webhooks
from raft.bridge import RaftNode
from raft.commands import (
    OP_DEVICE_QUIT,
    OP_HANDLER_STATE,
    OP_NODE_DOWN,
    OP_PRESENCE,
    OP_SEND,
    OP_TOKEN,
    R_SUCCESS,
)
from raft.machine import RaftSettings
from raft.secret import local_secret
from storage.store import Store

log = logging.getLogger("imnode.node")

# Short GIL switch interval: LMDB and PySyncObj release the GIL on every call, and with the default 5 ms a
# busy trio thread makes each re-acquire wait (RAFT_NOTES.md: ~75 ms per apply transaction under load).
SWITCH_INTERVAL_S = 0.0001


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@dataclass(frozen=True)
class Listening:
    """Where a started node listens (ports resolved when the config asked for port 0)."""

    node_id: str
    tcp: str
    ws: str
    http: str
    raft: str
    tcp_tls: str = ""  # empty: no such listener
    wss: str = ""
    https: bool = False  # the HTTP API speaks https on `http`

    def describe(self) -> str:
        tls = f"  tcp+tls {self.tcp_tls}" if self.tcp_tls else ""
        tls += f"  wss wss://{self.wss}" if self.wss else ""
        scheme = "https" if self.https else "http"
        urls = f"tcp {self.tcp}  ws ws://{self.ws}{tls}  http {scheme}://{self.http}  raft {self.raft}"
        return f"node {self.node_id}: {urls}"


class Node:
    def __init__(self, config: Config, node_id: str) -> None:
        self.config = config
        self.spec: NodeSpec = config.node(node_id)
        # First: a bad certificate stops the start before anything opens (ConfigError names the key).
        self.tls_context = tls.server_context(config)
        tuning = config.tuning
        self.store = Store(os.path.join(self.spec.data_dir, "store"), map_size=tuning.store_map_bytes)
        self.raft = RaftNode(
            RaftSettings(
                self_addr=self.spec.raft,
                partners=config.partners(node_id),
                data_dir=os.path.join(self.spec.data_dir, "raft"),
                # Never None: PySyncObj without a password unpickles whatever reaches its port.
                password=config.raft_password or local_secret(os.path.join(self.spec.data_dir, "raft")),
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
            batch_max_bytes=tuning.batch_max_bytes,
            commit_timeout_s=tuning.commit_timeout_s,
        )
        self.registry = Registry()
        numeric_id = self.spec.numeric_id
        self.presence = Presence(config, numeric_id, self.store, self.registry)
        self.push_ctx = PushContext(config, numeric_id, self.registry, self.presence)
        self.pusher_pool = build_pusher_pool(self.push_ctx)
        self.channel_ctx = ChannelContext(
            config, numeric_id, self.store, self.proposer, self.pusher_pool, Snowflake(numeric_id)
        )
        self.channel_pool = build_channel_pool(self.channel_ctx)
        self.user_ctx = UserContext(
            config, numeric_id, self.store, self.registry, self.channel_pool, self.presence
        )
        self.user_pool = build_user_pool(self.user_ctx)
        self.gateway = Gateway(tuning, self.registry, self.user_pool)
        self.pools: dict[str, EventPool[Any]] = {
            "user": self.user_pool,
            "channel": self.channel_pool,
            "pusher": self.pusher_pool,
        }
        self.metrics = Metrics()
        self.plugin_names = self._install_plugins()
        with self.store.read() as txn:
            self._apply_handler_states(txn.meta("handlers_disabled") or [])
        self.raft.on_snapshot_installed = self._on_snapshot_installed
        self.webhooks = Webhooks(self)
        self.http = HttpApi(self)
        self.listening: Listening | None = None
        self.committed_messages = 0
        self.membership_busy = False
        register_node_metrics(self)

    def _install_plugins(self) -> list[str]:
        """Load every configured and published plugin; a bad one stops the start (PluginError names it)."""
        host = PluginHost(self.metrics, self.spec.id)
        refs = [plugins.PluginRef(ref, options) for ref, options in self.config.plugins]
        if self.config.entry_point_plugins:
            refs += plugins.entry_point_plugins()
        names: list[str] = []
        for ref in refs:
            specs = plugins.load(ref, host)
            plugins.install(ref, specs, self.pools)
            names += [spec.name for spec in specs]
        return names

    def _apply_handler_states(self, disabled: list[str]) -> None:
        """Make the local chains match the replicated list of disabled handlers."""
        names = {h.name for pool in self.pools.values() for t in pool.event_types() for h in pool.chain(t)}
        for name in names:
            enabled = name not in disabled
            for pool in self.pools.values():
                pool.set_enabled(name, enabled)

    # -- running -----------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.raft.run)
                for pool in (self.pusher_pool, self.channel_pool, self.user_pool):
                    await nursery.start(pool.run)
                nursery.start_soon(self._distribute_committed)
                nursery.start_soon(self.proposer.run)
                nursery.start_soon(self._resend_loop)
                nursery.start_soon(self._sync_loop)
                nursery.start_soon(self.presence.watch_nodes, self.raft)
                nursery.start_soon(self.webhooks.run)
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
                if self.config.webhook.url:
                    # Before clients: messages applied before the webhook settings are would have no events.
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

    async def _distribute_committed(self) -> None:
        """Every committed send goes to the channel pool for distribution (on every node)."""
        async for committed in self.raft.committed():
            for op, result in zip(committed.ops, committed.results, strict=False):
                if not isinstance(op, dict):
                    continue
                if (
                    op.get("t") in (OP_PRESENCE, OP_NODE_DOWN)
                    and result.get("r") == R_SUCCESS
                    and not result.get("stale")
                ):
                    self.presence.on_committed(op)
                    continue
                if op.get("t") == OP_HANDLER_STATE and result.get("r") == R_SUCCESS:
                    with self.store.read() as txn:
                        self._apply_handler_states(txn.meta("handlers_disabled") or [])
                    continue
                if op.get("t") in (OP_DEVICE_QUIT, OP_TOKEN) and result.get("r") == R_SUCCESS:
                    self._kick_after_user_change(op)
                    continue
                if op.get("t") != OP_SEND:
                    continue
                if result.get("r") != R_SUCCESS or result.get("dup"):
                    continue
                self.committed_messages += 1
                await self.channel_pool.submit(f"{op['ct']}:{op['cid']}", "distribute", Delivery(op, result))

    def _kick_after_user_change(self, op: dict[str, Any]) -> None:
        """device_quit logs devices out; a master-level token (device_level 1) replaces older logins."""
        if op["t"] == OP_TOKEN and op.get("level") != 1:
            return
        flag = op["flag"]
        for conn in list(self.registry.of_uid(op["uid"])):
            if flag == -1 or conn.device_flag == flag:
                conn.close(
                    Reason.CONNECT_KICK, "logged out" if op["t"] == OP_DEVICE_QUIT else "logged in elsewhere"
                )
                self.registry.remove(conn)

    def _on_snapshot_installed(self) -> None:
        """After a snapshot replaced the store: re-read replicated settings, and have clients resync.

        Entries that arrive inside a snapshot produce no apply call here, so no push: a connected client
        would silently miss them. Disconnecting makes it reconnect and sync what it missed.
        """
        log.info("store replaced by a snapshot: re-reading settings, asking clients to resync")
        with self.store.read() as txn:
            self._apply_handler_states(txn.meta("handlers_disabled") or [])
        for conn in list(self.registry):
            conn.close(Reason.UNKNOWN, "state replaced by a snapshot: reconnect and sync")

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

    # -- inspection ----------------------------------------------------------------------------------------
    def pool_statistics(self) -> dict[str, Any]:
        return {
            pool.name: pool.statistics() for pool in (self.user_pool, self.channel_pool, self.pusher_pool)
        }


async def run_node(config: Config, node_id: str, on_ready: Callable[[Listening], None] | None = None) -> None:
    """Run one node until cancelled."""
    node = Node(config, node_id)
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(node.run)
        if on_ready is not None:
            on_ready(listening)
