"""The cluster and admin commands as an operator runs them: real `imnode` processes on 127.0.0.1.

`cluster up` a second time, a member brought back with `cluster start`, `admin status` exit codes, and what
node.log says. Every wait is bounded; ports are chosen at run time.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.config import load
from node.tools import cli
from node.tools import operator as op
from tests.cluster_harness import Cluster, write_cluster_toml
from tests.conftest import REPO, free_port, write_single_node_toml

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # PySyncObj's journal in child processes


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.1)


class ClusterUp:
    """`imnode cluster up` as a child process; its output lines collected by a thread, so a wait for a
    line is bounded even when the command prints nothing."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.tools.cli", "cluster", "up", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout_s: float = 60.0) -> str:
        """The first line holding `text`."""

        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._eof, timeout=timeout_s)
            line = found()
        if line is None:
            raise AssertionError(f"no line with {text!r} within {timeout_s}s:\n{self.output()}")
        return line

    def pids(self) -> dict[str, int]:
        return {m[1]: int(m[2]) for m in re.finditer(r"started (n\d+) \(pid (\d+)\)", self.output())}

    def leader(self) -> str:
        match = re.search(r"is up: leader (n\d+)", self.wait_for("is up"))
        assert match is not None
        return match[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM, not kill: `cluster up` stops its nodes; a bare kill would orphan them.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        Cluster(self.config).stop_all()  # anything left: by the pid files in the data dirs


def imnode(config: Path, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.tools.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
    )


def admin_status(config: Path) -> tuple[int, dict[str, object], str]:
    """(exit code, the --json report, the table)."""
    report = imnode(config, "admin", "status", "--json")
    table = imnode(config, "admin", "status")
    assert report.returncode == table.returncode, report.stderr + table.stderr
    return report.returncode, json.loads(report.stdout), table.stdout


@pytest.fixture
def up(tmp_path: Path) -> Iterator[ClusterUp]:
    running = ClusterUp(write_cluster_toml(tmp_path / "cluster.toml"))
    try:
        yield running
    finally:
        running.stop()


def test_cluster_up_a_second_time_names_the_port_starts_nothing_and_reports_nothing(tmp_path: Path) -> None:
    first = Cluster(write_cluster_toml(tmp_path / "cluster.toml"))
    try:
        first.start_all()
        again = imnode(first.config_path, "cluster", "up", timeout_s=60)
        assert again.returncode == cli.EXIT_FAILED, again.stdout + again.stderr
        n1 = first.config.node("n1")
        assert f"node n1: cannot listen on {n1.raft} (raft)" in again.stderr, again.stderr
        assert "started" not in again.stdout and "is up" not in again.stdout, again.stdout
        # The running cluster is untouched, and it answers as the processes the harness started: what
        # `cluster up` checks before it reports a leader as its own.
        status = op.cluster_status(first.config)
        pids = {node_id: proc.pid for node_id, proc in first.procs.items()}
        assert status["leader"] in op.started_by(status, pids) == {"n1", "n2", "n3"}
        others = {node_id: pid + 1_000_000 for node_id, pid in pids.items()}
        assert op.started_by(status, others) == set()
    finally:
        first.stop_all()


def test_a_dead_member_comes_back_with_cluster_start_and_admin_status_exit_codes_say_so(
    up: ClusterUp,
) -> None:
    config = up.config
    leader = up.leader()
    code, report, table = admin_status(config)
    assert code == 0 and "healthy: 3 members up" in table, table
    n4 = next(n for n in report["nodes"] if n["id"] == "n4")  # type: ignore[attr-defined]
    assert n4["role"] == "not a member" and n4["member"] is False
    assert re.search(r"^n4 +not a member$", table, re.MULTILINE), table

    lost = next(n for n in ("n3", "n2") if n != leader)
    os.kill(up.pids()[lost], signal.SIGKILL)
    assert "cluster start" in up.wait_for(f"{lost} exited", timeout_s=15)
    code, report, table = admin_status(config)
    assert code == cli.EXIT_MEMBER_DOWN and report["down"] == [lost], table
    assert f"members down: {lost}" in table

    outsider = imnode(config, "cluster", "start", "--node", "n4")
    assert outsider.returncode == cli.EXIT_FAILED and "n4 is not a member" in outsider.stderr
    assert "cluster join" in outsider.stderr

    back = imnode(config, "cluster", "start", "--node", lost)
    assert back.returncode == 0 and f"{lost} is back and caught up" in back.stdout, back.stdout + back.stderr
    # The progress names its numbers (issue 21: "applied 0 of 11" said neither what nor of what).
    progress = re.search(
        rf"{lost}: catching up: applied Raft index \d+; goal (\d+|not known yet) "
        r"\(the leader's commit index\)",
        back.stdout,
    )
    assert progress is not None, back.stdout
    restarted = op.pid_from_file(Cluster(config).config, lost)
    assert restarted is not None and op.pid_alive(restarted)
    up.wait_for(f"{lost} is running again (pid {restarted})", timeout_s=15)
    code, _report, table = admin_status(config)
    assert code == 0, table
    twice = imnode(config, "cluster", "start", "--node", lost)
    assert twice.returncode == cli.EXIT_FAILED and "cannot listen" in twice.stderr, twice.stderr

    # Stopping the cluster stops the member `cluster start` brought back too.
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=60) == 0, up.output()
    up.wait_for("cluster stopped", timeout_s=10)
    assert "started again by `cluster start`) stopped" in up.output()
    assert not op.pid_alive(restarted)


