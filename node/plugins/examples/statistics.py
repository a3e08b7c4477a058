"""Statistics: count committed messages per sender and channel type, exposed in /metrics.

[[plugins]]
handler = "node.plugins.examples.statistics:statistics"

imnode_plugin_messages_total{channel_type="1",uid="alice"} 3
"""

from __future__ import annotations

from typing import Any

from node.plugins import HandlerSpec, PluginHost
from node.pools.channel import ChannelContext, Delivery

METRIC = "imnode_plugin_messages_total"


def statistics(options: dict[str, Any], host: PluginHost) -> HandlerSpec:
    max_users = int(options.get("max_users", 10_000))
    counter = host.metrics.counter(
        METRIC, "Committed messages by sender and channel type (statistics plugin)", max_series=max_users
    )

    async def count(ctx: ChannelContext, delivery: Delivery) -> None:
        # An observer on "distribute": it sees each committed message once per node, off the send path.
        op = delivery.op
        counter.inc({"uid": op["from"], "channel_type": str(op["ct"])})

    return HandlerSpec(name="statistics", pool="channel", events=("distribute",), fn=count, kind="observer")
