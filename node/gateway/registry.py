"""Who is connected to this node: connections by id, by uid and by peer address (the trio thread owns it)."""

from __future__ import annotations

from collections.abc import Iterator

from node.gateway.connection import Connection


class Registry:
    def __init__(self) -> None:
        self.by_id: dict[int, Connection] = {}
        self.by_uid: dict[str, list[Connection]] = {}
        self.by_address: dict[str, int] = {}  # connections (logged in or not) per peer host
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, conn: Connection) -> None:
        self.by_id[conn.id] = conn
        host = peer_host(conn.remote)
        self.by_address[host] = self.by_address.get(host, 0) + 1

    def bind(self, conn: Connection) -> None:
        """Index an authenticated connection under its uid."""
        self.by_uid.setdefault(conn.uid, []).append(conn)

    def remove(self, conn: Connection) -> None:
        if self.by_id.pop(conn.id, None) is not None:  # removed twice (a kick, then its close): counted once
            host = peer_host(conn.remote)
            left = self.by_address[host] - 1
            if left:
                self.by_address[host] = left
            else:
                del self.by_address[host]
        conns = self.by_uid.get(conn.uid)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.by_uid[conn.uid]

    def of_address(self, host: str) -> int:
        return self.by_address.get(host, 0)

    def of_uid(self, uid: str) -> list[Connection]:
        return self.by_uid.get(uid, [])

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    def online_users(self) -> int:
        return len(self.by_uid)


def peer_host(remote: str) -> str:
    """The host of a "host:port" peer address (IPv6 hosts contain colons: the port is after the last)."""
    return remote.rpartition(":")[0]
