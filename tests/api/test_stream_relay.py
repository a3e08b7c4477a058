"""The relay of stream events to other nodes holds a bounded queue per destination, in items and in bytes:
a node that stops answering costs this one a fixed amount of memory, whatever size the events are."""

from __future__ import annotations

from typing import Any

import trio

from node.streams import Relay


async def test_a_node_that_does_not_answer_holds_at_most_the_byte_bound() -> None:
    calls: list[int] = []

    async def stuck_peer(node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        calls.append(len(body["events"]))
        await trio.sleep_forever()  # the other node never answers
        raise AssertionError("unreachable")

    relay = Relay(stuck_peer, lambda node: f"n{node}", queue_max=100_000, queue_bytes_max=10_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        await trio.testing.wait_all_tasks_blocked()
        item = {"uids": ["alice"], "id": "s", "type": "stream.snapshot", "ts": 1, "data": "x" * 1_000}
        relay.enqueue(2, dict(item))
        await trio.testing.wait_all_tasks_blocked()  # the first one is in the stuck call
        for _ in range(100):
            relay.enqueue(2, dict(item))
        # 9 more fit in 10,000 bytes (1,064 each), the rest are dropped and counted; nothing else is held.
        assert calls == [1] and relay.dropped == 91
        nursery.cancel_scope.cancel()
