"""Shared fixtures: real nodes on 127.0.0.1 with ports chosen at run time, real LMDB in tmp_path."""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.config import Config, Listening, NodeSpec, Tuning
from node.server import Node

logging.getLogger("pysyncobj").setLevel(logging.CRITICAL)
REPO = Path(__file__).resolve().parent.parent


# -- Ctrl-C stops the run ---------------------------------------------------------------------------------
# trio delivers SIGINT as a KeyboardInterrupt into the test's main task, and the nurseries it crosses (the
# test's own, pytest-trio's fixture nursery) wrap it in a BaseExceptionGroup. pytest stops a session only on
# a bare KeyboardInterrupt: a group is just a failure, so the run went on to the next test. Unwrapped here,
# in every phase, pytest stops at once and tears the fixtures down (their finalizers stop the child nodes).
def _reraise_interrupt(group: BaseExceptionGroup[BaseException]) -> None:
    interrupts, _rest = group.split(KeyboardInterrupt)
    if interrupts is not None:
        raise KeyboardInterrupt from group


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except BaseExceptionGroup as group:
        _reraise_interrupt(group)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except BaseExceptionGroup as group:
        _reraise_interrupt(group)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    try:
        return (yield)
    except BaseExceptionGroup as group:
        _reraise_interrupt(group)
        raise


def _ephemeral_range() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_EPHEMERAL = _ephemeral_range()


def free_port() -> int:
    """A port free right now on 127.0.0.1, outside the kernel's ephemeral range.

    PySyncObj needs a fixed Raft address, so port 0 won't do. Ports from the ephemeral range (what binding
    port 0 hands out) can be taken by any outgoing connection while a node of a test is down, and its
    restart then fails with "address in use"; a random port below that range is never handed out so.
    """
    for _ in range(1000):
        port = random.randrange(10000, 32000)
        if port in _EPHEMERAL:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def single_node_config(data_dir: Path, **overrides: Any) -> Config:
    tuning_fields = {f.name for f in dataclasses.fields(Tuning)}
    tuning = Tuning(**{k: v for k, v in overrides.items() if k in tuning_fields})
    top = {k: v for k, v in overrides.items() if k not in tuning_fields}
    spec = NodeSpec(
        raft=f"127.0.0.1:{free_port()}",
        tcp="127.0.0.1:0",
        ws="127.0.0.1:0",
        http="127.0.0.1:0",
        data_dir=str(data_dir),
    )
    return Config(nodes={"n1": spec}, tuning=tuning, **top)


@dataclasses.dataclass
class RunningNode:
    node: Node
    listening: Listening

    @property
    def tcp(self) -> tuple[str, int]:
        host, port = self.listening.tcp.rsplit(":", 1)
        return host, int(port)

    @property
    def ws(self) -> tuple[str, int]:
        host, port = self.listening.ws.rsplit(":", 1)
        return host, int(port)

    @property
    def http(self) -> str:
        return f"http://{self.listening.http}"


@asynccontextmanager
async def running_node(config: Config) -> AsyncIterator[RunningNode]:
    node = Node(config, "n1")
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(node.run)
        try:
            yield RunningNode(node, listening)
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with running_node(single_node_config(tmp_path / "n1")) as running:
        yield running


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll a condition until it holds; fails the test after `timeout_s`."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - state owned by other threads and tasks
            await trio.sleep(0.01)


# -- HTTP without a client dependency ---------------------------------------------------------------------
async def http_json(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """A minimal HTTP/1.1 request over a trio socket (one request per connection)."""
    import json

    host, port = base.removeprefix("http://").rsplit(":", 1)
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if data:
        head.append("Content-Type: application/json")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    response = b"".join(chunks)
    header, _, payload = response.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None


# -- a node as a real process -----------------------------------------------------------------------------
def write_single_node_toml(path: Path, data_dir: Path) -> dict[str, int]:
    distinct: set[int] = set()
    while len(distinct) < 4:
        distinct.add(free_port())
    ports = dict(zip(("raft", "tcp", "ws", "http"), sorted(distinct), strict=True))
    path.write_text(
        f"""
[cluster]
name = "test"
initial_members = ["n1"]

[nodes.n1]
numeric_id = 1
raft = "127.0.0.1:{ports["raft"]}"
tcp = "127.0.0.1:{ports["tcp"]}"
ws = "127.0.0.1:{ports["ws"]}"
http = "127.0.0.1:{ports["http"]}"
data_dir = "{data_dir}"
"""
    )
    return ports


class NodeProcess:
    """`imnode node start` as a child process; waits (bounded) for its 'listening' line."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed when the child is reaped
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.tools.cli", "node", "start", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "imnode node n1:" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited early:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"node did not start in {timeout_s}s:\n{self.log_path.read_text()}")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_log()
        # A new start waits for a new "listening" line.
        self.log_path.write_text("")

    def terminate(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self._close_log()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_log()


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[tuple[NodeProcess, dict[str, int]]]:
    config_path = tmp_path / "node.toml"
    ports = write_single_node_toml(config_path, tmp_path / "data")
    proc = NodeProcess(config_path, tmp_path / "node.log")
    try:
        yield proc, ports
    finally:
        proc.stop()
