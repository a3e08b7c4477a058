"""`imnode bench`: a load generator that accounts honestly.

Clients (imnode's own, encryption on as the SDKs use it) are spread over every member of a running cluster.
In `person` mode client i sends to client i+1 (a ring, every recipient online); in `group` mode every client
is a member of one group of `--group-size` and sends to it. Each payload carries (run, sender, counter,
send time): a message counts as delivered only when a recipient decrypted it, its msg_key verified (the
client drops it otherwise) and its payload names this run. At the end:

- `lost`: acknowledged sends never delivered to an online recipient (after a drain period),
- `duplicates`: one send delivered to one recipient under two message ids or seqs (a DUP resend of the
  same message id is not one),
- latencies: send→SENDACK and send→RECV (e2e), percentiles over every message,
- per node: peak RSS and CPU seconds, from the nodes' admin status.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from node.config import load
from node.tools import operator as op


def print_table(report: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in report.items() if k != "nodes"]
    for key, value in rows:
        print(f"{key:16} {value}")
    for node_id, stats in report["nodes"].items():
        conns = f"{stats['connections']} connections, " if "connections" in stats else ""
        print(f"node {node_id:11} {conns}peak RSS {stats['peak_rss_mb']} MB, CPU {stats['cpu_s']} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="cluster TOML (default: the single node of `imnode node start`)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--senders", type=int, default=0, help="how many of the clients send (default: all)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending (default 10)")
    parser.add_argument("--rate", default="max", help="total sends/s across clients, or 'max' (default)")
    parser.add_argument("--payload", type=int, default=200, help="payload bytes (default 200)")
    parser.add_argument(
        "--mode", choices=["person", "group", "idle"], default="person", help="idle: only hold connections"
    )
    parser.add_argument(
        "--ping-interval", type=float, default=30.0, help="idle mode heartbeat (default 30 s)"
    )
    parser.add_argument("--group-size", type=int, default=100)
    parser.add_argument("--window", type=int, default=100, help="sends in flight per client (default 100)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def check_arguments(args: argparse.Namespace) -> None:
    if args.clients < 2:
        raise op.OperatorError("--clients must be at least 2 (senders need online recipients)")
    if not 0 <= args.senders <= args.clients:
        raise op.OperatorError("--senders must be between 1 and --clients (0: all)")
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

    from node.tools.loadgen import Bench

    report = trio.run(Bench(config, args).run)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if report.get("lost", 0) == 0 and report.get("duplicates", 0) == 0 else 1
