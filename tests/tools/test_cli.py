"""node/tools/cli.py: the commands that only talk HTTP to nodes import neither the server nor trio."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.tools import cli
from tests.cluster_harness import write_cluster_toml
from tests.conftest import REPO

HEAVY = ("node.server", "trio", "hypercorn", "pysyncobj", "node.client", "node.tools.loadgen")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return set(done.stdout.split()) & set(HEAVY)


def test_the_command_line_imports_no_server_until_node_start() -> None:
    assert _loaded_after("import node.tools.cli") == set()


def test_admin_status_against_nodes_that_are_down_runs_without_the_server(tmp_path: Path) -> None:
    # Ports picked now, nothing started on them (the example's fixed ports may be in use on this machine).
    config = write_cluster_toml(tmp_path / "cluster.toml")
    argv = ["admin", "status", "--config", str(config)]
    code = f"from node.tools import cli\nassert cli.main({argv!r}) == 3"
    assert _loaded_after(code) == set()


def test_node_start_still_finds_the_server() -> None:
    assert {"node.server", "trio"} <= _loaded_after("import node.server")


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield path
    for action in subcommands:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


def test_every_command_has_a_help_text_for_config() -> None:
    commands = list(_leaf_parsers(cli.build_parser()))
    assert ("cluster", "start") in commands and len(commands) >= 10
    for command in commands:
        shown = subprocess.run(
            [sys.executable, "-m", "node.tools.cli", *command, "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        # argparse prints "--config CONFIG" and then the help text, on the same line or the next (the last
        # time: the usage line names it too).
        after = shown.rsplit("--config CONFIG", 1)[1].lstrip(" ").split("\n", 2)
        assert (after[0] or after[1]).strip(), f"imnode {' '.join(command)} --help:\n{shown}"


@pytest.mark.parametrize(
    "args",
    [
        ("--log-level", "error", "admin", "status"),
        ("admin", "--log-level", "error", "status"),
        ("admin", "status", "--log-level", "error"),
    ],
)
def test_global_options_are_accepted_before_or_after_the_subcommand(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    config = write_cluster_toml(tmp_path / "cluster.toml")
    done = subprocess.run(
        [sys.executable, "-m", "node.tools.cli", *args, "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Nothing runs at those addresses: no leader (3), not a usage error (2).
    assert done.returncode == cli.EXIT_NO_LEADER, done.stdout + done.stderr


NODE_STARTERS = {("node", "start"), ("cluster", "up"), ("cluster", "start"), ("cluster", "join")}


def test_log_level_help_says_nodes_only_where_the_command_starts_some() -> None:
    # Issue 21: every command said "and of the nodes it starts", even `admin status`.
    parser = cli.build_parser()
    commands = list(_leaf_parsers(parser))
    assert set(commands) >= NODE_STARTERS
    for command in commands:
        sub = parser
        for name in command:
            action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
            sub = action.choices[name]
        text = next(a.help for a in sub._actions if "--log-level" in a.option_strings)
        assert ("of the nodes it starts" in str(text)) == (command in NODE_STARTERS), (command, text)


def test_admin_status_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`imnode admin status --json | head`: the reader is gone before the command writes."""
    config = write_cluster_toml(tmp_path / "cluster.toml")
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command starts: its first write fails, every time
    try:
        done = subprocess.run(
            [sys.executable, "-m", "node.tools.cli", "admin", "status", "--json", "--config", str(config)],
            cwd=REPO,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == "", done.stderr  # no BrokenPipeError traceback, no "Exception ignored"
    assert done.returncode == cli.EXIT_BROKEN_PIPE
