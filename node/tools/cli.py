"""The `imnode` command line: run nodes and clusters, change membership, inspect and verify.

Only `node start` imports the server (and trio, hypercorn, PySyncObj with it), and only `bench` the client:
every other command talks HTTP to running nodes, so it starts in the time Python and the config take.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from node.config import DEFAULT_NODE_ID, Config, ConfigError, Listening, load
from node.tools import bench
from node.tools import operator as op

if TYPE_CHECKING:
    from node.server import Node

EXIT_CONFIG = 2
EXIT_FAILED = 1


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # PySyncObj logs every reconnect attempt at WARNING; keep it for real trouble.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)


# -- node ------------------------------------------------------------------------------------------------
async def _serve_until_signal(node: Node) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                # Watching from the start: a signal during start-up stops the node too.
                async for signum in signals:
                    print(f"received {signal.Signals(signum).name}: stopping", flush=True)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            listening: Listening = await nursery.start(node.run)
            print(f"imnode {listening.describe()}", flush=True)
            print(f"data in {node.spec.data_dir}; Ctrl-C stops", flush=True)
    print("imnode stopped cleanly", flush=True)


def cmd_node_start(args: argparse.Namespace) -> int:
    config: Config = load(args.config)
    node_id = args.node or (DEFAULT_NODE_ID if args.config is None else config.initial_members[0])
    spec = config.node(node_id)
    if args.data_dir is not None:
        spec = dataclasses.replace(spec, data_dir=args.data_dir)
        config = dataclasses.replace(config, nodes={**config.nodes, node_id: spec})
    if args.partners is not None:
        # A joining node starts with the current members as its partners (the config only bootstraps).
        wanted = [p for p in args.partners.split(",") if p and p != node_id]
        for partner in wanted:
            config.node(partner)
        config = dataclasses.replace(config, initial_members=(node_id, *wanted))
    _check_ports_free(config, node_id)
    import trio  # here, not at the top: the other commands never pay for the server's imports

    from node.plugins import PluginError
    from node.server import Node

    try:
        node = Node(config, node_id)
    except PluginError as exc:
        print(f"imnode: plugin error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    trio.run(_serve_until_signal, node)
    return 0


def _check_ports_free(config: Config, node_id: str) -> None:
    """Fail fast and clearly on a port in use (PySyncObj would retry its bind quietly forever)."""
    import socket

    spec = config.node(node_id)
    for name, address in (
        ("raft", spec.raft_bind or spec.raft),
        ("tcp", spec.tcp),
        ("ws", spec.ws),
        ("http", spec.http),
        ("tcp_tls", spec.tcp_tls),
        ("wss", spec.wss),
    ):
        if not address:
            continue
        host, _, port = address.rpartition(":")
        if int(port) == 0:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, int(port)))
            except OSError as exc:
                raise op.OperatorError(
                    f"node {node_id}: cannot listen on {address} ({name}): {exc.strerror}; "
                    "is another node running?"
                ) from None


# -- cluster ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    config = load(args.config)
    # Both set explicitly: a shell starts background jobs with SIGINT ignored, and Python then keeps it so.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    procs: list[op.NodeProcess] = []
    try:
        for node_id in config.initial_members:
            procs.append(op.spawn(args.config, config, node_id))
            op.say(f"started {node_id} (pid {procs[-1].proc.pid}), log {procs[-1].log_path}")
        op.say(f"waiting for a leader (at most {args.timeout:.0f}s)...")
        deadline = time.monotonic() + args.timeout
        while True:
            for p in procs:
                if p.proc.poll() is not None:
                    raise op.OperatorError(
                        f"{p.node_id} exited with code {p.proc.returncode}; see {p.log_path}"
                    )
            status = op.cluster_status(config)
            answering = {n["id"] for n in status["nodes"] if n["role"] != "down"}
            if status["leader"] is not None and answering >= set(config.initial_members):
                break
            if time.monotonic() > deadline:
                raise op.OperatorError(
                    f"the cluster did not come up within {args.timeout:.0f}s (leader: {status['leader']}, "
                    f"answering: {', '.join(sorted(answering)) or 'none'}); see the log files above"
                )
            time.sleep(0.2)
        for node_id in config.initial_members:
            spec = config.node(node_id)
            listening = Listening(
                node_id, spec.tcp, spec.ws, spec.http, spec.raft, spec.tcp_tls, spec.wss, config.tls.http
            )
            op.say(f"  {listening.describe().removeprefix('node ')}")
        op.say(f"cluster {config.cluster_name} is up: leader {status['leader']}. Ctrl-C stops it.")
        running = {p.node_id for p in procs}
        while True:
            time.sleep(0.5)
            for p in procs:
                if p.node_id in running and p.proc.poll() is not None:
                    running.discard(p.node_id)
                    op.say(f"{p.node_id} exited with code {p.proc.returncode}; see {p.log_path}")
    except (KeyboardInterrupt, _Stop):
        op.say("stopping the cluster...")
        return _stop_all(procs)
    except op.OperatorError as exc:
        print(f"imnode: {exc}", file=sys.stderr)
        _stop_all(procs)
        return EXIT_FAILED


def _stop_all(procs: list[op.NodeProcess]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    failed = 0
    for p in procs:
        try:
            code = p.proc.wait(timeout=20)
        except Exception:
            p.proc.kill()
            code = p.proc.wait()
        op.say(f"  {p.node_id} stopped (exit code {code})")
        failed += code != 0
    op.say("cluster stopped")
    return 0 if not failed else EXIT_FAILED


def cmd_cluster_join(args: argparse.Namespace) -> int:
    config = load(args.config)
    node_id = args.node
    config.node(node_id)
    leader, current = op.members(config)
    if node_id in current:
        raise op.OperatorError(f"{node_id} is already a member ({', '.join(current)})")
    op.say(f"adding {node_id} through leader {leader} (members now: {', '.join(current)})")
    op.request(config, leader, "POST", "/admin/members", {"action": "add", "node": node_id}, timeout_s=30)
    spec = config.node(node_id)
    started = op.spawn(args.config, config, node_id, detach=True, partners=current)
    proc, log_path = started.proc, started.log_path
    op.say(f"started {node_id} (pid {proc.pid}), log {log_path}; catching up...")
    target = op.node_status(config, leader)
    goal = int((target or {}).get("commit_index") or 0)
    deadline = time.monotonic() + args.timeout
    last_report = 0.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise op.OperatorError(f"{node_id} exited with code {proc.returncode}; see {log_path}")
        status = op.node_status(config, node_id)
        applied = int((status or {}).get("applied_index") or 0)
        if status is not None and status["role"] in ("follower", "leader") and applied >= goal:
            op.say(
                f"{node_id} joined and caught up (applied index {applied}); it serves clients at {spec.tcp}"
            )
            return 0
        if time.monotonic() - last_report > 2:
            op.say(f"  {node_id}: applied {applied} of {goal}")
            last_report = time.monotonic()
        time.sleep(0.2)
    raise op.OperatorError(f"{node_id} did not catch up within {args.timeout:.0f}s; see {log_path}")


def cmd_cluster_remove(args: argparse.Namespace) -> int:
    config = load(args.config)
    node_id = args.node
    config.node(node_id)
    leader, current = op.members(config)
    if node_id not in current:
        raise op.OperatorError(f"{node_id} is not a member ({', '.join(current)})")
    if len(current) <= 1:
        raise op.OperatorError("cannot remove the last member")
    if node_id == leader:
        op.say(f"{node_id} leads: handing leadership over first")
        op.request(config, leader, "POST", "/admin/transfer", {})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = op.cluster_status(config)
            if status["leader"] not in (None, node_id):
                leader = status["leader"]
                break
            time.sleep(0.2)
        else:
            raise op.OperatorError("leadership did not move within 15s; nothing was removed")
        op.say(f"new leader: {leader}")
    op.request(config, leader, "POST", "/admin/members", {"action": "remove", "node": node_id}, timeout_s=30)
    op.say(f"{node_id} removed from the cluster")
    if op.stop_by_pid_file(config, node_id):
        op.say(f"stopped {node_id}'s process")
    return 0


# -- admin -----------------------------------------------------------------------------------------------
def cmd_admin_status(args: argparse.Namespace) -> int:
    config = load(args.config)
    status = op.cluster_status(config)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    header = (
        f"{'node':6} {'role':10} {'term':>5} {'commit':>9} {'applied':>9} {'lag':>6} {'conns':>6} "
        f"{'queues u/c/p':>14} {'dead':>5}"
    )
    print(f"cluster {config.cluster_name}: leader {status['leader'] or '(none)'}")
    print(header)
    for node in status["nodes"]:
        if node["role"] == "down":
            print(f"{node['id']:6} {'down':10}")
            continue
        pools = node["pools"]
        queues = "/".join(str(pools[p]["queue_depth"]) for p in ("user", "channel", "pusher"))
        print(
            f"{node['id']:6} {node['role']:10} {node['term']:>5} {node['commit_index']:>9} "
            f"{node['applied_index']:>9} {node['lag']:>6} {node['connections']:>6} {queues:>14} "
            f"{node['dead_letters']:>5}"
        )
    return 0


def cmd_admin_verify(args: argparse.Namespace) -> int:
    config = load(args.config)
    _leader, current = op.members(config)
    deadline = time.monotonic() + args.timeout
    while True:
        digests = {n: op.request(config, n, "GET", "/admin/digests", timeout_s=30) for n in current}
        indexes = {n: d["applied_index"] for n, d in digests.items()}
        if len(set(indexes.values())) == 1:
            break
        if time.monotonic() > deadline:
            raise op.OperatorError(
                f"nodes did not reach the same applied index within {args.timeout:.0f}s: {indexes}"
            )
        op.say(f"waiting for nodes to converge: {indexes}")
        time.sleep(0.5)
    problems: list[str] = []
    first = current[0]
    reference = digests[first]
    for node_id in current[1:]:
        other = digests[node_id]
        if other["state"] != reference["state"]:
            problems.append(f"{node_id}: replicated state differs from {first}")
        for channel in sorted(set(reference["channels"]) | set(other["channels"])):
            a, b = reference["channels"].get(channel), other["channels"].get(channel)
            if a != b:
                problems.append(f"channel {channel}: {first} has {a}, {node_id} has {b}")
    if problems:
        for problem in problems:
            print(f"DIFFERENT {problem}")
        return EXIT_FAILED
    messages = sum(c["count"] for c in reference["channels"].values())
    op.say(
        f"{len(current)} nodes agree at applied index {reference['applied_index']}: "
        f"{len(reference['channels'])} channels, {messages} messages"
    )
    return 0


def _sum_handler_reports(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One report for the cluster: each handler's counts summed over the nodes, its p99 the worst one.

    Each node counts the events it handled itself (the user pool runs where the client is connected), so
    no single node's report tells the cluster's story."""
    first = next(iter(reports.values()))
    pools: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for pool, chains in first["pools"].items():
        for event, chain in chains.items():
            pools.setdefault(pool, {})[event] = [dict(h) for h in chain]
    for report in list(reports.values())[1:]:
        for pool, chains in report["pools"].items():
            for event, chain in chains.items():
                by_name = {h["name"]: h for h in pools.get(pool, {}).get(event, [])}
                for h in chain:
                    total = by_name.get(h["name"])
                    if total is None:
                        continue  # a plugin loaded on this node only: the nodes' configs differ
                    for key, value in h.items():
                        if key == "p99_ms":
                            total[key] = max(total[key], value)
                        elif isinstance(value, int) and not isinstance(value, bool):
                            total[key] = total.get(key, 0) + value
    return {
        "nodes": list(reports),
        "disabled": first["disabled"],
        "plugins": first["plugins"],
        "pools": pools,
    }


