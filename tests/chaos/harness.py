"""Fault injection against a real cluster: writers, readers, a seeded fault schedule, a JSON-lines history.

Writers send `(writer, counter)` messages with unique client_msg_no into person and group channels, one at a
time, retrying a timeout or a failure with the same client_msg_no (backoff) on any live node. Readers take
RECVs live and, after every reconnect, sync what they missed over HTTP. A schedule drawn from the seed kills
nodes (a random one, the leader, all of them within 100 ms), stops the leader past the election timeout,
restarts a node that must catch up by snapshot, joins and removes a fourth node, and cuts the Raft links of
a random node or of the leader (a proxy in front of every Raft port, tests/raft_links.py). At the end
every node is healed, readers sync, and each node's final store of every channel goes into the history for
`tests.chaos.checker`.

    python -m tests.chaos.harness --duration 600 --seed 7 --history /tmp/chaos.jsonl
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.client import ClientError, open_client
from node.tools import operator as op
from node.wire.protocol import FLAG_DUP, Reason
from tests.cluster_harness import MANAGER_TOKEN, Cluster, write_cluster_toml
from tests.conftest import http_json

FAULTS = (
    "kill9_random",
    "kill9_leader",
    "kill_all",
    "sigstop_leader",
    "snapshot_restart",
    "join_remove",
    "partition_minority",
    "partition_leader",
)
TUNING = {
    "log_compaction_min_entries": 300,
    "log_compaction_min_time_s": 2.0,
    "commit_timeout_s": 5.0,
    "node_down_after_s": 5.0,
}


class History:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w")  # noqa: SIM115 - closed by close()
        self.start = time.monotonic()

    def write(self, event: dict[str, Any]) -> None:
        event.setdefault("t", round(time.monotonic() - self.start, 4))
        self._file.write(json.dumps(event) + "\n")

    def close(self) -> None:
        self._file.close()


@dataclass
class Run:
    cluster: Cluster
    history: History
    rng: random.Random
    writers: list[str]
    readers: list[str]
    groups: list[str]
    down: set[str] = field(default_factory=set)
    stopping: bool = False
    sent: int = 0
    faults: int = 0  # injected, not counting the restarts, resumes and heals that end them

    @property
    def nodes(self) -> list[str]:
        return list(self.cluster.config.initial_members)

    def live(self) -> list[str]:
        return [n for n in self.nodes if n not in self.down]

    def channels_of(self, uid: str) -> list[tuple[str, str, int]]:
        """(canonical name, channel_id as `uid` names it, type) of every channel `uid` reads or writes."""
        found = [(f"g:{g}", g, 2) for g in self.groups]
        others = self.readers if uid in self.writers else self.writers
        found += [(f"p:{':'.join(sorted((uid, o)))}", o, 1) for o in others]
        return found


async def writer(run: Run, uid: str) -> None:
    """One message at a time; a failure or a timeout is retried with the same client_msg_no."""
    counter = 0
    targets = run.channels_of(uid)
    pending: tuple[str, str, int, str] | None = None  # (name, channel_id, type, cmn) not yet acknowledged
    attempt = 0
    delay = 0.05
    while not run.stopping or pending is not None:
        node = run.rng.choice(run.live() or run.nodes)
        try:
            async with open_client(*run.cluster.tcp(node), uid, device_flag=1, timeout_s=3) as client:
                while not run.stopping or pending is not None:
                    if pending is None:
                        counter += 1
                        name, channel_id, channel_type = targets[counter % len(targets)]
                        pending, attempt = (name, channel_id, channel_type, f"{uid}-{counter}"), 0
                    name, channel_id, channel_type, cmn = pending
                    attempt += 1
                    run.history.write(
                        {
                            "type": "send",
                            "writer": uid,
                            "uid": uid,
                            "channel": name,
                            "cmn": cmn,
                            "attempt": attempt,
                            "node": node,
                        }
                    )
                    try:
                        ack = await client.send(
                            channel_id, channel_type, cmn.encode(), client_msg_no=cmn, timeout_s=8
                        )
                    except ClientError:
                        run.history.write({"type": "timeout", "writer": uid, "channel": name, "cmn": cmn})
                        raise
                    run.history.write(
                        {
                            "type": "ack",
                            "writer": uid,
                            "channel": name,
                            "cmn": cmn,
                            "mid": ack.message_id,
                            "seq": ack.message_seq,
                            "reason": ack.reason_code,
                        }
                    )
                    if ack.reason_code == Reason.SUCCESS:
                        run.sent += 1
                        pending, delay = None, 0.05
                    else:
                        await trio.sleep(delay)
                        delay = min(delay * 2, 1.0)
        except ClientError:
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def messages_from(
    run: Run, node: str, login_uid: str, channel_id: str, channel_type: int, start: int
) -> list[dict[str, Any]]:
    """Every message of a channel from `start` on, as one node has it (page by page)."""
    found: list[dict[str, Any]] = []
    while True:
        status, body = await http_json(
            run.cluster.http(node),
            "POST",
            "/channel/messagesync",
            {
                "login_uid": login_uid,
                "channel_id": channel_id,
                "channel_type": channel_type,
                "start_message_seq": start,
                "limit": 10_000,
                "pull_mode": 1,
            },
            headers={"token": MANAGER_TOKEN},
        )
        if status != 200:
            raise OSError(f"messagesync on {node}: {body}")
        found += body["messages"]
        if not body["more"] or not body["messages"]:
            return found
        start = body["messages"][-1]["message_seq"] + 1


async def sync_channel(
    run: Run, reader: str, name: str, channel_id: str, channel_type: int, start: int
) -> int:
    """Fetch what the reader missed through any live node; returns the next seq to ask for."""
    for node in run.rng.sample(run.live() or run.nodes, k=len(run.live() or run.nodes)):
        try:
            messages = await messages_from(run, node, reader, channel_id, channel_type, start)
        except (OSError, trio.TooSlowError):
            continue
        for m in messages:
            run.history.write(
                {
                    "type": "recv",
                    "reader": reader,
                    "channel": name,
                    "cmn": base64.b64decode(m["payload"]).decode(),
                    "mid": m["message_id"],
                    "seq": m["message_seq"],
                    "dup": False,
                    "via": "sync",
                }
            )
            start = max(start, m["message_seq"] + 1)
        return start
    return start


async def reader(run: Run, uid: str) -> None:
    channels = {name: (cid, ct) for name, cid, ct in run.channels_of(uid)}
    next_seq = {name: 1 for name in channels}
    conn = 0
    while not run.stopping:
        node = run.rng.choice(run.live() or run.nodes)
        conn += 1
        try:
            async with open_client(*run.cluster.tcp(node), uid, device_flag=1, timeout_s=3) as client:
                for name, (cid, ct) in channels.items():  # what was missed while away
                    next_seq[name] = await sync_channel(run, uid, name, cid, ct, next_seq[name])
                while not run.stopping:
                    recv = await client.recv(timeout_s=3600)
                    name = (
                        f"g:{recv.channel_id}"
                        if recv.channel_type == 2
                        else f"p:{':'.join(sorted((uid, recv.channel_id)))}"
                    )
                    run.history.write(
                        {
                            "type": "recv",
                            "reader": uid,
                            "channel": name,
                            "cmn": recv.payload.decode(),
                            "mid": recv.message_id,
                            "seq": recv.message_seq,
                            "dup": bool(recv.flags & FLAG_DUP),
                            "via": "live",
                            "conn": conn,
                        }
                    )
                    if recv.message_seq == next_seq.get(name):
                        next_seq[name] += 1
        except ClientError:
            await trio.sleep(0.1)


async def wait_leader(run: Run, timeout_s: float = 30) -> str | None:
    with trio.move_on_after(timeout_s):
        while True:
            leader = await trio.to_thread.run_sync(lambda: op.cluster_status(run.cluster.config)["leader"])
            if leader is not None and leader not in run.down:
                return str(leader)
            await trio.sleep(0.1)
    return None


# Fault records that end a fault or describe the run, rather than inject one.
AFTERMATH = ("restart", "sigcont", "heal", "proxy", "verify")


def fault(run: Run, kind: str, node: str | None, detail: str = "") -> None:
    run.history.write({"type": "fault", "kind": kind, "node": node, "detail": detail})
    if kind not in AFTERMATH:
        run.faults += 1


async def restart(run: Run, node: str) -> None:
    await trio.to_thread.run_sync(run.cluster.start, node)
    fault(run, "restart", node)
    await trio.to_thread.run_sync(lambda: run.cluster.wait_serving(node, 60))
    run.down.discard(node)


async def target(run: Run, kind: str) -> str | None:
    """The node a fault hits: the leader for the `*_leader` kinds, a random live node otherwise."""
    if kind.endswith("_leader"):
        return await wait_leader(run)
    return run.rng.choice(run.live())


async def inject(run: Run, kind: str) -> None:
    cluster = run.cluster
    if kind in ("kill9_random", "kill9_leader", "snapshot_restart"):
        node = await target(run, kind)
        if node is None:
            return
        await trio.to_thread.run_sync(cluster.kill9, node)
        run.down.add(node)
        fault(run, kind, node)
        if kind == "snapshot_restart":
            await trio.sleep(4.0)  # writes go on; the others compact their logs past it (small thresholds)
        else:
            await trio.sleep(run.rng.uniform(0.5, 2.0))
        await restart(run, node)
    elif kind == "kill_all":
        for node in list(run.live()):
            await trio.to_thread.run_sync(cluster.kill9, node)
            run.down.add(node)
        fault(run, kind, None, "every node within 100 ms")
        await trio.sleep(run.rng.uniform(0.2, 1.0))
        async with trio.open_nursery() as nursery:
            for node in run.nodes:
                nursery.start_soon(restart, run, node)
    elif kind == "join_remove":
        # The spare node (n4 of 3, n6 of 5) joins under load, catching up by snapshot + log, serves a
        # while, and leaves again.
        spare = f"n{len(run.nodes) + 1}"
        joined = await trio.to_thread.run_sync(
            lambda: cluster.cli("cluster", "join", "--node", spare, timeout_s=120)
        )
        fault(run, "join", spare, (joined.stdout + joined.stderr).strip()[-200:])
        if joined.returncode == 0:
            await trio.sleep(run.rng.uniform(1.0, 3.0))
            removed = await trio.to_thread.run_sync(
                lambda: cluster.cli("cluster", "remove", "--node", spare, timeout_s=120)
            )
            fault(run, "remove", spare, (removed.stdout + removed.stderr).strip()[-200:])
            if removed.returncode != 0:
                raise AssertionError(f"remove of {spare} failed: {removed.stdout}{removed.stderr}")
    elif kind in ("partition_minority", "partition_leader"):
        # Raft links cut through the proxy (tests/raft_links.py): packets dropped, not refused. Clients
        # still reach every node; those on the cut-off side get no acks and retry elsewhere.
        assert cluster.links is not None
        node = await target(run, kind)
        if node is None:
            return
        cluster.links.cut({node})
        fault(run, kind, node, "Raft links of this node cut")
        await trio.sleep(run.rng.uniform(1.0, 6.0))  # sometimes past the election and connection timeouts
        cluster.links.heal()
        fault(run, "heal", node)
    elif kind == "sigstop_leader":
        node = await target(run, kind)
        if node is None:
            return
        proc = cluster.procs[node]
        proc.send_signal(signal.SIGSTOP)
        fault(run, kind, node, "stopped past the election timeout")
        await trio.sleep(run.rng.uniform(2.0, 4.0))
        proc.send_signal(signal.SIGCONT)
        fault(run, "sigcont", node)


async def final_stores(run: Run) -> None:
    channels = {name for w in run.writers for name, _c, _t in run.channels_of(w)}
    for node in run.nodes:
        for name in sorted(channels):
            if name.startswith("g:"):
                login, cid, ct = run.writers[0], name[2:], 2
            else:
                login, cid = name[2:].split(":")
                ct = 1
            rows = await messages_from(run, node, login, cid, ct, 1)
            messages = [
                [m["message_seq"], m["message_id"], base64.b64decode(m["payload"]).decode(), m["from_uid"]]
                for m in rows
            ]
            run.history.write({"type": "final", "node": node, "channel": name, "messages": messages})


async def run_chaos(
    workdir: Path,
    *,
    seed: int,
    duration_s: float,
    history_path: Path,
    nodes: int = 3,
    min_faults: int = 0,
) -> Path:
    """Run writers and readers under seeded faults for `duration_s`, and at least `min_faults` faults.

    On a loaded machine each fault takes longer (restarts, catch-up), so a run bounded by time alone may
    inject too few faults to mean anything: `min_faults` extends it, up to three times `duration_s`.
    """
    rng = random.Random(seed)
    # One more node than the initial members: the join_remove fault adds it under load.
    config = write_cluster_toml(
        workdir / "cluster.toml", nodes=nodes + 1, initial=nodes, tuning=TUNING, proxied=True
    )
    cluster = Cluster(config)
    history = History(history_path)
    writers, readers, groups = ["w1", "w2", "w3"], ["r1", "r2"], ["g1", "g2"]
    run = Run(cluster, history, rng, writers, readers, groups)
    history.write(
        {
            "type": "meta",
            "seed": seed,
            "duration_s": duration_s,
            "nodes": run.nodes,
            "channels": sorted({n for w in writers for n, _c, _t in run.channels_of(w)}),
            "readers": {r: [n for n, _c, _t in run.channels_of(r)] for r in readers},
        }
    )
    try:
        leader = await trio.to_thread.run_sync(cluster.start_all)
        for group in groups:
            status, body = await http_json(
                cluster.http(leader),
                "POST",
                "/channel",
                {"channel_id": group, "channel_type": 2, "subscribers": writers + readers},
                headers={"token": MANAGER_TOKEN},
            )
            assert status == 200, body
        async with trio.open_nursery() as readers_nursery:
            for uid in readers:
                readers_nursery.start_soon(reader, run, uid)
            await trio.sleep(1.0)
            async with trio.open_nursery() as writers_nursery:
                for uid in writers:
                    writers_nursery.start_soon(writer, run, uid)
                start = trio.current_time()
                deadline, hard_deadline = start + duration_s, start + 3 * duration_s
                while (now := trio.current_time()) < deadline or (
                    run.faults < min_faults and now < hard_deadline
                ):
                    await trio.sleep(rng.uniform(1.0, 3.0))
                    if trio.current_time() >= deadline and run.faults >= min_faults:
                        break
                    await inject(run, rng.choice(FAULTS))
                run.stopping = True
                # Heal: every node up; the writers finish their last send (retrying until it is acked).
                for node in list(run.down):
                    await restart(run, node)
                await wait_leader(run, 60)
                writers_nursery.cancel_scope.deadline = trio.current_time() + 120
            readers_nursery.cancel_scope.cancel()
        for node in run.nodes:
            await trio.to_thread.run_sync(cluster.wait_caught_up, node, 60)
        if cluster.links is not None:
            fault(
                run,
                "proxy",
                None,
                f"unidentified {cluster.links.unidentified}, errors {cluster.links.errors}",
            )
        verify = await trio.to_thread.run_sync(lambda: cluster.cli("admin", "verify", "--timeout", "60"))
        fault(run, "verify", None, (verify.stdout + verify.stderr).strip()[-300:])
        await final_stores(run)
        # Readers' last sync, after healing, so every reader's view is complete.
        for uid in readers:
            for name, cid, ct in run.channels_of(uid):
                await sync_channel(run, uid, name, cid, ct, 1)
    finally:
        history.close()
        await trio.to_thread.run_sync(cluster.stop_all)
    return history_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    parser.add_argument("--history", type=Path, default=None)
    parser.add_argument("--nodes", type=int, default=3, choices=[3, 5])
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="imnode-chaos-"))
    history = args.history or workdir / "history.jsonl"
    print(f"chaos: seed {args.seed}, {args.duration:.0f}s, {args.nodes} nodes, history {history}", flush=True)
    trio.run(
        lambda: run_chaos(
            workdir, seed=args.seed, duration_s=args.duration, history_path=history, nodes=args.nodes
        )
    )
    from tests.chaos import checker

    report = checker.check(checker.load(history))
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
