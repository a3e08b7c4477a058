"""The `imnode` command line: run nodes and clusters, change membership, inspect and verify.

Only `node start` imports the server (and trio, hypercorn, PySyncObj with it), and only `bench` the client:
every other command talks HTTP to running nodes, so it starts in the time Python and the config take.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from node.config import DEFAULT_NODE_ID, Config, ConfigError, Listening, load
from node.tools import bench
from node.tools import operator as op
from raft.secret import SecretError, create_secret_file, read_secret_file

if TYPE_CHECKING:
    from node.server import Node

EXIT_FAILED = 1
EXIT_CONFIG = 2
# `admin status`: distinct codes so a script can tell "nothing can commit" from "running degraded".
EXIT_NO_LEADER = 3
EXIT_MEMBER_DOWN = 4
SUPERVISE_POLL_S = 0.2  # how soon `cluster up` notices a member's exit
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
# Loggers of the libraries a node uses, kept at WARNING unless --log-level debug. hypercorn's error log is
# named imnode.http.server (node/server.py); its access log is off.
LIBRARY_LOGGERS = ("httpx", "httpcore", "hypercorn.access", "hypercorn.error", "imnode.http.server")
# Exit code when the reader of our output went away (`| head`): what a shell reports for SIGPIPE.
EXIT_BROKEN_PIPE = 141
STATUS_EPILOG = (
    "exit codes: 0 healthy (a leader, every member answers); 3 no leader; 4 a leader but a member is down; "
    "1 another failure; 2 a config error. Configured nodes that are not members are shown as "
    "'not a member' and do not count against health."
)


def _log_level(args: argparse.Namespace) -> str:
    # Not set by argparse when absent (default SUPPRESS), so a subcommand's parser cannot reset a value
    # given before the subcommand.
    return str(getattr(args, "log_level", DEFAULT_LOG_LEVEL))


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # PySyncObj logs every reconnect attempt at WARNING; keep it for real trouble.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
    # Libraries log each request at INFO (httpx: every node-to-node call, four a second per open console
    # page): only `--log-level debug` shows them, as it shows the node's own request lines.
    if level != "debug":
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


class _NodeName(logging.Filter):
    """Puts the node id on every record, PySyncObj's and hypercorn's included: node logs get collected
    together (one terminal, one log shipper), and a line must say which node wrote it."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


def _name_every_line(node_id: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NodeName(node_id))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(node)s] %(name)s: %(message)s"))


# -- node ------------------------------------------------------------------------------------------------
async def _serve_until_signal(node: Node) -> None:
    import trio

    node_id = node.spec.id
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                # Watching from the start: a signal during start-up stops the node too.
                async for signum in signals:
                    print(f"imnode {node_id}: received {signal.Signals(signum).name}: stopping", flush=True)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            listening: Listening = await nursery.start(node.run)
            print(f"imnode {listening.describe()}", flush=True)
            print(f"imnode {node_id}: {listening.console(node.config.manager_token)}", flush=True)
            print(f"imnode {node_id}: data in {node.spec.data_dir}; Ctrl-C stops", flush=True)
    print(f"imnode {node_id}: stopped cleanly", flush=True)


