"""Percentage rollout: give a behaviour (another handler) to a stable share of users, as in A/B tests.

A stable hash of the uid (crc32) decides, so a user is in or out on every node and every restart.

    [[plugins]]
    handler = "node.plugins.examples.rollout:rollout"
    options = { percent = 50, handler = "node.plugins.examples.audit:audit", options = { words = ["beta"] } }
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from node.plugins import HandlerSpec, PluginError, PluginHost, PluginRef, event_uid, in_rollout, load


def rollout(options: dict[str, Any], host: PluginHost) -> list[HandlerSpec]:
    percent = options.get("percent")
    if not isinstance(percent, int | float) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise ValueError("options.percent must be a number from 0 to 100")
    inner_ref = options.get("handler")
    if not isinstance(inner_ref, str):
        raise ValueError("options.handler must be 'module:object' of the handler to roll out")
    salt = str(options.get("salt", inner_ref))
    try:
        inner_specs = load(PluginRef(inner_ref, dict(options.get("options", {}))), host)
    except PluginError as exc:
        raise ValueError(f"the rolled-out handler cannot be loaded: {exc}") from None
    wrapped: list[HandlerSpec] = []
    for spec in inner_specs:
        inner = spec.fn

        async def gated(ctx: Any, event: Any, inner: Any = inner) -> int | None:
            if in_rollout(event_uid(event), float(percent), salt):
                result: int | None = await inner(ctx, event)
                return result
            return None

        wrapped.append(replace(spec, name=f"rollout:{spec.name}", fn=gated))
    return wrapped
