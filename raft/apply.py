"""Apply: a committed log entry in, writes inside one LMDB transaction, one result per op out.

Pure and deterministic: no clock, no randomness, no I/O besides the transaction it is given. The proposer
put message ids and timestamps into the ops, and message_seq is assigned here (channel.last_seq + 1), so
the same log gives byte-identical stores on every node.

Invariant: `apply_ops` never raises for bad input. Each op is validated (`check_op`) before it writes
anything, and a rejected op becomes a result carrying a reason code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import cbor2

from raft import cmdqueue, conversations, msgevents, outbox
from raft import commands as c
from raft.permissions import send_permission
from raft.view import EntryView, Result
from storage import keys
from storage.keys import channel_key
from storage.store import Txn

_SEQ = struct.Struct(">Q")  # the 8 bytes of a pre-encoded row's seq slot (commands.SEQ_AT)


def _error(reason: int, text: str) -> Result:
    return {"r": reason, "err": text}


def _new_channel(channel_type: int) -> dict[str, Any]:
    return {"type": channel_type, "last_seq": 0, "ban": 0, "disband": 0, "send_ban": 0, "large": 0}


def _duplicate(original: dict[str, Any]) -> Result:
    # A retry of a send that already committed: answer with the original ids, store nothing.
    return {"r": c.R_SUCCESS, "mid": original["mid"], "seq": original["seq"], "dup": True}


def _recipients(view: EntryView, op: dict[str, Any], chan: bytes) -> list[str]:
    """Who a message goes to, as the committed stream pushes it: a person or agent channel's two parties,
    a temporary channel's uid list, a group's subscribers."""
    if op["ct"] in c.PAIR_CHANNEL_TYPES:
        return [uid for uid in (op["from"], op.get("to", "")) if uid]
    if "subs" in op:
        return list(op["subs"])
    return view.txn.members("subscribers", chan)


def _record(op: dict[str, Any], seq: int) -> dict[str, Any]:
    """The stored (or, for no_persist, posted) form of a message: flags, expire, topic only when set."""
    record = {
        "mid": op["mid"],
        "seq": seq,
        "from": op["from"],
        "cid": op["cid"],
        "ct": op["ct"],
        "cmn": op["cmn"],
        "ts": op["ts"],
        "setting": op["setting"],
        "payload": op["payload"],
    }
    for name in ("hf", "exp", "tp", "subs"):
        if name in op:
            record[name] = op[name]
    return record


def _permission(view: EntryView, op: dict[str, Any], sender: str) -> int:
    """`send_permission` against the entry's view, once per (channel, sender, receiver, api) per entry."""
    key = (op["cid"], op["ct"], sender, op.get("to", ""), op.get("api", False))
    reason = view.send_permissions.get(key)
    if reason is None:
        reason = view.send_permissions[key] = send_permission(view, *key[:4], api=key[4])
    return reason


def _stored_row(op: dict[str, Any], seq: int) -> bytes | bytearray:
    """The bytes of the message row: the proposer's pre-encoded row with `seq` written into its slot, or,
    for a send op proposed as a map (earlier versions), the record encoded here as it always was."""
    row = op.get(c.ROW)
    if row is None:
        return cbor2.dumps(_record(op, seq))
    stored = bytearray(row)
    _SEQ.pack_into(stored, c.SEQ_AT, seq)
    return stored


