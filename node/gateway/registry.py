"""Who is connected to this node: connections by id and by uid (the trio thread owns it)."""

from __future__ import annotations

from collections.abc import Iterator

from node.gateway.connection import Connection


class Registry:
    def __init__(self) -> None:
        self.by_id: dict[int, Connection] = {}
        self.by_uid: dict[str, list[Connection]] = {}
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add(self, conn: Connection) -> None:
        self.by_id[conn.id] = conn

    def bind(self, conn: Connection) -> None:
        """Index an authenticated connection under its uid."""
        self.by_uid.setdefault(conn.uid, []).append(conn)

    def remove(self, conn: Connection) -> None:
        self.by_id.pop(conn.id, None)
        conns = self.by_uid.get(conn.uid)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.by_uid[conn.uid]

    def of_uid(self, uid: str) -> list[Connection]:
        return self.by_uid.get(uid, [])

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    def online_users(self) -> int:
        return len(self.by_uid)
