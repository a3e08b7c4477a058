"""node/tools/cli.py: the commands that only talk HTTP to nodes import neither the server nor trio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    code = (
        "from node.tools import cli\n"
        f"assert cli.main(['admin', 'status', '--config', {str(REPO / 'cluster.example.toml')!r}]) == 0"
    )
    assert _loaded_after(code) == set()


def test_node_start_still_finds_the_server() -> None:
    assert {"node.server", "trio"} <= _loaded_after("import node.server")