def apply_send(view: EntryView, op: dict[str, Any]) -> Result:
    """Store one message. Results are those of "dedup, then permission, then store" in that order.

    The common path makes two LMDB calls: the dedup row is written only if its key is new (one call that
    both checks and writes), then the message row (the proposer's own bytes, seq written in). The
    permission check runs first, on the entry's cached rows and once per channel and sender per entry;
    a refused send or a key already present takes the rare path that reads the original dedup row, so a
    retry of a committed send is still answered as a duplicate even where it would now be refused. The
    channel row and the sender's conversation row are changed in the entry's cache and written once per
    entry (`EntryView.flush`).

    A no_persist message stores nothing (WuKongIM `event_persist.go`): it is committed only so that every
    node pushes it, and answered with seq 0. A command (sync_once) is stored in the channel's command
    channel and queued for each recipient (raft/cmdqueue.py), in no conversation.
    """
    txn = view.txn
    channel_type = op["ct"]
    chan = view.channel_key(op["cid"], channel_type)
    sender, client_msg_no = op["from"], op["cmn"]
    header = int(op.get("hf", 0))
    # A temporary channel is the business server's own uid list: no channel to check against.
    reason = c.R_SUCCESS if channel_type == c.CHANNEL_TEMP else _permission(view, op, sender)
    hooked = outbox.config(view) is not None
    # WuKongIM sends no msg.offline for an agent channel, to either party (`event_distribute.go`).
    offline_hook = hooked and channel_type != c.CHANNEL_AGENT and outbox.wants(view, "offline")
    if header & c.HF_NO_PERSIST:
        if reason != c.R_SUCCESS:
            return {"r": reason}
        if offline_hook:
            # Nothing stored to refer to: the event carries the message itself (`m`).
            event = {"ck": chan, "seq": 0, "to": op.get("to", ""), "i": view.index, "m": _record(op, 0)}
            outbox.append(view, "offline", event)
        return {"r": c.R_SUCCESS, "mid": op["mid"], "seq": 0}
    command = bool(header & c.HF_SYNC_ONCE)
    store_chan = view.channel_key(op["cid"] + c.CMD_SUFFIX, channel_type) if command else chan
    if reason != c.R_SUCCESS:
        original = txn.dedup(store_chan, sender, client_msg_no)
        return {"r": reason} if original is None else _duplicate(original)
    existing = view.channel(store_chan)
    seq = (int(existing["last_seq"]) if existing is not None else 0) + 1
    record = {"mid": op["mid"], "seq": seq}
    if not txn.add_dedup_at(view.dedup_key(store_chan, sender, client_msg_no), record):
        original = txn.dedup(store_chan, sender, client_msg_no)
        if original is not None:
            return _duplicate(original)
        txn.put_dedup(
            store_chan, sender, client_msg_no, record
        )  # an unreadable row is replaced, as it always was
    channel = existing or _new_channel(channel_type)
    channel["last_seq"] = seq
    channel["version"] = view.index
    txn.put_message_row(store_chan, seq, _stored_row(op, seq))
    view.put_channel(store_chan, channel)
    if command:
        system = set(view.meta("system_uids") or ()) | {c.SYSTEM_UID}
        uids = [uid for uid in _recipients(view, op, chan) if uid not in system]
        cmdqueue.push(view, uids, store_chan, seq)
    else:
        if channel_type in c.PAIR_CHANNEL_TYPES and existing is None:
            # Both parties of a person or agent channel are its subscribers, so conversation sync finds it
            # for both.
            view.add_member("subscribers", chan, sender)
            if op.get("to"):
                view.add_member("subscribers", chan, op["to"])
        conversations.on_send(view, chan, sender, seq)
    if hooked:
        if outbox.wants(view, "notify"):
            outbox.append(view, "notify", {"ck": store_chan, "seq": seq})
        if offline_hook:
            # `i`: where the message sits in the log, so the leader can tell who was online at that point.
            outbox.append(
                view, "offline", {"ck": store_chan, "seq": seq, "to": op.get("to", ""), "i": view.index}
            )
    return {"r": c.R_SUCCESS, "mid": op["mid"], "seq": seq}


def apply_token(view: EntryView, op: dict[str, Any]) -> Result:
    view.invalidate()
    txn = view.txn
    user = txn.user(op["uid"]) or {"tokens": {}, "levels": {}}
    user["tokens"][str(op["flag"])] = op["token"]
    user.setdefault("levels", {})[str(op["flag"])] = op["level"]
    txn.put_user(op["uid"], user)
    return {"r": c.R_SUCCESS}


def apply_channel(view: EntryView, op: dict[str, Any]) -> Result:
    view.invalidate()
    txn = view.txn
    chan = channel_key(op["cid"], op["ct"])
    channel = txn.channel(chan) or _new_channel(op["ct"])
    for flag in c.CHANNEL_FLAGS:
        if flag in op:
            channel[flag] = op[flag]
    txn.put_channel(chan, channel)
    if op.get("reset"):
        for uid in txn.members("subscribers", chan):
            txn.remove_member("subscribers", chan, uid)
            conversations.on_unsubscribed(view, chan, uid)
    for uid in op.get("subs", []):
        if txn.add_member("subscribers", chan, uid):
            conversations.on_subscribed(view, chan, uid, int(channel["last_seq"]))
    return {"r": c.R_SUCCESS}


