"""WuKongIM's JSON shape of a stored message: what the HTTP API answers and the webhooks post.

It sits beside config.py and metrics.py, below both users (api/ answers with it, cluster/webhooks.py posts
it), so neither imports the other for it.
"""

from __future__ import annotations

import base64
from typing import Any

from raft.commands import CHANNEL_PERSON, HF_NO_PERSIST, HF_RED_DOT, HF_SYNC_ONCE, SYSTEM_UID, person_peer


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    """A stored message as WuKongIM shows it (a person channel under the id its sender sees: the receiver)."""
    channel_id = row["cid"]
    if row["ct"] == CHANNEL_PERSON:
        channel_id = person_peer(channel_id, row["from"])
    flags = int(row.get("hf", 0))
    shown = {
        "header": {
            "no_persist": int(bool(flags & HF_NO_PERSIST)),
            "red_dot": int(bool(flags & HF_RED_DOT)),
            "sync_once": int(bool(flags & HF_SYNC_ONCE)),
        },
        "setting": row["setting"],
        "message_id": row["mid"],
        "message_idstr": str(row["mid"]),
        "client_msg_no": row["cmn"],
        "message_seq": row["seq"],
        "from_uid": "" if row["from"] == SYSTEM_UID else row["from"],
        "channel_id": channel_id,
        "channel_type": row["ct"],
        "expire": int(row.get("exp", 0)),
        "timestamp": row["ts"],
        "payload": base64.b64encode(row["payload"]).decode(),
    }
    if row.get("tp"):
        shown["topic"] = row["tp"]  # omitted when empty, as WuKongIM's `omitempty`
    return shown
