"""Plugins for tests/pools/test_send_batches.py: a step on each pool's `send`, an observer on `distribute`."""

from __future__ import annotations

from typing import Any

from node.plugins import HandlerSpec, PluginHost
from node.wire.protocol import Reason

USER_REJECTED = b"user-no"
CHANNEL_REJECTED = b"channel-no"
# What the distribute observer saw (the tests run the node in their own process, and clear it first).
DISTRIBUTED: list[int] = []


def user_step(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    async def check(ctx: Any, ev: Any) -> int | None:
        return int(Reason.NOT_ALLOW_SEND) if USER_REJECTED in ev.payload else None

    return HandlerSpec(name="user_step", pool="user", events=("send",), fn=check, after="decrypt")


def channel_step(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    async def check(ctx: Any, send: Any) -> int | None:
        return int(Reason.SEND_BAN) if CHANNEL_REJECTED in send.payload else None

    return HandlerSpec(name="channel_step", pool="channel", events=("send",), fn=check, after="permission")


def distribute_watch(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    async def watch(ctx: Any, delivery: Any) -> None:
        DISTRIBUTED.append(delivery.result["mid"])

    return HandlerSpec(
        name="distribute_watch", pool="channel", events=("distribute",), fn=watch, kind="observer"
    )