def apply_members(view: EntryView, op: dict[str, Any]) -> Result:
    view.invalidate()
    txn = view.txn
    chan = channel_key(op["cid"], op["ct"])
    if op["ct"] != c.CHANNEL_PERSON and txn.channel(chan) is None:
        if op["list"] == "subscribers" and op["action"] != "remove":
            txn.put_channel(chan, _new_channel(op["ct"]))  # WuKongIM creates a channel on first subscriber
        else:
            return _error(c.R_CHANNEL_NOT_EXIST, "channel does not exist")
    subscribers = op["list"] == "subscribers"
    last_seq = int((txn.channel(chan) or {}).get("last_seq", 0))
    if op["action"] == "set":
        for uid in txn.members(op["list"], chan):
            if uid not in op["uids"]:
                txn.remove_member(op["list"], chan, uid)
                if subscribers:
                    conversations.on_unsubscribed(view, chan, uid)
    for uid in op["uids"]:
        if op["action"] == "remove":
            if txn.remove_member(op["list"], chan, uid) and subscribers:
                conversations.on_unsubscribed(view, chan, uid)
        elif txn.add_member(op["list"], chan, uid) and subscribers:
            conversations.on_subscribed(view, chan, uid, last_seq)
    return {"r": c.R_SUCCESS}


def apply_channel_delete(view: EntryView, op: dict[str, Any]) -> Result:
    view.invalidate()
    txn = view.txn
    chan = channel_key(op["cid"], op["ct"])
    if txn.channel(chan) is None:
        return _error(c.R_CHANNEL_NOT_EXIST, "channel does not exist")
    for member_list in c.MEMBER_LISTS:
        txn.clear_members(member_list, chan)
    txn.delete_messages(chan)
    # A resend of a deleted message must not be answered with ids of something no longer stored.
    txn.delete_prefix("dedup", chan)
    txn.delete_channel(chan)
    return {"r": c.R_SUCCESS}


MASTER_LEVEL = 1  # WuKongIM's DeviceLevelMaster


def _node_epochs(txn: Txn) -> dict[str, int]:
    return dict(txn.meta("node_epochs") or {})


def _left(view: EntryView, uid: str, level: Any) -> None:
    """Record that a master connection of `uid` went away at this entry: msg.offline leaves out whoever had
    a master device online at the message's place in the log, even if gone by the time the leader posts
    the event. A slave leaving is not recorded: it never kept its user out of msg.offline (WuKongIM)."""
    if level == MASTER_LEVEL:
        view.txn.put("presence_left", keys.part(uid), view.index)


def _drop_node_rows(view: EntryView, node: int) -> int:
    """Delete every presence row of `node`; returns how many."""
    txn = view.txn
    stale = [(key, row) for key, row in txn.raw_items("presence") if keys.split_presence_key(key)[1] == node]
    for key, row in stale:
        txn.delete("presence", key)
        level = (cbor2.loads(row) or {}).get("level") if row else None
        _left(view, keys.split_presence_key(key)[0], level)
    return len(stale)


def apply_presence(view: EntryView, op: dict[str, Any]) -> Result:
    """Connections coming and going on one node; changes from an older epoch of that node are stale."""
    txn = view.txn
    epochs = _node_epochs(txn)
    if op["epoch"] < epochs.get(str(op["node"]), 0):
        return {"r": c.R_SUCCESS, "stale": True}
    notify = outbox.wants(view, "online")
    for change in op["changes"]:
        key = keys.presence_key(change["uid"], op["node"], change["conn"])
        if change["online"]:
            txn.put("presence", key, {"flag": change["flag"], "level": change["level"], "epoch": op["epoch"]})
        else:
            txn.delete("presence", key)
            _left(view, change["uid"], change["level"])
        if notify:
            # WuKongIM's format: uid-deviceFlag-online-connId-deviceOnlineCount-totalOnlineCount
            rows = txn.presence_of(change["uid"])
            same_device = sum(1 for _n, _c, row in rows if row.get("flag") == change["flag"])
            online = int(change["online"])
            status = f"{change['uid']}-{change['flag']}-{online}-{change['conn']}-{same_device}-{len(rows)}"
            outbox.append(view, "online", {"status": status})
    return {"r": c.R_SUCCESS}


