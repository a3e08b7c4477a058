"""`imnode bench`: a load generator that accounts honestly.

Clients (imnode's own, encryption on as the SDKs use it; with `--protocol jsonrpc`, JSON-RPC light clients
on the WebSocket ports, as the EasySDKs speak it) are spread over every member of a running cluster.
In `person` mode client i sends to client i+1 (a ring, every recipient online); in `group` mode every client
is a member of one group of `--group-size` and sends to it. Each payload carries (run, sender, counter,
send time): a message counts as delivered only when a recipient decrypted it, its msg_key verified (the
client drops it otherwise) and its payload names this run.

The default, 200 sends/s in total, stays below what the example 3-node cluster takes on a 2-core machine,
so latencies are those of a cluster keeping up. A fixed rate is spread evenly: each sender sends at its
share of the rate, the senders' starts staggered over one interval (not all at the same instant).
`--rate max` (every sender keeps --window sends in flight) measures throughput. A run connects
(`connect_s`), sends for --duration (`send_s`), then drains (`drain_s`: waits for the SENDACKs in flight
and for deliveries until none is missing, or none came for 10 s). At the end:

- `acked_per_s`, `delivered_per_s`: the count divided by the seconds from the first send to the last
  SENDACK (delivery) counted; the live lines use the same definition, so the last one matches the summary,
- `lost`: acknowledged sends never delivered to an online recipient (after the drain),
- `duplicates`: one send delivered to one recipient under two message ids or seqs (a DUP resend of the
  same message id is not one),
- latencies: send→SENDACK and send→RECV (e2e), percentiles over every message,
- `errors` by name: a SENDACK's reason as the protocol names it (RATE_LIMIT, SYSTEM_ERROR, ...),
  `sendack_timeout` (none within 30 s), `sender_disconnected` / `recipient_disconnected` (with the
  node's DISCONNECT reason, e.g. `:CONNECT_KICK`, if it sent one),
- CPU per acked message in µs: `node_cpu_us_per_msg` summed over the nodes (and `_by_node`), from each
  node's process CPU seconds in its admin status read just before connecting and again after the drain;
  `bench_cpu_us_per_msg` of this load generator over the same span, to show how much of the machine it took,
- per node: peak RSS and CPU seconds (since it started, and in this run),
- with `--count-calls`, against nodes started with `IMNODE_COUNT_CALLS=1`: `node_calls_per_msg`, the
  Python function calls of all nodes from before connecting to after the drain per acked message, a figure
  without timing noise. The counter slows a node several times over, so use it at a fixed modest load
  (the README's: `--clients 20 --rate 500 --duration 10`), never beside CPU or latency figures.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from node.config import Config, load
from node.tools import operator as op

DEFAULT_RATE = "200"


def print_table(report: dict[str, Any]) -> None:
    for key, value in report.items():
        if key in ("nodes", "node_cpu_us_per_msg_by_node", "node_calls_per_msg_by_node"):
            continue  # on the node lines below
        if key == "node_calls_per_msg_by_thread":
            value = ", ".join(f"{kind} {count}" for kind, count in value.items())
        if key == "errors":
            value = ", ".join(f"{name} {count}" for name, count in value.items()) or "none"
        print(f"{key:20} {value}")
    by_node = report.get("node_cpu_us_per_msg_by_node", {})
    for node_id, stats in report["nodes"].items():
        conns = f"{stats['connections']} connections, " if "connections" in stats else ""
        run = ""
        if "run_cpu_s" in stats:
            run = f" ({stats['run_cpu_s']} s in this run: {by_node.get(node_id)} us per acked message)"
        print(f"node {node_id:15} {conns}peak RSS {stats['peak_rss_mb']} MB, CPU {stats['cpu_s']} s{run}")


def node_calls(config: Config) -> dict[str, dict[str, int]]:
    """Each member's Python calls so far, in all and per kind of thread (`python_calls` in its status)."""
    _leader, members = op.members(config)
    counts = {}
    for node_id in (m for m in members if m in config.nodes):
        process = (op.node_status(config, node_id) or {}).get("process", {})
        if "python_calls" not in process:
            raise op.OperatorError(f"node {node_id} counts no calls: start it with IMNODE_COUNT_CALLS=1")
        counts[node_id] = {"all": process["python_calls"], **process["python_calls_by_thread"]}
    return counts