def test_cluster_up_exits_nonzero_once_every_member_has_died_and_nodes_log_the_new_leader(
    up: ClusterUp,
) -> None:
    config = Cluster(up.config).config
    old = up.leader()
    pids = up.pids()
    os.kill(pids[old], signal.SIGKILL)
    new: list[str] = []

    def moved() -> bool:
        leader = op.cluster_status(config)["leader"]
        new[:] = [leader] if leader not in (None, old) else []
        return bool(new)

    wait_until(moved, 30, "a new leader")
    survivors = [n for n in ("n1", "n2", "n3") if n != old]

    def logged(node_id: str) -> bool:
        text = (Path(config.node(node_id).data_dir) / op.LOG_FILE).read_text(errors="replace")
        return any(f"[{node_id}]" in line and f"leader is now {new[0]}" in line for line in text.splitlines())

    wait_until(lambda: all(logged(n) for n in survivors), 15, f"the survivors log leader {new}")

    code, _report, table = admin_status(up.config)
    assert code == cli.EXIT_MEMBER_DOWN, table
    for node_id in survivors:
        os.kill(pids[node_id], signal.SIGKILL)
    assert up.proc.wait(timeout=15) == cli.EXIT_FAILED, up.output()
    up.wait_for("every node of the cluster has exited", timeout_s=10)
    code, _report, table = admin_status(up.config)
    assert code == cli.EXIT_NO_LEADER and "no leader" in table, table


def test_node_log_names_the_node_on_every_line_with_requests_leader_and_webhook_failures(
    tmp_path: Path,
) -> None:
    config = tmp_path / "node.toml"
    ports = write_single_node_toml(config, tmp_path / "data")
    nobody = free_port()  # the webhook receiver that is not there
    with config.open("a") as f:
        f.write(
            f'\n[webhook]\nurl = "http://127.0.0.1:{nobody}/hook"\nevents = ["msg.notify"]\n'
            "attempts = 3\nbackoff_initial_s = 0.1\n"
        )
    log_path = tmp_path / "node.log"
    with log_path.open("ab") as log:
        # --log-level after the subcommand: global options are accepted anywhere.
        command = [sys.executable, "-m", "node.tools.cli", "node", "start", "--config", str(config)]
        node = subprocess.Popen(
            [*command, "--log-level", "debug"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:

        def text() -> str:
            return log_path.read_text(errors="replace")

        wait_until(lambda: "imnode node n1:" in text() or node.poll() is not None, 30, "the node listens")
        assert node.poll() is None, text()
        console = f"imnode n1: console http://127.0.0.1:{ports['http']}/console/ (no token needed"
        wait_until(lambda: console in text(), 10, "the console's address")
        body = {"from_uid": "alice", "channel_id": "bob", "channel_type": 1}
        body["payload"] = base64.b64encode(b"hi").decode()
        send = urllib.request.Request(
            f"http://127.0.0.1:{ports['http']}/message/send",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},  # urllib would say form-urlencoded: a 415
        )
        with urllib.request.urlopen(send, timeout=10) as answer:
            assert answer.status == 200
        wait_until(lambda: "webhook notify: attempt 1 failed" in text(), 20, "a webhook failure line")
        wait_until(lambda: "POST /message/send -> 200" in text(), 10, "a request line")
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=20) == 0, text()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=10)
    lines = [line for line in text().splitlines() if line.strip()]
    assert "members: n1" in text() and "leader is now n1 (this node" in text(), text()
    unnamed = [
        line
        for line in lines
        if "[n1]" not in line and not line.startswith(("imnode n1:", "imnode node n1:"))
    ]
    assert not unnamed, "\n".join(unnamed)