def apply_node_epoch(view: EntryView, op: dict[str, Any]) -> Result:
    """A node (re)started: its earlier connections are gone, whatever rows they left."""
    txn = view.txn
    epochs = _node_epochs(txn)
    if op["epoch"] <= epochs.get(str(op["node"]), 0):
        return {"r": c.R_SUCCESS, "stale": True}
    epochs[str(op["node"])] = op["epoch"]
    txn.set_meta("node_epochs", epochs)
    return {"r": c.R_SUCCESS, "cleared": _drop_node_rows(view, op["node"])}


def apply_node_down(view: EntryView, op: dict[str, Any]) -> Result:
    """The leader lost a node for a while: its connections count as offline until it comes back."""
    txn = view.txn
    if op["epoch"] != _node_epochs(txn).get(str(op["node"]), 0):
        return {"r": c.R_SUCCESS, "stale": True}  # the node has restarted since the leader looked
    return {"r": c.R_SUCCESS, "cleared": _drop_node_rows(view, op["node"])}


def apply_handler_state(view: EntryView, op: dict[str, Any]) -> Result:
    """Switch a handler on or off on every node: the list of disabled handlers is replicated state."""
    txn = view.txn
    disabled = set(txn.meta("handlers_disabled") or [])
    if op["enabled"]:
        disabled.discard(op["name"])
    else:
        disabled.add(op["name"])
    txn.set_meta("handlers_disabled", sorted(disabled))
    return {"r": c.R_SUCCESS}


def apply_system_uids(view: EntryView, op: dict[str, Any]) -> Result:
    current = set(view.txn.meta("system_uids") or [])
    if op["action"] == "add":
        current.update(op["uids"])
    else:
        current.difference_update(op["uids"])
    view.txn.set_meta("system_uids", sorted(current))
    return {"r": c.R_SUCCESS}


def apply_device_quit(view: EntryView, op: dict[str, Any]) -> Result:
    """Log a device out: its token is cleared (so it cannot log in again); nodes kick its connections."""
    txn = view.txn
    user = txn.user(op["uid"])
    if user is not None:
        flags = list(user.get("tokens", {})) if op["flag"] == -1 else [str(op["flag"])]
        for flag in flags:
            user["tokens"][flag] = ""
        txn.put_user(op["uid"], user)
    return {"r": c.R_SUCCESS}


APPLIERS: dict[str, Callable[[EntryView, dict[str, Any]], Result]] = {
    c.OP_SYSTEM_UIDS: apply_system_uids,
    c.OP_DEVICE_QUIT: apply_device_quit,
    c.OP_CONVERSATION: conversations.apply_conversation,
    c.OP_WEBHOOK_CONFIG: outbox.apply_webhook_config,
    c.OP_WEBHOOK_ADVANCE: outbox.apply_webhook_advance,
    c.OP_WEBHOOK_DEADLETTER: outbox.apply_webhook_deadletter,
    c.OP_DEADLETTER_REMOVE: outbox.apply_deadletter_remove,
    c.OP_CMD_SYNC: cmdqueue.apply_cmd_sync,
    c.OP_CMD_ACK: cmdqueue.apply_cmd_ack,
    c.OP_MSG_EVENT: msgevents.apply_msg_event,
    c.OP_HANDLER_STATE: apply_handler_state,
    c.OP_PRESENCE: apply_presence,
    c.OP_NODE_EPOCH: apply_node_epoch,
    c.OP_NODE_DOWN: apply_node_down,
    c.OP_SEND: apply_send,
    c.OP_TOKEN: apply_token,
    c.OP_CHANNEL: apply_channel,
    c.OP_MEMBERS: apply_members,
    c.OP_CHANNEL_DELETE: apply_channel_delete,
}


def apply_ops(txn: Txn, ops: list[Any], index: int = 0) -> list[Result]:
    """Apply every op of one entry in order; bad ops become error results and write nothing."""
    results: list[Result] = []
    view = EntryView(txn, index)
    for op in ops:
        try:
            checked = c.check_op(op, uid_rule=False)
        except c.BadCommand as exc:
            results.append(_error(c.R_SYSTEM_ERROR, str(exc)))
            continue
        results.append(APPLIERS[checked["t"]](view, checked))
        if checked["t"] not in (c.OP_SEND, c.OP_PRESENCE, c.OP_WEBHOOK_ADVANCE):
            view.invalidate()
    view.flush()
    return results
