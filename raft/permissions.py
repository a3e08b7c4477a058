"""Who may send to a channel: one deterministic function used before proposing and again inside apply.

The pre-propose check runs on a node that may lag the leader, so it is only a fast path; the check inside
apply decides, against the replicated state, identically on every node.
"""

from __future__ import annotations

from typing import Any, Protocol

from raft import commands as c
from storage.keys import channel_key
from storage.store import Txn


class PermissionView(Protocol):
    """What the check reads: a plain transaction (pre-propose) or apply's per-entry cached view."""

    def channel(self, chan: bytes) -> dict[str, Any] | None: ...
    def meta(self, name: str) -> Any: ...
    def is_member(self, db: str, chan: bytes, uid: str) -> bool: ...
    def has_members(self, db: str, chan: bytes) -> bool: ...


def send_permission(
    txn: PermissionView | Txn,
    channel_id: str,
    channel_type: int,
    sender: str,
    receiver: str,
    *,
    api: bool = False,
) -> int:
    """The reason code for `sender` sending to the channel (R_SUCCESS when allowed).

    For a person or agent channel `channel_id` is the stored (fake) id and `receiver` the other party.
    `api`: a business-server send (HTTP /message/send), which WuKongIM checks at channel level only (ban,
    disband).
    """
    if channel_type not in c.SUPPORTED_CHANNEL_TYPES:
        return c.R_NOT_SUPPORT_CHANNEL_TYPE
    system_uids = txn.meta("system_uids") or []
    if sender in system_uids:
        return c.R_SUCCESS
    if channel_type == c.CHANNEL_PERSON:
        if not receiver or channel_id != c.person_channel_id(sender, receiver):
            return c.R_CHANNEL_ID_ERROR
        # A person channel honours the receiver's own lists, kept on the channel named after the receiver.
        receiver_chan = channel_key(receiver, c.CHANNEL_PERSON)
        person = txn.channel(channel_key(channel_id, channel_type)) or {}
        if person.get("ban"):
            return c.R_BAN
        if api:
            return c.R_SUCCESS
        if txn.is_member("blacklist", receiver_chan, sender):
            return c.R_IN_BLACKLIST
        # A stranger (outside the receiver's whitelist) may still write if the receiver allows strangers
        # (`allow_stranger` on its person channel, WuKongIM's channel flag).
        if (
            txn.has_members("whitelist", receiver_chan)
            and not txn.is_member("whitelist", receiver_chan, sender)
            and not (txn.channel(receiver_chan) or {}).get("allow_stranger")
        ):
            return c.R_NOT_IN_WHITELIST
        return c.R_SUCCESS
    if channel_type == c.CHANNEL_AGENT:
        # WuKongIM (`service/permission.go`): an agent channel is public to its two parties, with no ban,
        # black- or whitelist; the stored id names them (`agent_channel_id`).
        if not receiver or channel_id != c.agent_channel_id(sender, receiver):
            return c.R_CHANNEL_ID_ERROR
        return c.R_SUCCESS
    chan = channel_key(channel_id, channel_type)
    record = txn.channel(chan)
    if record is None:
        return c.R_CHANNEL_NOT_EXIST
    if record.get("disband"):
        return c.R_DISBAND
    if record.get("ban"):
        return c.R_BAN
    if api:
        return c.R_SUCCESS
    if record.get("send_ban"):
        return c.R_SEND_BAN
    if txn.is_member("blacklist", chan, sender):
        return c.R_IN_BLACKLIST
    if not txn.is_member("subscribers", chan, sender):
        return c.R_SUBSCRIBER_NOT_EXIST
    if txn.has_members("whitelist", chan) and not txn.is_member("whitelist", chan, sender):
        return c.R_NOT_IN_WHITELIST
    return c.R_SUCCESS