def _print_handlers(title: str, report: dict[str, Any]) -> None:
    disabled = ", ".join(report["disabled"]) or "none"
    print(f"handler chains on {title} (disabled cluster-wide: {disabled})")
    columns = f"{'pool.event':22} {'handler':24} {'kind':8} {'on':3} {'calls':>9} {'rejects':>8}"
    print(f"{columns} {'errors':>7} {'p99 ms':>8}")
    for pool, chains in report["pools"].items():
        for event, chain in chains.items():
            for h in chain:
                on = "yes" if h["enabled"] else "no"
                print(
                    f"{pool + '.' + event:22} {h['name']:24} {h['kind']:8} {on:3} "
                    f"{h['calls']:>9} {h['rejects']:>8} {h['errors']:>7} {h['p99_ms']:>8}"
                )


def cmd_admin_handlers(args: argparse.Namespace) -> int:
    config = load(args.config)
    if args.disable or args.enable:
        node_id = args.node or op.cluster_status(config)["leader"] or config.initial_members[0]
        name = args.disable or args.enable
        op.request(
            config,
            node_id,
            "POST",
            "/admin/handlers/state",
            {"name": name, "enabled": int(bool(args.enable))},
        )
        op.say(f"{name} {'enabled' if args.enable else 'disabled'} on every node (through Raft)")
        return 0
    asked = [args.node] if args.node else op.members(config)[1]
    reports: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for node_id in asked:
        try:
            reports[node_id] = op.request(config, node_id, "GET", "/admin/handlers")
        except op.OperatorError:
            missing.append(node_id)  # a member that is down: its counts are left out, and said so
    if not reports:
        raise op.OperatorError(f"no member answered ({', '.join(missing)})")
    total = _sum_handler_reports(reports)
    total["missing"] = missing
    if args.per_node:
        total["per_node"] = reports
    if args.json:
        print(json.dumps(total, indent=2))
        return 0
    title = ", ".join(reports) + (f"; not answering: {', '.join(missing)}" if missing else "")
    _print_handlers(f"{title} (summed)" if len(reports) > 1 else title, total)
    if args.per_node:
        for node_id, report in reports.items():
            print()
            _print_handlers(node_id, report)
    return 0