def cmd_node_start(args: argparse.Namespace) -> int:
    config: Config = load(args.config)
    node_id = args.node or (DEFAULT_NODE_ID if args.config is None else config.initial_members[0])
    spec = config.node(node_id)
    _name_every_line(node_id)
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

    from node import calls, datadir
    from node.plugins import PluginError
    from node.server import Node

    if calls.requested():
        # Before Node starts any thread (PySyncObj's tick thread), so every thread counts.
        calls.install()

    # This process is the node: everything it creates (store, journal, secret) is its owner's alone,
    # whatever umask it was started with.
    os.umask(datadir.PRIVATE_UMASK)
    try:
        node = Node(config, node_id)
    except PluginError as exc:
        print(f"imnode {node_id}: plugin error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except datadir.DataDirError as exc:
        print(f"imnode {node_id}: data dir refused: {exc}", file=sys.stderr)
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


def _ensure_secret(config: Config) -> None:
    """Create the config's cluster secret file once; refuse one that is unusable before any node starts."""
    if not config.secret_file:
        return
    if create_secret_file(config.secret_file):
        op.say(
            f"created the cluster secret {config.secret_file} (mode 0600, random): every node of this "
            "cluster needs this same file; copy it (scp -p) to the other machines, never into a repository"
        )
    try:
        read_secret_file(config.secret_file)
    except SecretError as exc:
        raise ConfigError(f"{config.source}: cluster.secret_file: {exc}") from None


def cmd_cluster_secret(args: argparse.Namespace) -> int:
    config = load(args.config)
    if not config.secret_file:
        how = "cluster.secret in the file" if config.secret else "each node's own, in its data dir"
        raise op.OperatorError(f"{args.config} names no secret file (its secret: {how})")
    existed = os.path.exists(config.secret_file)
    _ensure_secret(config)
    if existed:
        op.say(f"{config.secret_file}: the cluster secret is there and usable (mode 0600)")
    return 0


def cmd_cluster_up(args: argparse.Namespace) -> int:
    config = load(args.config)
    _ensure_secret(config)
    # Every port of every member before anything starts: a second `cluster up` (or any other process on a
    # port) is named here, instead of nodes dying on their ports while the first cluster answers.
    for node_id in config.initial_members:
        _check_ports_free(config, node_id)
    # Both set explicitly: a shell starts background jobs with SIGINT ignored, and Python then keeps it so.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    procs: list[op.NodeProcess] = []
    try:
        for node_id in config.initial_members:
            procs.append(op.spawn(args.config, config, node_id, log_level=_log_level(args)))
            op.say(f"started {node_id} (pid {procs[-1].proc.pid}), log {procs[-1].log_path}")
        op.say(f"waiting for a leader (at most {args.timeout:.0f}s)...")
        leader = _wait_for_own_cluster(config, procs, args.timeout)
        for node_id in config.initial_members:
            spec = config.node(node_id)
            listening = Listening(
                node_id, spec.tcp, spec.ws, spec.http, spec.raft, spec.tcp_tls, spec.wss, config.tls.http
            )
            op.say(f"  {listening.describe().removeprefix('node ')}")
            op.say(f"      {listening.console(config.manager_token)}")
        op.say(f"cluster {config.cluster_name} is up: leader {leader}. Ctrl-C stops it.")
        _supervise(config, args.config, procs)
        raise op.OperatorError("every node of the cluster has exited")
    except (KeyboardInterrupt, _Stop):
        op.say("stopping the cluster...")
        return _stop_all(config, procs)
    except op.OperatorError as exc:
        print(f"imnode: {exc}", file=sys.stderr)
        _stop_all(config, procs)
        return EXIT_FAILED


def _supervise(config: Config, config_path: str, procs: list[op.NodeProcess]) -> None:
    """Report each member that exits, and each one `cluster start` brings back (its pid file names the
    new process); return once no member's process is left."""
    watched: dict[str, int | None] = {p.node_id: p.proc.pid for p in procs}
    while any(pid is not None for pid in watched.values()):
        time.sleep(SUPERVISE_POLL_S)
        for p in procs:
            pid = watched[p.node_id]
            if pid is None:
                again = op.pid_from_file(config, p.node_id)
                if again is not None and again != p.proc.pid and op.pid_alive(again):
                    watched[p.node_id] = again
                    op.say(f"{p.node_id} is running again (pid {again})")
                continue
            if pid == p.proc.pid and p.proc.poll() is not None:
                how = f"exited with code {p.proc.returncode}"
            elif pid != p.proc.pid and not op.pid_alive(pid):
                how = f"(pid {pid}) exited"
            else:
                continue
            watched[p.node_id] = None
            op.say(
                f"{p.node_id} {how}; see {p.log_path}; "
                f"`imnode cluster start --config {config_path} --node {p.node_id}` starts it again"
            )


def _wait_for_own_cluster(config: Config, procs: list[op.NodeProcess], timeout_s: float) -> str:
    """Until every child answers as itself and one of them leads; the leader's id."""
    deadline = time.monotonic() + timeout_s
    pids = {p.node_id: p.proc.pid for p in procs}
    while True:
        for p in procs:
            if p.proc.poll() is not None:
                raise op.OperatorError(f"{p.node_id} exited with code {p.proc.returncode}; see {p.log_path}")
        status = op.cluster_status(config)
        # Only our own children count: an answer from another process on a member's address is not
        # this cluster (the port check above makes that rare; a port taken since is still caught here).
        ours = op.started_by(status, pids)
        if status["leader"] in ours and ours >= set(config.initial_members):
            return str(status["leader"])
        if time.monotonic() > deadline:
            raise op.OperatorError(
                f"the cluster did not come up within {timeout_s:.0f}s (leader: {status['leader']}, "
                f"answering as started here: {', '.join(sorted(ours)) or 'none'}); see the log files above"
            )
        time.sleep(SUPERVISE_POLL_S)


def _stop_all(config: Config, procs: list[op.NodeProcess]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The exit code says whether this stop was clean: a member that had died before was reported then.
    running = [p for p in procs if p.proc.poll() is None]
    for p in running:
        p.proc.send_signal(signal.SIGTERM)
    failed = 0
    for p in procs:
        if p not in running:
            op.say(f"  {p.node_id} had exited (exit code {p.proc.returncode})")
        else:
            try:
                code = p.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                code = p.proc.wait()
            op.say(f"  {p.node_id} stopped (exit code {code})")
            failed += code != 0
        # A member that died and was brought back by `cluster start` belongs to this cluster too: stopping
        # the cluster stops it (its pid file names the new process).
        restarted = op.pid_from_file(config, p.node_id)
        if restarted not in (None, p.proc.pid) and op.stop_by_pid_file(config, p.node_id):
            op.say(f"  {p.node_id} (pid {restarted}, started again by `cluster start`) stopped")
    op.say("cluster stopped")
    return 0 if not failed else EXIT_FAILED


def _wait_caught_up(
    config: Config, node_id: str, started: op.NodeProcess, goal: int | None, timeout_s: float
) -> int:
    """Until the started node serves (follower or leader) and has applied `goal` (None: the leader's
    commit index when the node first reports a leader); its applied index."""
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    applied = 0
    while time.monotonic() < deadline:
        if started.proc.poll() is not None:
            raise op.OperatorError(
                f"{node_id} exited with code {started.proc.returncode}; see {started.log_path}"
            )
        status = op.node_status(config, node_id)
        applied = int((status or {}).get("applied_index") or 0)
        if status is not None and status["role"] in ("follower", "leader") and status.get("leader"):
            if goal is None:
                leader_status = op.node_status(config, status["leader"])
                goal = None if leader_status is None else int(leader_status.get("commit_index") or 0)
            if goal is not None and applied >= goal:
                return applied
        if time.monotonic() - last_report > 2:
            goal_text = "not known yet" if goal is None else str(goal)
            op.say(
                f"  {node_id}: catching up: applied Raft index {applied}; "
                f"goal {goal_text} (the leader's commit index)"
            )
            last_report = time.monotonic()
        time.sleep(SUPERVISE_POLL_S)
    raise op.OperatorError(f"{node_id} did not catch up within {timeout_s:.0f}s; see {started.log_path}")


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
    started = op.spawn(
        args.config, config, node_id, detach=True, partners=current, log_level=_log_level(args)
    )
    op.say(f"started {node_id} (pid {started.proc.pid}), log {started.log_path}; catching up...")
    target = op.node_status(config, leader)
    goal = int((target or {}).get("commit_index") or 0)
    applied = _wait_caught_up(config, node_id, started, goal, args.timeout)
    op.say(f"{node_id} joined and caught up (applied index {applied}); it serves clients at {spec.tcp}")
    return 0


def cmd_cluster_start(args: argparse.Namespace) -> int:
    """Start a configured member again (after it died or was stopped), in the background."""
    config = load(args.config)
    node_id = args.node
    spec = config.node(node_id)
    _check_ports_free(config, node_id)  # still running, or something else on its ports: say so first
    status = op.cluster_status(config)
    members = list(status["members"])
    if node_id not in members:
        how = "the current members" if status["members_known"] else "the config's initial members"
        raise op.OperatorError(
            f"{node_id} is not a member ({how}: {', '.join(members)}); "
            f"add it with `imnode cluster join --config {args.config} --node {node_id}`"
        )
    # The current members as partners (a member that joined later is not in the config's initial list);
    # with nobody answering, the config's own list is all there is.
    partners = members if status["members_known"] else None
    started = op.spawn(
        args.config, config, node_id, detach=True, partners=partners, log_level=_log_level(args)
    )
    op.say(f"started {node_id} (pid {started.proc.pid}), log {started.log_path}; catching up...")
    leader = status["leader"]
    goal = None
    if leader is not None:
        goal = int(next(n for n in status["nodes"] if n["id"] == leader).get("commit_index") or 0)
    applied = _wait_caught_up(config, node_id, started, goal, args.timeout)
    op.say(f"{node_id} is back and caught up (applied index {applied}); it serves clients at {spec.tcp}")
    return 0


def cmd_cluster_remove(args: argparse.Namespace) -> int:
    config = load(args.config)
    node_id = args.node
    config.node(node_id)
    leader, current = op.members(config)
    if node_id not in current:
        raise op.OperatorError(f"{node_id} is not a member ({', '.join(current)})")
    if len(current) <= 1:
        raise op.OperatorError("cannot remove the last member")
    if args.to is not None:
        config.node(args.to)
        if args.to == node_id or args.to not in current:
            raise op.OperatorError(f"--to {args.to}: name another current member ({', '.join(current)})")
    if node_id == leader:
        op.say(f"{node_id} leads: handing leadership over first")
        try:
            leader = op.hand_over_leadership(config, leader, prefer=args.to)
        except op.OperatorError as exc:
            raise op.OperatorError(f"{exc}; nothing was removed") from None
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
    code = _health(status)
    if args.json:
        print(json.dumps(status, indent=2))
        return code
    header = (
        f"{'node':6} {'role':12} {'term':>5} {'commit':>9} {'applied':>9} {'lag':>6} {'conns':>6} "
        f"{'queues u/c/p':>14} {'dead':>5}"
    )
    print(f"cluster {config.cluster_name}: leader {status['leader'] or '(none)'}")
    print(header)
    for node in status["nodes"]:
        if node["role"] in ("down", op.NOT_A_MEMBER):
            print(f"{node['id']:6} {node['role']}")
            continue
        # A node that answers but is not a member (removed, still running) is shown as such.
        role = node["role"] if node["member"] else op.NOT_A_MEMBER
        pools = node["pools"]
        queues = "/".join(str(pools[p]["queue_depth"]) for p in ("user", "channel", "pusher"))
        print(
            f"{node['id']:6} {role:12} {node['term']:>5} {node['commit_index']:>9} "
            f"{node['applied_index']:>9} {node['lag']:>6} {node['connections']:>6} {queues:>14} "
            f"{node['dead_letters']:>5}"
        )
    if code == EXIT_NO_LEADER:
        print("not healthy: no leader (nothing can be committed)")
    elif code == EXIT_MEMBER_DOWN:
        print(f"not healthy: members down: {', '.join(status['down'])}")
    else:
        print(f"healthy: {len(status['members'])} members up")
    return code


def _health(status: dict[str, Any]) -> int:
    """`admin status`'s exit code: no leader first (the worse state), then any member down."""
    if status["leader"] is None:
        return EXIT_NO_LEADER
    if status["down"]:
        return EXIT_MEMBER_DOWN
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


HANDLERS_NOTE = (
    "  not timed: built-in steps are counted but not timed (timing each call cost as much as the step).\n"
    "  channel.distribute runs only while a plugin is on that chain (then once per committed message): "
    "0 calls without one."
)


def _print_handlers(title: str, report: dict[str, Any]) -> None:
    disabled = ", ".join(report["disabled"]) or "none"
    print(f"handler chains on {title} (disabled cluster-wide: {disabled})")
    columns = f"{'pool.event':22} {'handler':24} {'kind':8} {'on':3} {'calls':>9} {'rejects':>8}"
    print(f"{columns} {'errors':>7} {'p99 ms':>9}")
    for pool, chains in report["pools"].items():
        for event, chain in chains.items():
            for h in chain:
                on = "yes" if h["enabled"] else "no"
                p99 = h["p99_ms"] if h.get("timed", True) else "not timed"
                print(
                    f"{pool + '.' + event:22} {h['name']:24} {h['kind']:8} {on:3} "
                    f"{h['calls']:>9} {h['rejects']:>8} {h['errors']:>7} {p99:>9}"
                )
    print(HANDLERS_NOTE)


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


def cmd_admin_trace(args: argparse.Namespace) -> int:
    """Each node's sampled per-stage latencies: where the time of one message goes."""
    config = load(args.config)
    _, current = op.members(config)
    reports = {}
    for node_id in [args.node] if args.node else current:
        try:
            reports[node_id] = op.request(config, node_id, "GET", "/admin/trace")
        except op.OperatorError as exc:
            op.say(f"{node_id}: {exc}")
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0 if reports else EXIT_FAILED
    for node_id, report in reports.items():
        print(f"{node_id} (every {report['sample_every']}th message traced)")
        for kind, title in (("send", "SEND -> SENDACK written"), ("deliver", "applied -> RECV written")):
            part = report[kind]
            total = part["total"]
            print(f"  {title}: {total['count']} traces, p50 {total['p50_ms']} ms, p99 {total['p99_ms']} ms")
            for stage, row in part["stages"].items():
                print(f"    {stage:18} p50 {row['p50_ms']:>9.3f} ms   p99 {row['p99_ms']:>9.3f} ms")
    return 0 if reports else EXIT_FAILED


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
    dropped = report.get("dropped", {})  # absent from a node of an older version
    if any(dropped.values()):
        counts = ", ".join(f"{stream} {count}" for stream, count in dropped.items())
        print(f"dropped, oldest first, over the cap of {report['deadletters_max']} per stream: {counts}")
    for letter in letters:
        print(
            f"  {letter['event']:18} #{letter['seq']:<8} attempts {letter['attempts']:<3} {letter['error']}"
        )
    return 0


def _log_level_parent(help_text: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help=help_text)
    return parent


def build_parser() -> argparse.ArgumentParser:
    # Global options, accepted before or after any subcommand: every parser gets them, with no default
    # (SUPPRESS), so a value given at one level is never reset by the next parser's default.
    # Two variants of the same option: only the commands that start nodes pass the level on to them.
    common = _log_level_parent(f"log level of this command (default {DEFAULT_LOG_LEVEL})")
    starts_nodes = _log_level_parent(
        f"log level of this command and of the nodes it starts (default {DEFAULT_LOG_LEVEL})"
    )
    some_start_nodes = _log_level_parent(
        "log level of this command, and of the nodes it starts when it is node start or cluster "
        f"up/start/join (default {DEFAULT_LOG_LEVEL})"
    )
    parser = argparse.ArgumentParser(
        prog="imnode",
        description="A clustered IM node speaking the WuKongIM protocol (trio, PySyncObj, LMDB).",
        parents=[some_start_nodes],
    )
    commands = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    config_help = "the cluster TOML file (see cluster.example.toml)"

    node = commands.add_parser("node", help="run a node", parents=[some_start_nodes])
    node_commands = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = node_commands.add_parser(
        "start",
        parents=[starts_nodes],
        help="run one node in the foreground",
        description=(
            "Run one node in the foreground. Without --config: a single node on embedded defaults "
            "(data in ./imnode-data; TCP 5100, WebSocket 5200, HTTP 5001, Raft 5300, all on 127.0.0.1)."
        ),
    )
    start.add_argument("--config", help=f"{config_help}; without it, a single node on embedded defaults")
    start.add_argument("--node", help="which node of the config to run (default: the first initial member)")
    start.add_argument("--data-dir", help="override the node's data directory")
    start.add_argument(
        "--partners", help="comma-separated node ids of the current members (used by cluster join)"
    )
    start.set_defaults(func=cmd_node_start)

    cluster = commands.add_parser(
        "cluster",
        help="run a cluster, start a member again, add and remove nodes",
        parents=[some_start_nodes],
    )
    cluster_commands = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = cluster_commands.add_parser(
        "up",
        parents=[starts_nodes],
        help="start every initial member as its own process; Ctrl-C stops them all",
        description="Check that every member's ports are free, then start each initial member of the config "
        "as its own process (log: <data_dir>/node.log), wait until each answers as the process started here "
        "and one of them leads, and print where each node listens. A member that exits is reported (start "
        "it again with `imnode cluster start`); the command exits 1 once no member's process is left. "
        "Ctrl-C or SIGTERM stops them all cleanly, members brought back by `cluster start` included.",
    )
    up.add_argument("--config", required=True, help=config_help)
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a leader (default 60)")
    up.set_defaults(func=cmd_cluster_up)
    again = cluster_commands.add_parser(
        "start",
        parents=[starts_nodes],
        help="start a member again (after it died or was stopped) and wait until it has caught up",
        description="Start a configured node that is a member of the running cluster (refused for a node "
        "that is not: use `cluster join`; and for one whose ports are in use) in the background (log and pid "
        "file in its data dir), with the current members as partners, and wait until it serves and has "
        "caught up. A running `cluster up` reports it back and stops it with the others.",
    )
    again.add_argument("--config", required=True, help=config_help)
    again.add_argument("--node", required=True, help="the member to start")
    again.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the catch-up")
    again.set_defaults(func=cmd_cluster_start)
    join = cluster_commands.add_parser(
        "join",
        parents=[starts_nodes],
        help="add a configured node to the running cluster and start it",
        description="Add the node through the leader (refused unless every member is up and caught up), "
        "start it in the background (log and pid file in its data dir) and wait until it has caught up.",
    )
    join.add_argument("--config", required=True, help=config_help)
    join.add_argument("--node", required=True, help="the configured node to add")
    join.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the catch-up")
    join.set_defaults(func=cmd_cluster_join)
    remove = cluster_commands.add_parser(
        "remove",
        parents=[common],
        help="remove a node from the cluster (and stop it if this machine started it)",
        description="Remove a member through the leader (a leader hands over first), then stop its process "
        "if its pid file is in its data dir.",
    )
    remove.add_argument("--config", required=True, help=config_help)
    remove.add_argument("--node", required=True, help="the member to remove")
    remove.add_argument(
        "--to",
        help="when the member leads: hand leadership to this member first (default: the connected "
        "followers in turn, by name)",
    )
    remove.set_defaults(func=cmd_cluster_remove)

    secret = cluster_commands.add_parser(
        "secret",
        parents=[common],
        help="create the cluster secret file the config names (cluster up does it too)",
        description="Create the config's cluster.secret_file (default: <config name>.secret beside the "
        "config) with a random secret, mode 0600, unless it exists; check an existing one. Every node of "
        "the cluster needs the same file: copy it to the other machines (scp -p) and keep it out of "
        "repositories. The secret authenticates Raft traffic and node-to-node calls.",
    )
    secret.add_argument("--config", required=True, help=config_help)
    secret.set_defaults(func=cmd_cluster_secret)

    bench_parser = commands.add_parser(
        "bench",
        parents=[common],
        help="drive a running cluster with load and report throughput, latency, loss and duplicates",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.cmd_bench)

    admin = commands.add_parser("admin", help="inspect and verify a running cluster", parents=[common])
    admin_commands = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = admin_commands.add_parser(
        "status",
        parents=[common],
        help="role, term, commit/applied index, lag, connections, queues and dead letters per node",
        description="Each configured node's status, asked over HTTP. " + STATUS_EPILOG,
    )
    status.add_argument("--config", required=True, help=config_help)
    status.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: {leader, members, members_known, down, nodes: [...]}",
    )
    status.set_defaults(func=cmd_admin_status)
    verify = admin_commands.add_parser(
        "verify",
        parents=[common],
        help="compare per-channel digests across the members; exit 1 on any difference",
    )
    verify.add_argument("--config", required=True, help=config_help)
    verify.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for nodes to converge")
    verify.set_defaults(func=cmd_admin_verify)
    handlers = admin_commands.add_parser(
        "handlers",
        parents=[common],
        help="list every handler chain with counts; switch a handler on or off on every node",
        description="Without --disable/--enable: each pool's chains with calls, rejects, errors and p99 "
        "time, summed over every member (--per-node: each member's too). --disable NAME / --enable "
        "NAME switch a handler on every node at run time, through Raft.",
    )
    handlers.add_argument("--config", required=True, help=config_help)
    handlers.add_argument("--node", help="ask only this node (default: every member, counts summed)")
    handlers.add_argument("--per-node", action="store_true", help="also show each member's own counts")
    switch = handlers.add_mutually_exclusive_group()
    switch.add_argument("--disable", metavar="NAME")
    switch.add_argument("--enable", metavar="NAME")
    handlers.add_argument("--json", action="store_true")
    handlers.set_defaults(func=cmd_admin_handlers)
    deadletters = admin_commands.add_parser(
        "deadletters",
        parents=[common],
        help="list webhook events that failed every attempt; --replay sends them again",
        description="Webhook events the leader could not deliver after the configured attempts. "
        "--replay posts them again, oldest first; the delivered ones leave the list.",
    )
    deadletters.add_argument("--config", required=True, help=config_help)
    deadletters.add_argument("--replay", action="store_true")
    deadletters.add_argument("--json", action="store_true")
    deadletters.set_defaults(func=cmd_admin_deadletters)
    trace = admin_commands.add_parser(
        "trace",
        parents=[common],
        help="where the time of a message goes: per-stage p50/p99 of sampled messages, per node",
        description="Every tuning.trace_sample_every-th SEND a node decodes is timed stage by stage "
        "(decode, user pool, channel pool, proposal wait, Raft commit, apply, back to trio, completion, "
        "SENDACK write), and so is every n-th committed message on its way to a RECV write. Shows the "
        "p50 and p99 of each stage over the last 1,000 traces of each node.",
    )
    trace.add_argument("--config", required=True, help=config_help)
    trace.add_argument("--node", help="only this node (default: every member)")
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(func=cmd_admin_trace)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(_log_level(args))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so a reader that went away is caught below, not at interpreter exit
        return code
    except BrokenPipeError:
        # `imnode admin status --json | head`: the reader has what it wanted. No traceback, and nothing
        # more written to the closed pipe when Python flushes stdout on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        print(f"imnode: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except op.OperatorError as exc:
        print(f"imnode: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
