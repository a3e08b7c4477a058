"""Audit: reject messages containing configured words (SENDACK reason 11, not_allow_send).

[[plugins]]
handler = "node.plugins.examples.audit:audit"
options = { words = ["forbidden", "spam"] }
"""

from __future__ import annotations

from typing import Any

from node.plugins import HandlerSpec, PluginHost
from node.pools.channel import ChannelContext, ChannelSend
from node.wire.protocol import Reason


def audit(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    words = options.get("words", [])
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ValueError("options.words must be a list of non-empty strings")
    lowered = [w.lower() for w in words]

    async def check(ctx: ChannelContext, send: ChannelSend) -> int | None:
        # The payload is the decrypted client payload (the SDKs send UTF-8 JSON).
        text = send.payload.decode("utf-8", errors="replace").lower()
        if any(word in text for word in lowered):
            return int(Reason.NOT_ALLOW_SEND)
        return None

    return HandlerSpec(
        name=str(options.get("name", "audit")),
        pool="channel",
        events=("send",),
        fn=check,
        kind="step",
        after="permission",  # only messages that may be sent at all are audited
    )
