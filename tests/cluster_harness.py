"""A real cluster of `imnode node start` processes on 127.0.0.1, ports chosen at run time."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node.config import Config, load
from node.tools import operator as op
from tests.conftest import REPO, free_port
from tests.raft_links import RaftLinks

MANAGER_TOKEN = "test-manager-token"


def write_cluster_toml(
    path: Path,
    *,
    nodes: int = 4,
    initial: int = 3,
    tuning: dict[str, Any] | None = None,
    proxied: bool = False,
) -> Path:
    """A cluster config on free ports. `proxied`: every Raft identity is a front port of RaftLinks, and
    each node binds its real Raft port behind it (`raft_bind`), so tests can cut links."""
    kinds = ("raft", "raft_bind", "tcp", "ws", "http") if proxied else ("raft", "tcp", "ws", "http")
    lines = [
        "[cluster]",
        'name = "test-cluster"',
        f'manager_token = "{MANAGER_TOKEN}"',
        f'secret = "{secrets.token_urlsafe(24)}"',
        f"initial_members = {json.dumps([f'n{i}' for i in range(1, initial + 1)])}",
        "",
    ]
    ports: set[int] = set()
    while len(ports) < len(kinds) * nodes:  # distinct: the OS may hand the same free port out twice
        ports.add(free_port())
    free = iter(sorted(ports))
    for i in range(1, nodes + 1):
        lines += [
            f"[nodes.n{i}]",
            f"numeric_id = {i}",
            *(f'{kind} = "127.0.0.1:{next(free)}"' for kind in kinds),
            f'data_dir = "data/n{i}"',
            "",
        ]
    lines.append("[tuning]")
    for key, value in (tuning or {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Cluster:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: Config = load(str(config_path))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.links: RaftLinks | None = None
        fronts = {
            node_id: (_port(spec.raft), _port(spec.raft_bind))
            for node_id, spec in self.config.nodes.items()
            if spec.raft_bind
        }
        if fronts:
            self.links = RaftLinks(fronts, self.pids)
            self.links.start()

    def pids(self) -> dict[str, int]:
        """Every running node's pid, those started by `cluster join` included (from their pid files)."""
        # Called from RaftLinks' threads while the harness starts nodes: copy before iterating, and a pid
        # file may be caught empty, half written.
        found = {node_id: proc.pid for node_id, proc in list(self.procs.items()) if proc.poll() is None}
        for node_id, spec in self.config.nodes.items():
            if node_id not in found:
                with contextlib.suppress(OSError, ValueError):
                    found[node_id] = int((Path(spec.data_dir) / op.PID_FILE).read_text().strip())
        return found

    def start(self, node_id: str, partners: list[str] | None = None) -> None:
        started = op.spawn(str(self.config_path), self.config, node_id, partners=partners)
        self.procs[node_id] = started.proc

    def start_all(self, timeout_s: float = 60.0) -> str:
        for node_id in self.config.initial_members:
            self.start(node_id)
        for node_id in self.config.initial_members:
            self.wait_serving(node_id, timeout_s)
        return self.wait_leader(timeout_s)

    def wait_leader(self, timeout_s: float = 30.0, exclude: str | None = None) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node_id, proc in self.procs.items():
                if proc.poll() is not None and node_id != exclude and proc.returncode not in (0, -9):
                    raise AssertionError(
                        f"{node_id} exited with {proc.returncode}: {self.log(node_id)[-3000:]}"
                    )
            leader = op.cluster_status(self.config)["leader"]
            if leader is not None and leader != exclude:
                return str(leader)
            time.sleep(0.1)
        raise AssertionError(f"no leader within {timeout_s}s")

    def wait_serving(self, node_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Until the node answers and knows a leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = op.node_status(self.config, node_id)
            if status is not None and status.get("leader") is not None:
                return status
            time.sleep(0.1)
        raise AssertionError(f"{node_id} not serving within {timeout_s}s: {self.log(node_id)[-3000:]}")

    def wait_caught_up(self, node_id: str, timeout_s: float = 30.0) -> None:
        """Until the node has applied everything the leader has (call when no load is running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = op.cluster_status(self.config)
            by_id = {n["id"]: n for n in status["nodes"]}
            leader, node = by_id.get(status["leader"] or ""), by_id.get(node_id)
            if leader and node and node.get("store_applied_index") == leader.get("store_applied_index"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{node_id} did not catch up within {timeout_s}s")

    def tcp(self, node_id: str) -> tuple[str, int]:
        host, port = self.config.node(node_id).tcp.rsplit(":", 1)
        return host, int(port)

    def http(self, node_id: str) -> str:
        return f"http://{self.config.node(node_id).http}"

    def kill9(self, node_id: str) -> None:
        proc = self.procs[node_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def log(self, node_id: str) -> str:
        path = Path(self.config.node(node_id).data_dir) / op.LOG_FILE
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.tools.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # A node started by `cluster join` runs in its own session: stop it by its pid file.
        for node_id in self.config.nodes:
            op.stop_by_pid_file(self.config, node_id, timeout_s=10)
        if self.links is not None:
            self.links.close()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
