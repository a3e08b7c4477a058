"""What `imnode admin verify` compares across members: per-channel digests and one of all other state.

Read from the local store, so two members that applied the same log answer the same digests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

from storage.keys import split_channel_key
from storage.store import DB_NAMES, Store


def digests(store: Store, node_id: str) -> dict[str, Any]:
    """Per-channel (count, last seq, hash of the messages) and one hash of all other replicated state."""
    channels: dict[str, dict[str, Any]] = {}
    state = hashlib.blake2b(digest_size=16)
    with store.read() as txn:
        applied = txn.applied_index()
        for name in sorted(DB_NAMES):
            if name == "meta":
                continue
            if name == "messages":
                for key, value in txn.raw_items(name):
                    channel_id, channel_type, used = split_channel_key(key)
                    entry = channels.setdefault(
                        f"{channel_type}:{channel_id}",
                        {"count": 0, "last_seq": 0, "hash": hashlib.blake2b(digest_size=16)},
                    )
                    entry["count"] += 1
                    entry["last_seq"] = int.from_bytes(key[used : used + 8], "big")
                    entry["hash"].update(key)
                    entry["hash"].update(value)
                continue
            state.update(name.encode())
            for key, value in txn.raw_items(name):
                state.update(len(key).to_bytes(2, "big") + key)
                state.update(len(value).to_bytes(4, "big") + value)
        system_uids = cbor2.dumps(txn.meta("system_uids"))
    state.update(system_uids)
    return {
        "id": node_id,
        "applied_index": applied,
        "state": state.hexdigest(),
        "channels": {
            name: {"count": e["count"], "last_seq": e["last_seq"], "hash": e["hash"].hexdigest()}
            for name, e in sorted(channels.items())
        },
    }
