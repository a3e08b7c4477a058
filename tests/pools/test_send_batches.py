"""The send path in batches (issue 12): the SENDs of one read through the pools as one event, plugins
still seeing and rejecting each message, committed messages pushed per entry in seq order."""

from __future__ import annotations

from pathlib import Path

from node.client import open_client
from node.wire.protocol import Reason, Recvack, encode
from tests.conftest import http_json, running_node, single_node_config, wait_for
from tests.pools.batch_plugins import CHANNEL_REJECTED, DISTRIBUTED, USER_REJECTED

PLUGINS: tuple[tuple[str, dict[str, object]], ...] = tuple(
    (f"tests.pools.batch_plugins:{name}", {}) for name in ("user_step", "channel_step", "distribute_watch")
)


def payload_of(i: int) -> bytes:
    marks = {1: USER_REJECTED, 3: CHANNEL_REJECTED}
    return b"m%d " % i + marks.get(i % 5, b"")


async def test_plugin_steps_reject_single_messages_of_a_pipelined_batch_and_the_rest_keep_order(
    tmp_path: Path,
) -> None:
    DISTRIBUTED.clear()
    count = 20
    config = single_node_config(tmp_path / "n1", plugins=PLUGINS, send_rate_per_s=100_000.0)
    async with (
        running_node(config) as running,
        open_client(*running.tcp, "alice") as alice,
        open_client(*running.tcp, "bob") as bob,
        open_client(*running.tcp, "carol") as carol,
    ):
        node = running.node
        visits_before = node.user_pool.latency.calls
        # Two channels in one pipelined write: the batch is split per channel on its way to the channel pool.
        items = [("bob" if i % 2 else "carol", 1, payload_of(i)) for i in range(count)]
        acks = await alice.send_many(items)
        expected = [
            Reason.NOT_ALLOW_SEND if i % 5 == 1 else Reason.SEND_BAN if i % 5 == 3 else Reason.SUCCESS
            for i in range(count)
        ]
        assert [a.reason_code for a in acks] == expected
        for peer, client in (("bob", bob), ("carol", carol)):
            sent = [(i, a) for i, (a, item) in enumerate(zip(acks, items, strict=True)) if item[0] == peer]
            accepted = [(i, a) for i, a in sent if a.reason_code == Reason.SUCCESS]
            # Stored in the order sent, with no gap for the rejected ones; received in that order.
            assert [a.message_seq for _i, a in accepted] == list(range(1, len(accepted) + 1))
            for i, ack in accepted:
                got = await client.recv()
                assert (got.message_id, got.message_seq, got.payload) == (
                    ack.message_id,
                    ack.message_seq,
                    payload_of(i),
                )
        committed = [a.message_id for a in acks if a.reason_code == Reason.SUCCESS]
        await wait_for(
            lambda: sorted(DISTRIBUTED) == sorted(committed), 10, "every committed message observed"
        )
        # One read carries many SENDs: far fewer user-shard visits than messages.
        assert node.user_pool.latency.calls - visits_before < count
        status, report = await http_json(running.http, "GET", "/admin/handlers")
        assert status == 200
        user_chain = {h["name"]: h for h in report["pools"]["user"]["send"]}
        channel_chain = {h["name"]: h for h in report["pools"]["channel"]["send"]}
        assert (user_chain["user_step"]["calls"], user_chain["user_step"]["rejects"]) == (count, 4)
        assert user_chain["forward"]["calls"] == count - 4
        assert (channel_chain["channel_step"]["calls"], channel_chain["channel_step"]["rejects"]) == (16, 4)
        assert channel_chain["store"]["calls"] == 12


async def test_refused_sends_leave_no_channel_state_behind(tmp_path: Path) -> None:
    # A channel whose every send is refused (here: groups that do not exist) must not stay tracked.
    config = single_node_config(tmp_path / "n1", send_rate_per_s=100_000.0)
    async with running_node(config) as running, open_client(*running.tcp, "alice") as alice:
        acks = await alice.send_many([(f"nogroup{i}", 2, b"x") for i in range(200)])
        assert all(ack.reason_code != Reason.SUCCESS for ack in acks)
        assert running.node.channel_ctx.batches == {}
        ok = await alice.send("bob", 1, b"served")
        assert ok.reason_code == Reason.SUCCESS
        await wait_for(lambda: not running.node.channel_ctx.batches, 10, "the accepted send's batch done")


async def test_the_recvacks_of_one_read_reach_the_user_pool_as_one_event(tmp_path: Path) -> None:
    count = 30
    config = single_node_config(tmp_path / "n1", send_rate_per_s=100_000.0)
    async with (
        running_node(config) as running,
        open_client(*running.tcp, "alice") as alice,
        open_client(*running.tcp, "bob", auto_ack=False) as bob,
    ):
        node = running.node
        acks = await alice.send_many([("bob", 1, b"m%d" % i) for i in range(count)])
        assert all(a.reason_code == Reason.SUCCESS for a in acks)
        recvs = [await bob.recv() for _ in range(count)]
        (conn,) = node.registry.of_uid("bob")
        assert len(conn.inflight) == count
        visits_before = node.user_pool.latency.calls
        # All acknowledgements in one write: the node reads them together and hands them over as a batch.
        await bob._write([encode(Recvack(r.message_id, r.message_seq), bob.version) for r in recvs])
        await wait_for(lambda: not conn.inflight, 10, "every RECV acknowledged")
        assert node.user_pool.latency.calls - visits_before < count
        status, report = await http_json(running.http, "GET", "/admin/handlers")
        assert status == 200
        (recvack,) = report["pools"]["user"]["recvack"]
        assert recvack["calls"] == count
