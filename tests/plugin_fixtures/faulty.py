"""Plugins that fail at run time: one raises on every call, one never returns.

Both are factories, so a test picks the name, kind, timeout and retries through `options`. Steps go right
after "permission", on the send path proper (before the message is stored); observers go at the end.
"""

from __future__ import annotations

from typing import Any

import trio

from node.plugins import DEFAULT_PLUGIN_TIMEOUT_S, HandlerSpec, PluginHost


class PluginBoom(RuntimeError):
    pass


def _spec(options: dict[str, Any], default_name: str, fn: Any) -> HandlerSpec:
    kind = options.get("kind", "step")
    return HandlerSpec(
        name=str(options.get("name", default_name)),
        pool="channel",
        events=("send",),
        fn=fn,
        kind=kind,
        after="permission" if kind == "step" else None,
        timeout_s=float(options.get("timeout_s", DEFAULT_PLUGIN_TIMEOUT_S)),
        retries=int(options.get("retries", 0)),
    )


def raising(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    async def explode(ctx: Any, event: Any) -> int | None:
        raise PluginBoom("this plugin always fails")

    return _spec(options, "raising", explode)


def hanging(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    async def hang(ctx: Any, event: Any) -> int | None:
        await trio.sleep_forever()

    return _spec(options, "hanging", hang)