def test_cluster_up_on_the_example_makes_one_private_secret_that_every_node_uses(tmp_path: Path) -> None:
    """The example as shipped, with only its ports moved to free ones: no secret in it, none needed."""
    text = (REPO / "cluster.example.toml").read_text()
    ports = sorted({int(p) for p in re.findall(r'"127\.0\.0\.1:(\d+)"', text)})
    fresh: set[int] = set()
    while len(fresh) < len(ports):
        fresh.add(free_port())
    for old, new in zip(ports, sorted(fresh), strict=True):
        text = text.replace(f'127.0.0.1:{old}"', f'127.0.0.1:{new}"')
    config = tmp_path / "cluster.example.toml"
    config.write_text(text)
    secret = tmp_path / "cluster.example.secret"
    running = ClusterUp(config)
    try:
        assert "created the cluster secret" in running.wait_for("created the cluster secret")
        running.leader()
        # Where the console is, for each node, and that the example needs no token for it.
        running.wait_for("is up: leader")
        shown = running.output()
        for node_id in ("n1", "n2", "n3"):
            http = load(str(config)).node(node_id).http
            assert f"console http://{http}/console/ (no token needed: no manager_token set)" in shown, shown
        assert secret.stat().st_mode & 0o777 == 0o600
        assert len(secret.read_text().strip()) >= 32
        code, _, table = admin_status(config)
        assert code == 0, table
    finally:
        running.stop()
    before = secret.read_text()
    again = ClusterUp(config)  # the same file is used again, never replaced
    try:
        again.leader()
        assert "created the cluster secret" not in again.output()
    finally:
        again.stop()
    assert secret.read_text() == before
    os.chmod(secret, 0o644)
    refused = imnode(config, "cluster", "up", timeout_s=60)
    assert refused.returncode == cli.EXIT_CONFIG and "readable by others" in refused.stderr


def test_cluster_remove_of_the_leader_tries_another_follower_when_the_first_does_not_take_over(
    tmp_path: Path,
) -> None:
    # Issue 19 item 10: one transfer request, then 15 s of waiting, failed one try in three on a busy
    # machine. A follower that never calls its election (stopped here; on a busy machine, slow) must cost
    # one attempt, not the removal.
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml", nodes=4, initial=4))
    stopped: str | None = None
    try:
        leader = cluster.start_all()
        for node_id in cluster.config.nodes:
            cluster.wait_caught_up(node_id)
        stopped = sorted(n for n in cluster.config.nodes if n != leader)[0]
        cluster.procs[stopped].send_signal(signal.SIGSTOP)
        removed = cluster.cli("cluster", "remove", "--node", leader, "--to", stopped)
        output = removed.stdout + removed.stderr
        assert removed.returncode == 0, output
        assert f"transfer to {stopped}: " in output and "trying again" in output, output
        new_leader = re.search(r"new leader: (n\d)", output)
        assert new_leader is not None and new_leader[1] not in (leader, stopped), output
        status = op.node_status(cluster.config, new_leader[1])
        assert status is not None and leader not in status["members"] and len(status["members"]) == 3
    finally:
        if stopped is not None:
            cluster.procs[stopped].send_signal(signal.SIGCONT)
        cluster.stop_all()


def test_hand_over_leadership_says_what_it_waited_for_when_nobody_takes_over(tmp_path: Path) -> None:
    cluster = Cluster(write_cluster_toml(tmp_path / "cluster.toml", nodes=2, initial=2))
    stopped: str | None = None
    try:
        leader = cluster.start_all()
        stopped = next(n for n in cluster.config.nodes if n != leader)
        cluster.wait_caught_up(stopped)
        cluster.procs[stopped].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(op.OperatorError) as failed:
            op.hand_over_leadership(cluster.config, leader, attempt_s=1.0, timeout_s=3.0)
        assert time.monotonic() - started < 3.0 + 2 * op.STATUS_TIMEOUT_S + 1.0  # bounded
        message = str(failed.value)
        assert message.startswith(f"leadership did not move from {leader} within 3s: waited for another")
        assert f"to {stopped}: " in message, message
    finally:
        if stopped is not None:
            cluster.procs[stopped].send_signal(signal.SIGCONT)
        cluster.stop_all()
