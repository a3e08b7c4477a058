"""What the operator commands do: run a cluster's processes, change membership, report and verify.

These commands talk to nodes only through their authenticated admin HTTP endpoints (the manager token from
the config in the `token` header), so they work the same against nodes started by `cluster up`, by hand,
or on other machines. Every wait is bounded and reports progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from node import datadir, tls
from node.config import Config

STATUS_TIMEOUT_S = 2.0
# Handing leadership over (`cluster remove` of the leader): each attempt asks the leader to hand over to one
# follower, then waits this long for another member to lead; all attempts together, at most the total.
TRANSFER_ATTEMPT_S = 5.0
TRANSFER_TOTAL_S = 30.0
POLL_S = 0.2
PID_FILE = "node.pid"
LOG_FILE = "node.log"
NOT_A_MEMBER = "not a member"


class OperatorError(Exception):
    """A command cannot go on; the message says why and what to do."""


def request(
    config: Config, node_id: str, method: str, path: str, body: Any = None, timeout_s: float = 5.0
) -> Any:
    """One admin call to a node; OperatorError with the node's own message on a refusal."""
    spec = config.node(node_id)
    data = None if body is None else json.dumps(body).encode()
    scheme, context = "http", None
    if config.tls.http:
        scheme, context = "https", tls.client_context(config.source, "tls.ca_file", config.tls.ca_file)
    req = urllib.request.Request(f"{scheme}://{spec.http}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if config.manager_token:
        req.add_header("token", config.manager_token)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("msg", "")
        except ValueError:
            message = ""
        raise OperatorError(f"{node_id}: {message or exc.reason} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise OperatorError(f"{node_id} is not reachable at {scheme}://{spec.http}: {exc}") from None


def node_status(config: Config, node_id: str) -> dict[str, Any] | None:
    """The node's admin status, or None if it does not answer."""
    try:
        answer = request(config, node_id, "GET", "/admin/status", timeout_s=STATUS_TIMEOUT_S)
    except OperatorError:
        return None
    return answer if isinstance(answer, dict) else None


def cluster_status(config: Config) -> dict[str, Any]:
    """Every configured node's status and the leader, each node marked a member or not.

    Roles: a member that does not answer is `down`; a configured node that is not a member and does not
    answer is `not a member` (a node ready to join is not missing). Members are the leader's list, else
    any answering node's (the highest term's), else the config's initial members (`members_known` false).
    """
    nodes: list[dict[str, Any]] = []
    answers: dict[str, dict[str, Any]] = {}
    for node_id in config.nodes:
        status = node_status(config, node_id)
        if status is None:
            nodes.append(
                {"id": node_id, "role": "down", "term": None, "commit_index": None, "applied_index": None}
            )
            continue
        nodes.append(status)
        answers[node_id] = status
    leaders = [n for n, s in answers.items() if s.get("role") == "leader"]
    # Two nodes can call themselves leader for a moment (an old one not yet stepped down): take the
    # one of the highest term.
    leader = max(leaders, key=lambda n: answers[n]["term"] or 0) if leaders else None
    source = leader or max(answers, key=lambda n: answers[n].get("term") or 0, default=None)
    members_known = source is not None
    member_ids = list(answers[source]["members"]) if source is not None else list(config.initial_members)
    for node in nodes:
        node["member"] = node["id"] in member_ids
        if not node["member"] and node["role"] == "down":
            node["role"] = NOT_A_MEMBER
    down = [n["id"] for n in nodes if n["member"] and n["role"] == "down"]
    return {
        "leader": leader,
        "members": member_ids,
        "members_known": members_known,
        "down": down,
        "nodes": nodes,
    }


def started_by(status: dict[str, Any], pids: dict[str, int]) -> set[str]:
    """The node ids whose answering process is the one we started (its reported pid is our child's).

    A node id answering from another process (a cluster started earlier, on the same ports) is not ours,
    so `cluster up` never reports a cluster it did not start.
    """
    return {n["id"] for n in status["nodes"] if n.get("pid") is not None and pids.get(n["id"]) == n["pid"]}


def wait_for_leader(config: Config, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster_status(config)
        if status["leader"] is not None:
            return status
        time.sleep(0.2)
    raise OperatorError(f"no leader within {timeout_s:.0f}s; see the nodes' log files")


def members(config: Config) -> tuple[str, list[str]]:
    """(leader, current members) as the leader reports them."""
    status = cluster_status(config)
    leader = status["leader"]
    if leader is None:
        raise OperatorError("no leader is reachable: is the cluster up?")
    for node in status["nodes"]:
        if node["id"] == leader:
            return leader, list(node["members"])
    raise OperatorError("the leader's status is missing")


def hand_over_leadership(
    config: Config,
    leader: str,
    *,
    prefer: str | None = None,
    attempt_s: float = TRANSFER_ATTEMPT_S,
    timeout_s: float = TRANSFER_TOTAL_S,
) -> str:
    """Ask `leader` to hand over until another member leads; that member's id.

    One transfer request gives no guarantee (PySyncObj's Raft TimeoutNow): the leader refuses a target that
    is not fully caught up, which a busy leader's followers often are not for a moment, and a target that
    is slow or gone may never call its election. So each attempt names one follower (`prefer` first, then
    those the leader sees connected, by name, in turn) and waits up to `attempt_s` for a new leader; a
    refusal is tried again after a short pause. The error says what was tried and what it waited for.
    """
    deadline = time.monotonic() + timeout_s
    tried: list[str] = []
    turn = 0
    while time.monotonic() < deadline:
        status = node_status(config, leader)
        if status is None or status.get("role") != "leader":
            moved = _new_leader(config, leader, status)
            if moved is not None:
                return moved
            time.sleep(POLL_S)  # stepping down, or an election under way: look again
            continue
        followers = sorted(
            (m for m in status["members"] if m != leader),
            key=lambda m: (not status["connected"].get(m, False), m != prefer, m),
        )
        if not followers:
            raise OperatorError(f"{leader} is the only member: there is nobody to hand leadership to")
        target = followers[turn % len(followers)]
        turn += 1
        try:
            request(config, leader, "POST", "/admin/transfer", {"node": target}, timeout_s=STATUS_TIMEOUT_S)
        except OperatorError as exc:
            refusal = f"to {target}: refused ({exc})"
            if refusal not in tried:  # a busy leader refuses many in a row: say each reason once
                say(f"transfer {refusal}; trying again")
            tried.append(refusal)
            time.sleep(POLL_S)
            continue
        moved = _wait_new_leader(config, leader, min(attempt_s, max(0.0, deadline - time.monotonic())))
        if moved is not None:
            return moved
        tried.append(f"to {target}: no other leader within {attempt_s:.0f}s")
        say(f"transfer {tried[-1]}; trying again")
    shown = "; ".join(tried[-4:]) + (f" (and {len(tried) - 4} earlier)" if len(tried) > 4 else "")
    raise OperatorError(
        f"leadership did not move from {leader} within {timeout_s:.0f}s: waited for another member to be "
        f"elected after each of {len(tried)} transfer requests ({shown or 'none was made'})"
    )


def _new_leader(config: Config, old: str, status: dict[str, Any] | None) -> str | None:
    """The leader other than `old`, as `old` reports it, or as the cluster does when `old` does not answer."""
    found = status.get("leader") if status is not None else cluster_status(config)["leader"]
    return None if found in (None, old) else str(found)


def _wait_new_leader(config: Config, old: str, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = node_status(config, old)
        if status is None or status.get("role") != "leader":
            moved = _new_leader(config, old, status)
            if moved is not None:
                return moved
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


# -- processes -------------------------------------------------------------------------------------------
@dataclass
class NodeProcess:
    node_id: str
    proc: subprocess.Popen[bytes]
    log_path: str


def spawn(
    config_path: str,
    config: Config,
    node_id: str,
    *,
    detach: bool = False,
    partners: list[str] | None = None,
    log_level: str | None = None,
) -> NodeProcess:
    """Start `imnode node start` for one node, logging to <data_dir>/node.log; writes a pid file."""
    spec = config.node(node_id)
    # The node would stop on a bad certificate with this same error, in its log: say it here instead.
    tls.server_context(config)
    log_path = os.path.join(spec.data_dir, LOG_FILE)
    command = [
        sys.executable,
        "-m",
        "node.tools.cli",
        "node",
        "start",
        "--config",
        config_path,
        "--node",
        node_id,
    ]
    if partners is not None:
        command += ["--partners", ",".join(partners)]
    if log_level is not None:
        command += ["--log-level", log_level]
    # The data dir, its log and pid file are private like what the node creates in it (node/datadir.py),
    # whatever umask this command runs with. The node starts with its own umask.
    umask = os.umask(datadir.PRIVATE_UMASK)
    try:
        os.makedirs(spec.data_dir, mode=datadir.DIR_MODE, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,  # a joined node outlives the `cluster join` command
            )
        with open(os.path.join(spec.data_dir, PID_FILE), "w") as pid_file:
            pid_file.write(str(proc.pid))
    finally:
        os.umask(umask)
    return NodeProcess(node_id, proc, log_path)


def pid_from_file(config: Config, node_id: str) -> int | None:
    """The pid in the node's pid file (the last process `cluster up/start/join` started for it)."""
    try:
        with open(os.path.join(config.node(node_id).data_dir, PID_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """A process with this pid exists (zombies of our own children are reaped first)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_by_pid_file(config: Config, node_id: str, timeout_s: float = 15.0) -> bool:
    """SIGTERM the node whose pid file is in its data dir; True if a process was stopped."""
    path = os.path.join(config.node(node_id).data_dir, PID_FILE)
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        os.remove(path)
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.remove(path)
    return True


def say(text: str) -> None:
    print(text, flush=True)
