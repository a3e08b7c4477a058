"""A TCP proxy in front of every node's Raft port, so a test can cut the network between nodes.

Each node's Raft identity (`raft` in the config) is a front port of this proxy; the node binds its real
port (`raft_bind`). Every Raft connection of the cluster therefore passes through here, whichever node
dials it (PySyncObj has the node with the larger address dial the other).

Which node dialled is read from the kernel, not from the stream (the stream is encrypted with the
cluster password): the accepted connection's peer port is looked up in /proc/net/tcp, and its socket
inode in the file descriptors of the node processes. Linux only, like the rest of the harness.

A cut link behaves like a network that drops packets: nothing is refused or reset, bytes simply stop
flowing both ways (the proxy stops reading, so TCP flow control backs up into the sender), and PySyncObj
notices only through its own timeouts. Healing lets the held bytes through in order, as a network that
comes back would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 64 * 1024


@dataclass
class _Link:
    source: str | None  # the node that dialled, None for anything else (a CLI, a test)
    target: str
    downstream: socket.socket  # accepted from the dialler
    upstream: socket.socket  # to the target's real port


class RaftLinks:
    def __init__(self, fronts: dict[str, tuple[int, int]], pids: Callable[[], dict[str, int]]) -> None:
        """`fronts`: node -> (front port, real port) on 127.0.0.1; `pids`: node -> pid, asked per accept."""
        self.fronts = fronts
        self.pids = pids
        self._cut: set[frozenset[str]] = set()
        self._changed = threading.Condition()
        self._listeners: list[socket.socket] = []
        self._links: list[_Link] = []
        self._closed = False
        self.unidentified = 0  # Raft connections whose dialler was not found: a test can assert on it
        self.errors: list[str] = []  # failures while accepting (each closed that one connection)

    # -- control -----------------------------------------------------------------------------------------
    def start(self) -> None:
        for target, (front, real) in self.fronts.items():
            listener = socket.create_server(("127.0.0.1", front))
            self._listeners.append(listener)
            threading.Thread(
                target=self._accept_loop, args=(listener, target, front, real), daemon=True
            ).start()

    def cut(self, side: set[str]) -> None:
        """Drop every packet between `side` and the other nodes (both directions) until heal()."""
        with self._changed:
            self._cut |= {frozenset((a, b)) for a in side for b in self.fronts if b not in side}

    def heal(self) -> None:
        with self._changed:
            self._cut.clear()
            self._changed.notify_all()

    def is_cut(self, a: str | None, b: str) -> bool:
        return a is not None and frozenset((a, b)) in self._cut

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for listener in self._listeners:
            listener.close()
        for link in list(self._links):
            self._drop(link)

    # -- the proxy ---------------------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket, target: str, front: int, real: int) -> None:
        while not self._closed:
            try:
                downstream, (_host, peer_port) = listener.accept()
            except OSError:
                return  # closed
            try:
                self._connect(downstream, peer_port, target, front, real)
            except Exception as exc:  # one bad connection must not stop this front for good
                self.errors.append(repr(exc))
                downstream.close()

    def _connect(self, downstream: socket.socket, peer_port: int, target: str, front: int, real: int) -> None:
        source = self._dialler(peer_port, front)
        for _ in range(50):  # a node that has just started may not be in the pid map yet
            if source is not None:
                break
            time.sleep(0.01)
            source = self._dialler(peer_port, front)
        if source is None:
            self.unidentified += 1
        try:
            upstream = socket.create_connection(("127.0.0.1", real), timeout=5)
        except OSError:
            downstream.close()  # the target is down: the dialler sees what it would have seen
            return
        upstream.settimeout(None)
        link = _Link(source, target, downstream, upstream)
        self._links.append(link)
        for src, dst in ((downstream, upstream), (upstream, downstream)):
            threading.Thread(target=self._pump, args=(link, src, dst), daemon=True).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._wait_open(link)
                data = src.recv(CHUNK)
                if not data:
                    break
                self._wait_open(link)  # a cut while this chunk was read holds it back too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(link)

    def _wait_open(self, link: _Link) -> None:
        with self._changed:
            while self.is_cut(link.source, link.target) and not self._closed:
                self._changed.wait()
        if self._closed:
            raise OSError("proxy closed")

    def _drop(self, link: _Link) -> None:
        for sock in (link.downstream, link.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(ValueError):
            self._links.remove(link)

    def _dialler(self, peer_port: int, front: int) -> str | None:
        """The node whose process owns the socket 127.0.0.1:peer_port -> 127.0.0.1:front."""
        inode = _socket_inode(peer_port, front)
        if inode is None:
            return None
        wanted = f"socket:[{inode}]"
        for node, pid in self.pids().items():
            fd_dir = f"/proc/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue  # exited
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(os.path.join(fd_dir, fd)) == wanted:
                        return node
        return None


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    with open("/proc/net/tcp") as table:
        next(table)  # header
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                return fields[9]
    return None
