"""Handlers as plugins: extend a node without touching it.

A plugin is a `HandlerSpec`: the pool and event types it takes, its place in the chain, and whether it may
reject (a **step**: it returns a reason code, which becomes the SENDACK or CONNACK reason) or only watches
(an **observer**: it runs behind a bounded queue and never delays the send path). The typed event each pool
hands its handlers:

| pool    | event        | event object (node/...)               | context (node/pools/...) |
|---------|--------------|---------------------------------------|--------------------------|
| user    | connect      | gateway/events.ConnectEvent           | user.UserContext         |
| user    | send         | gateway/events.SendEvent (decrypted)  | user.UserContext         |
| channel | send         | pools/channel.ChannelSend             | channel.ChannelContext   |
| channel | distribute   | pools/channel.Delivery (committed)    | channel.ChannelContext   |
| pusher  | push         | pools/pusher.PushEvent                | pusher.PushContext       |

The shipped examples are in node/plugins/examples/. Plugins are named in the config
(``[[plugins]] handler = "module:object"``; the module is found on the Python path or in the config
file's folder) or published under the entry point group ``imnode.handlers``.
`object` is a HandlerSpec, a list of them, or a factory
``(options: dict, host: PluginHost) -> HandlerSpec | list[HandlerSpec]``. A plugin that cannot be loaded
stops the start with a message naming it. At run time a plugin step that raises or overruns its timeout is
skipped for that event (the message goes on), counted and dead-lettered; after a few failures in a row it
is bypassed for a while (see node/pools/eventbus.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from node.metrics import Metrics
from node.pools.eventbus import EventPool, HandlerError, HandlerFn

ENTRY_POINT_GROUP = "imnode.handlers"
# Refs written before the shipped examples moved under node.plugins keep working in existing configs.
MOVED_MODULES = {"node.examples": "node.plugins.examples"}
DEFAULT_PLUGIN_TIMEOUT_S = 0.5


class PluginError(Exception):
    """A plugin cannot be loaded or installed; the message names it."""


@dataclass(frozen=True)
class HandlerSpec:
    name: str
    pool: Literal["user", "channel", "pusher"]
    events: tuple[str, ...]
    fn: HandlerFn
    kind: Literal["step", "observer"] = "step"
    before: str | None = None
    after: str | None = None
    priority: int | None = None
    timeout_s: float = DEFAULT_PLUGIN_TIMEOUT_S
    retries: int = 0


def handler(
    *,
    pool: Literal["user", "channel", "pusher"],
    events: tuple[str, ...] | str,
    kind: Literal["step", "observer"] = "step",
    name: str | None = None,
    before: str | None = None,
    after: str | None = None,
    priority: int | None = None,
    timeout_s: float = DEFAULT_PLUGIN_TIMEOUT_S,
    retries: int = 0,
) -> Callable[[HandlerFn], HandlerSpec]:
    """Decorator: turn an ``async def fn(ctx, event) -> int | None`` into a HandlerSpec."""

    def wrap(fn: HandlerFn) -> HandlerSpec:
        return HandlerSpec(
            name=name or fn.__name__,
            pool=pool,
            events=(events,) if isinstance(events, str) else tuple(events),
            fn=fn,
            kind=kind,
            before=before,
            after=after,
            priority=priority,
            timeout_s=timeout_s,
            retries=retries,
        )

    return wrap


@dataclass
class PluginHost:
    """What a plugin factory gets besides its options: the node's metrics and identity."""

    metrics: Metrics
    node_id: str
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PluginRef:
    ref: str  # "module:object"
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "config"


def add_search_dir(path: str) -> None:
    """Import plugin modules from `path` too (the config file's folder), so that `myplugins.py` next to
    the config loads whichever folder the node was started from. Appended: an installed module of the
    same name still wins, as it would without the config."""
    if path and path not in sys.path:
        sys.path.append(path)


