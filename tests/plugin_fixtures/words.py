"""A step that rejects messages containing one word; published through an entry point in the tests.

An entry point carries no options, so the word has a default the tests know.
"""

from __future__ import annotations

from typing import Any

from node.plugins import HandlerSpec, PluginHost
from node.pools.channel import ChannelContext, ChannelSend
from node.wire.protocol import Reason

DEFAULT_WORD = "ep-blocked"


def block_word(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    word = str(options.get("word", DEFAULT_WORD)).encode()

    async def check(ctx: ChannelContext, send: ChannelSend) -> int | None:
        return int(Reason.NOT_ALLOW_SEND) if word in send.payload else None

    return HandlerSpec(
        name=str(options.get("name", "word_block")),
        pool="channel",
        events=("send",),
        fn=check,
        after="permission",
    )
