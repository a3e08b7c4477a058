"""The `imnode` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from node.config import DEFAULT_NODE_ID, Config, ConfigError, load
from node.server import Listening, Node

EXIT_CONFIG = 2


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # PySyncObj logs every reconnect attempt at WARNING; keep it for real trouble.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)


async def _serve_until_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listening: Listening = await nursery.start(node.run)
            print(f"imnode {listening.describe()}", flush=True)
            print(f"data in {node.spec.data_dir}; Ctrl-C stops", flush=True)
            async for signum in signals:
                print(f"received {signal.Signals(signum).name}: stopping", flush=True)
                nursery.cancel_scope.cancel()
                break
    print("imnode stopped cleanly", flush=True)


def cmd_node_start(args: argparse.Namespace) -> int:
    config: Config = load(args.config)
    node_id = args.node or (DEFAULT_NODE_ID if args.config is None else config.initial_members[0])
    if args.data_dir is not None:
        import dataclasses

        spec = dataclasses.replace(config.node(node_id), data_dir=args.data_dir)
        config = dataclasses.replace(config, nodes={**config.nodes, node_id: spec})
    node = Node(config, node_id)
    trio.run(_serve_until_signal, node)
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
    start.set_defaults(func=cmd_node_start)
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


if __name__ == "__main__":
    sys.exit(main())