def cmd_admin_deadletters(args: argparse.Namespace) -> int:
    config = load(args.config)
    leader = op.cluster_status(config)["leader"]
    if leader is None:
        raise op.OperatorError("no leader is reachable: is the cluster up?")
    if args.replay:
        result = op.request(config, leader, "POST", "/admin/deadletters/replay", {}, timeout_s=300)
        error = f": {result['error']}" if result["error"] else ""
        op.say(f"replayed {result['replayed']} dead letters, {result['failed']} failed{error}")
        return 0 if not result["failed"] else EXIT_FAILED
    report = op.request(config, leader, "GET", "/admin/deadletters")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    letters = report["deadletters"]
    pending = ", ".join(f"{stream} {count}" for stream, count in report["pending"].items())
    print(f"{len(letters)} dead letters (webhook events not yet delivered: {pending})")
    for letter in letters:
        print(
            f"  {letter['event']:18} #{letter['seq']:<8} attempts {letter['attempts']:<3} {letter['error']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imnode",
        description="A clustered IM node speaking the WuKongIM protocol (trio, PySyncObj, LMDB).",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run a node")
    node_commands = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = node_commands.add_parser(
        "start",
        help="run one node in the foreground",
        description=(
            "Run one node in the foreground. Without --config: a single node on embedded defaults "
            "(data in ./imnode-data; TCP 5100, WebSocket 5200, HTTP 5001, Raft 5300, all on 127.0.0.1)."
        ),
    )
    start.add_argument("--config", help="cluster TOML file (see cluster.example.toml)")
    start.add_argument("--node", help="which node of the config to run (default: the first initial member)")
    start.add_argument("--data-dir", help="override the node's data directory")
    start.add_argument(
        "--partners", help="comma-separated node ids of the current members (used by cluster join)"
    )
    start.set_defaults(func=cmd_node_start)

    cluster = commands.add_parser("cluster", help="run a cluster, add and remove nodes")
    cluster_commands = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = cluster_commands.add_parser(
        "up",
        help="start every initial member as its own process; Ctrl-C stops them all",
        description="Start each initial member of the config as its own process (log: <data_dir>/node.log), "
        "wait for a leader, print where each node listens. Ctrl-C or SIGTERM stops them all cleanly.",
    )
    up.add_argument("--config", required=True)
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a leader (default 60)")
    up.set_defaults(func=cmd_cluster_up)
    join = cluster_commands.add_parser(
        "join",
        help="add a configured node to the running cluster and start it",
        description="Add the node through the leader (refused unless every member is up and caught up), "
        "start it in the background (log and pid file in its data dir) and wait until it has caught up.",
    )
    join.add_argument("--config", required=True)
    join.add_argument("--node", required=True)
    join.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the catch-up")
    join.set_defaults(func=cmd_cluster_join)
    remove = cluster_commands.add_parser(
        "remove",
        help="remove a node from the cluster (and stop it if this machine started it)",
        description="Remove a member through the leader (a leader hands over first), then stop its process "
        "if its pid file is in its data dir.",
    )
    remove.add_argument("--config", required=True)
    remove.add_argument("--node", required=True)
    remove.set_defaults(func=cmd_cluster_remove)

    bench_parser = commands.add_parser(
        "bench",
        help="drive a running cluster with load and report throughput, latency, loss and duplicates",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.cmd_bench)

    admin = commands.add_parser("admin", help="inspect and verify a running cluster")
    admin_commands = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = admin_commands.add_parser(
        "status", help="role, term, commit/applied index, lag, connections, queues and dead letters per node"
    )
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="one JSON object: {leader, nodes: [...]}")
    status.set_defaults(func=cmd_admin_status)
    verify = admin_commands.add_parser(
        "verify", help="compare per-channel digests across the members; exit 1 on any difference"
    )
    verify.add_argument("--config", required=True)
    verify.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for nodes to converge")
    verify.set_defaults(func=cmd_admin_verify)
    handlers = admin_commands.add_parser(
        "handlers",
        help="list every handler chain with counts; switch a handler on or off on every node",
        description="Without --disable/--enable: each pool's chains with calls, rejects, errors and p99 "
        "time, summed over every member (--per-node: each member's too). --disable NAME / --enable "
        "NAME switch a handler on every node at run time, through Raft.",
    )
    handlers.add_argument("--config", required=True)
    handlers.add_argument("--node", help="ask only this node (default: every member, counts summed)")
    handlers.add_argument("--per-node", action="store_true", help="also show each member's own counts")
    switch = handlers.add_mutually_exclusive_group()
    switch.add_argument("--disable", metavar="NAME")
    switch.add_argument("--enable", metavar="NAME")
    handlers.add_argument("--json", action="store_true")
    handlers.set_defaults(func=cmd_admin_handlers)
    deadletters = admin_commands.add_parser(
        "deadletters",
        help="list webhook events that failed every attempt; --replay sends them again",
        description="Webhook events the leader could not deliver after the configured attempts. "
        "--replay posts them again, oldest first; the delivered ones leave the list.",
    )
    deadletters.add_argument("--config", required=True)
    deadletters.add_argument("--replay", action="store_true")
    deadletters.add_argument("--json", action="store_true")
    deadletters.set_defaults(func=cmd_admin_deadletters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"imnode: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except op.OperatorError as exc:
        print(f"imnode: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