def calls_per_message(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], acked: int) -> Any:
    """node_calls_per_msg summed over the nodes, and by node and by kind of thread (trio: MainThread)."""
    spent = {n: {k: c - before[n].get(k, 0) for k, c in after[n].items()} for n in after if n in before}
    threads: dict[str, int] = {}
    for counts in spent.values():
        for kind, c in counts.items():
            threads[kind] = threads.get(kind, 0) + c
    return {
        "node_calls_per_msg": round(threads.pop("all", 0) / acked) if acked else None,
        "node_calls_per_msg_by_node": {n: round(c["all"] / acked) for n, c in spent.items()} if acked else {},
        "node_calls_per_msg_by_thread": {k: round(c / acked) for k, c in threads.items()} if acked else {},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="cluster TOML (default: the single node of `imnode node start`)")
    parser.add_argument(
        "--clients",
        type=int,
        default=10,
        help="client connections, spread over the members (default 10; the README's figures use 20)",
    )
    parser.add_argument("--senders", type=int, default=0, help="how many of the clients send (default: all)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending (default 10)")
    parser.add_argument(
        "--rate",
        default=DEFAULT_RATE,
        help=f"sends/s in total over all senders (default {DEFAULT_RATE}: below the example cluster's "
        "saturation on 2 cores); 'max' for throughput: every sender keeps --window sends in flight",
    )
    parser.add_argument("--payload", type=int, default=200, help="payload bytes (default 200)")
    parser.add_argument(
        "--mode",
        choices=["person", "group", "idle", "stream"],
        default="person",
        help="idle: only hold connections; stream: AI-chat streams (node/tools/streambench.py)",
    )
    parser.add_argument(
        "--streams", type=int, default=100, help="stream mode: concurrent streams (default 100)"
    )
    parser.add_argument(
        "--deltas-per-s",
        type=float,
        default=50.0,
        help="stream mode: deltas per second per stream (default 50)",
    )
    parser.add_argument(
        "--protocol",
        choices=["binary", "binary-ws", "jsonrpc"],
        default="binary",
        help="binary: imnode's client on the TCP ports, encrypted as the SDKs do (default); binary-ws: the "
        "same on the WebSocket ports; jsonrpc: JSON-RPC light clients (the EasySDKs' protocol, no payload "
        "encryption) on the WebSocket ports",
    )
    parser.add_argument(
        "--ping-interval", type=float, default=30.0, help="idle mode heartbeat (default 30 s)"
    )
    parser.add_argument("--group-size", type=int, default=100)
    parser.add_argument("--window", type=int, default=100, help="sends in flight per client (default 100)")
    parser.add_argument(
        "--write-each",
        action="store_true",
        help="one SEND per write, as an app sends them (default at --rate max: a sender's whole free "
        "window in one write, as pipelining clients such as NATS's do)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument(
        "--count-calls",
        action="store_true",
        help="report node_calls_per_msg (nodes started with IMNODE_COUNT_CALLS=1; see above)",
    )


def check_arguments(args: argparse.Namespace) -> None:
    if args.clients < 2:
        raise op.OperatorError("--clients must be at least 2 (senders need online recipients)")
    if not 0 <= args.senders <= args.clients:
        raise op.OperatorError("--senders must be between 1 and --clients (0: all)")
    if args.streams < 1 or args.deltas_per_s <= 0:
        raise op.OperatorError("--streams >= 1 and --deltas-per-s > 0 please")
    if args.duration <= 0 or args.window < 1 or args.payload < 64 or args.group_size < 2:
        raise op.OperatorError("--duration > 0, --window >= 1, --payload >= 64 and --group-size >= 2 please")
    if args.rate != "max":
        try:
            if float(args.rate) <= 0:
                raise ValueError
        except ValueError:
            raise op.OperatorError(f"--rate must be a positive number or 'max', not {args.rate!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    check_arguments(args)
    config = load(args.config)
    import trio  # here, not at the top: only a bench pays for trio and the client library

    if args.mode == "stream":
        from node.tools.streambench import StreamBench

        report = trio.run(StreamBench(config, args).run)
        if args.json:
            print(json.dumps(report))
        else:
            print_table(report)
        return 0 if report["lost"] == 0 and report["out_of_order"] == 0 else 1

    from node.tools.loadgen import Bench

    calls_before = node_calls(config) if args.count_calls else {}
    report = trio.run(Bench(config, args).run)
    if args.count_calls:
        report.update(calls_per_message(calls_before, node_calls(config), report.get("acked", 0)))
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if report.get("lost", 0) == 0 and report.get("duplicates", 0) == 0 else 1