def resolve(ref: str) -> Any:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"plugin {ref!r}: expected 'module:object'")
    for old, new in MOVED_MODULES.items():
        if module_name == old or module_name.startswith(old + "."):
            module_name = new + module_name[len(old) :]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(f"plugin {ref!r}: cannot import {module_name}: {exc!r}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PluginError(f"plugin {ref!r}: {module_name} has no {attr!r}") from None
    return target


def _check_fn(ref: str, spec: HandlerSpec) -> None:
    fn = spec.fn
    call = type(fn).__call__ if not inspect.isfunction(fn) else fn
    if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(call):
        raise PluginError(f"plugin {ref!r}: handler {spec.name} must be an async function (ctx, event)")
    try:
        inspect.signature(fn).bind(None, None)
    except (TypeError, ValueError):
        raise PluginError(f"plugin {ref!r}: handler {spec.name} must take exactly (ctx, event)") from None


def load(plugin: PluginRef, host: PluginHost) -> list[HandlerSpec]:
    """Import and build one plugin's handler specs; PluginError names the plugin on any problem."""
    target = resolve(plugin.ref)
    if isinstance(target, HandlerSpec):
        specs: Any = [target]
    elif isinstance(target, list) and all(isinstance(t, HandlerSpec) for t in target):
        specs = target
    elif callable(target):
        try:
            specs = target(dict(plugin.options), host)
        except Exception as exc:
            raise PluginError(f"plugin {plugin.ref!r}: its factory failed: {exc!r}") from None
        if isinstance(specs, HandlerSpec):
            specs = [specs]
    else:
        raise PluginError(f"plugin {plugin.ref!r}: not a HandlerSpec, a list of them, or a factory")
    if not isinstance(specs, list) or not specs or not all(isinstance(s, HandlerSpec) for s in specs):
        raise PluginError(f"plugin {plugin.ref!r}: the factory must return HandlerSpec(s)")
    for spec in specs:
        _check_fn(plugin.ref, spec)
    return specs


def entry_point_plugins() -> list[PluginRef]:
    """Plugins published by installed packages under the `imnode.handlers` entry point group."""
    return [
        PluginRef(ep.value, {}, f"entry point {ep.name}")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    ]


def install(plugin: PluginRef, specs: list[HandlerSpec], pools: dict[str, EventPool[Any]]) -> None:
    """Register specs in their pools' chains; PluginError (naming the plugin) if one does not fit."""
    for spec in specs:
        pool = pools.get(spec.pool)
        if pool is None:
            raise PluginError(f"plugin {plugin.ref!r}: unknown pool {spec.pool!r} (user, channel, pusher)")
        for event in spec.events:
            if event not in pool.event_types():
                known = ", ".join(sorted(pool.event_types()))
                raise PluginError(f"plugin {plugin.ref!r}: pool {spec.pool} has no event {event!r} ({known})")
            try:
                pool.register(
                    event,
                    spec.name,
                    spec.fn,
                    kind=spec.kind,
                    before=spec.before,
                    after=spec.after,
                    priority=spec.priority,
                    timeout_s=spec.timeout_s,
                    retries=spec.retries,
                    on_error="skip",
                )
            except HandlerError as exc:
                raise PluginError(f"plugin {plugin.ref!r}: {exc}") from None


# -- helpers for plugin authors --------------------------------------------------------------------------
def event_uid(event: Any) -> str:
    """The user an event is about: the sender of a send, the user of a connection, the sender of a push."""
    sender = getattr(event, "sender", None)
    if isinstance(sender, str):
        return sender
    conn = getattr(event, "conn", None)
    if conn is not None and isinstance(getattr(conn, "uid", None), str) and conn.uid:
        return str(conn.uid)
    packet = getattr(event, "packet", None)
    if packet is not None and isinstance(getattr(packet, "uid", None), str):
        return str(packet.uid)
    op = getattr(event, "op", None)
    if isinstance(op, dict) and isinstance(op.get("from"), str):
        return str(op["from"])
    return ""


def in_rollout(uid: str, percent: float, salt: str = "") -> bool:
    """Stable: the same uid is in or out on every node and every run (crc32, never Python's hash)."""
    return zlib.crc32(f"{salt}{uid}".encode()) % 10_000 < percent * 100


def renamed(spec: HandlerSpec, name: str) -> HandlerSpec:
    return replace(spec, name=name)
