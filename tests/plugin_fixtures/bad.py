"""Plugins that import fine but must be refused at start: each is wrong in one way."""

from __future__ import annotations

from typing import Any, cast

from node.plugins import HandlerSpec


async def _ok(ctx: Any, event: Any) -> int | None:
    return None


async def _one_argument(event: Any) -> int | None:
    return None


def _not_async(ctx: Any, event: Any) -> int | None:
    return None


wrong_signature = HandlerSpec(name="wrong_signature", pool="channel", events=("send",), fn=_one_argument)
not_async = HandlerSpec(name="not_async", pool="channel", events=("send",), fn=cast(Any, _not_async))
unknown_pool = HandlerSpec(name="unknown_pool", pool=cast(Any, "mailbox"), events=("send",), fn=_ok)
unknown_event = HandlerSpec(name="unknown_event", pool="channel", events=("teleport",), fn=_ok)
unknown_neighbour = HandlerSpec(
    name="unknown_neighbour", pool="channel", events=("send",), fn=_ok, before="no_such_handler"
)
not_a_handler = 42
