"""Message events (WuKongIM v2.2.5 `internal/api/message.go`): `/message/event`, `/message/eventsync`, the
event fields `/channel/messagesync` adds to streamed messages, and the node-to-node path events travel.

Answers keep WuKongIM's shapes: `{"status": 200, "data": ...}`, and HTTP 400 `{"msg", "status": 400}` for
what is refused.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from node.api.fields import CHANNEL, F, Json, Route, bad, stored_channel
from node.gateway.registry import Registry
from node.streams import (
    PEER_EVENTS_PATH,
    Lane,
    Posted,
    StreamHub,
    StreamRefused,
    deliver_local,
    legacy_stream_data,
)
from raft import commands as c
from raft import msgevents
from storage import keys
from storage.store import Store

EVENTSYNC_LIMIT_DEFAULT = 200
EVENTSYNC_LIMIT_MAX = 2000
PRIVATE_VISIBILITIES = ("private", "restricted")
PEER_EVENTS_MAX = 4096  # events in one node-to-node call (the relay sends at most 512)


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def key_states(
    store_state: dict[str, Any] | None, lanes: dict[str, Lane] | None
) -> dict[str, dict[str, Any]]:
    """Every event key's state: the stored one, overlaid by this node's memory where the stream is open
    here (its text not persisted yet), as WuKongIM's `mergeEventStatesWithCache` does."""
    merged: dict[str, dict[str, Any]] = {}
    for key, state in (store_state or {}).get("keys", {}).items():
        merged[key] = dict(state)
    for key, lane in (lanes or {}).items():
        state = merged.setdefault(key, {"st": lane.status, "seq": lane.seq})
        if lane.seq >= int(state.get("seq", 0)) or lane.status == c.STATUS_OPEN:
            state["st"] = lane.status
            snapshot = lane.snapshot()
            if snapshot is not None:
                state["snap"] = snapshot
    return merged


def _projected(key: str, state: dict[str, Any]) -> Json:
    """WuKongIM's `buildProjectedEvent`: a key's state shown as its last event."""
    snapshot = state.get("snap")
    if snapshot:
        payload = _json_or_text(snapshot)
    else:
        payload = {"status": state.get("st", ""), "end_reason": int(state.get("er", 0))}
        if state.get("err"):
            payload["error"] = state["err"]
    return {
        "msg_event_seq": int(state.get("seq", 0)),
        "event_id": state.get("eid", ""),
        "event_key": key,
        "event_type": state.get("et") or c.EVENT_STREAM_SNAPSHOT,
        "visibility": state.get("vis", ""),
        "occurred_at": int(state.get("at", 0)),
        "payload": payload,
    }


def fill_event_meta(
    store: Store, hub: StreamHub, chan: bytes, rows: list[Json], shown: list[Json], mode: str
) -> None:
    """Add `event_meta`, `event_sync_hint` and the legacy `stream_data`, `end`, `end_reason`, `error` to each
    streamed message of a messagesync answer (`shown[i]` is `rows[i]` as answered), WuKongIM's
    `fillMessagesEventMeta`. `mode` "full" (the default) includes each key's snapshot."""
    streamed = [
        (row, out) for row, out in zip(rows, shown, strict=True) if int(row["setting"]) & c.SETTING_STREAM
    ]
    if not streamed:
        return
    with store.read() as txn:
        stored = {
            (row["from"], row["cmn"]): txn.get(
                "msg_events", keys.msg_event_key(chan, row["from"], row["cmn"])
            )
            for row, _ in streamed
        }
    for row, out in streamed:
        state = stored[row["from"], row["cmn"]]
        lanes = hub.lanes_of(chan, row["from"], row["cmn"])
        states = key_states(state if isinstance(state, dict) else None, lanes)
        if not states:
            continue
        meta: Json = {"has_events": True, "completed": False, "events": []}
        last_seq = opened = 0
        for key in sorted(states, key=lambda k: int(states[k].get("seq", 0))):
            lane = states[key]
            if key == c.EVENT_KEY_FINISH:
                meta["completed"] = True
                continue
            shown_key: Json = {"event_key": key, "status": lane.get("st", "")}
            if lane.get("seq"):
                shown_key["last_msg_event_seq"] = int(lane["seq"])
            if lane.get("er"):
                shown_key["end_reason"] = int(lane["er"])
            if lane.get("err"):
                shown_key["error"] = lane["err"]
            if mode == "full" and lane.get("snap"):
                shown_key["snapshot"] = _json_or_text(lane["snap"])
            last_seq = max(last_seq, int(lane.get("seq", 0)))
            opened += lane.get("st") == c.STATUS_OPEN
            meta["events"].append(shown_key)
        if last_seq:
            meta["last_msg_event_seq"] = meta["event_version"] = last_seq
        if meta["events"]:
            meta["event_count"] = len(meta["events"])
        if opened:
            meta["open_event_count"] = opened
        out["event_meta"] = meta
        out["event_sync_hint"] = {"client_msg_no": row["cmn"], "from_msg_event_seq": 0}
        main = states.get(c.EVENT_KEY_MAIN)
        if main is not None:
            if main.get("snap"):
                # WuKongIM's stream_data is a Go []byte: JSON shows it in base64.
                out["stream_data"] = base64.b64encode(legacy_stream_data(main["snap"])).decode()
            if msgevents.is_terminal(str(main.get("st", ""))):
                out["end"] = 1
            if main.get("er"):
                out["end_reason"] = int(main["er"])
            if main.get("err"):
                out["error"] = main["err"]


def routes(store: Store, hub: StreamHub, registry: Registry, deltas_max: int) -> dict[str, Route]:
    async def event(body: Json, query: Any) -> Json:
        sender = body["from_uid"] or c.SYSTEM_UID
        channel_id, channel_type = body["channel_id"], body["channel_type"]
        if channel_type in c.PAIR_CHANNEL_TYPES:
            if not c.valid_uid(channel_id) or channel_id == sender:
                raise bad(f"channel_id of a person or agent channel is the receiver's uid and {c.UID_RULE}")
            if channel_type == c.CHANNEL_PERSON:
                stored = c.person_channel_id(sender, channel_id)
            else:
                stored = c.agent_channel_id(sender, channel_id)  # where the anchor from `sender` is
        else:
            stored = channel_id
        event_type = body["event_type"].strip().lower()
        key = body["event_key"].strip() or c.EVENT_KEY_MAIN
        if event_type == c.EVENT_STREAM_FINISH:
            key = c.EVENT_KEY_FINISH  # WuKongIM: the message-level end has its own key
        elif key == c.EVENT_KEY_FINISH:
            raise bad(f"event_key {c.EVENT_KEY_FINISH} is stream.finish's own")
        for name, value in (("client_msg_no", body["client_msg_no"]), ("event_id", body["event_id"])):
            if not value.strip():
                raise bad(f"{name} must not be empty")
        if not event_type:
            raise bad("event_type must not be empty")
        posted = Posted(
            channel_id=channel_id,
            channel_type=channel_type,
            stored_id=stored,
            sender=sender,
            client_msg_no=body["client_msg_no"].strip(),
            event_id=body["event_id"].strip(),
            event_type=event_type,
            event_key=key,
            visibility=body["visibility"],
            occurred_at=body["occurred_at"] or int(time.time() * 1000),
            payload=body["payload"],
        )
        try:
            data = await hub.post(posted)
        except StreamRefused as exc:
            raise bad(str(exc)) from None
        return {"status": 200, "data": data}

    async def eventsync(body: Json, query: Any) -> Json:
        if not body["client_msg_no"].strip():
            raise bad("client_msg_no must not be empty")
        channel_type = body["channel_type"]
        stored = stored_channel(body["from_uid"], body["channel_id"], channel_type)
        if channel_type == c.CHANNEL_PERSON and c.PERSON_SEPARATOR not in stored:
            raise bad("from_uid is required for a person channel named by the other party")
        chan = keys.channel_key(stored, channel_type)
        limit = min(body["limit"] or EVENTSYNC_LIMIT_DEFAULT, EVENTSYNC_LIMIT_MAX)
        start, wanted_key = body["from_msg_event_seq"], body["event_key"].strip()
        with store.read() as txn:
            sender = body["from_uid"] or c.SYSTEM_UID  # as /message/event names a stream posted without one
            key = keys.msg_event_key(chan, sender, body["client_msg_no"].strip())
            state = txn.get("msg_events", key)
        states = (state if isinstance(state, dict) else {}).get("keys", {})
        events = [
            _projected(key, lane)
            for key, lane in states.items()
            if (not wanted_key or key == wanted_key)
            and int(lane.get("seq", 0)) > start
            and (body["include_private"] or lane.get("vis", "") not in PRIVATE_VISIBILITIES)
        ]
        events.sort(key=lambda e: int(e["msg_event_seq"]))
        more = int(len(events) > limit)
        events = events[:limit]
        data = {
            "client_msg_no": body["client_msg_no"],
            "from_msg_event_seq": start,
            "next_msg_event_seq": events[-1]["msg_event_seq"] if events else start,
            "more": more,
            "events": events,
            "filtered_by_event_key": body["event_key"],
        }
        return {"status": 200, "data": data}

    async def peer_events(body: Json, query: Any) -> Json:
        """Events another node took, for this node's connections (see node/streams.py `Relay`)."""
        items = []
        for raw in body["events"]:
            try:
                items.append(
                    {
                        "uids": [str(uid) for uid in raw["uids"]],
                        "id": str(raw["id"]),
                        "type": str(raw["type"]),
                        "ts": int(raw["ts"]),
                        "data": str(raw["data"]),
                        "delta": bool(raw["delta"]),
                    }
                )
            except (KeyError, TypeError, ValueError):
                raise bad("every event needs uids, id, type, ts, data and delta") from None
        return {"connections": deliver_local(registry, items, deltas_max)}

    payload_doc = 'the event\'s JSON payload; stream.delta: {"kind":"text","delta":"..."} appends'
    return {
        "/message/event": Route(
            "POST",
            event,
            (
                *CHANNEL,
                F("from_uid", "uid", default="", max_bytes=c.MAX_UID_BYTES),
                F("client_msg_no", required=True),
                F("message_id", "int", default=0),
                F("event_id", required=True),
                F("event_type", required=True, max_bytes=c.MAX_EVENT_TYPE_BYTES),
                F("event_key", default="", max_bytes=c.MAX_EVENT_KEY_BYTES),
                F("visibility", default="", max_bytes=c.MAX_VISIBILITY_BYTES),
                F("occurred_at", "int", default=0),
                F("payload", "json", max_bytes=c.MAX_PAYLOAD_BYTES, description=payload_doc),
                F("headers", "obj"),
            ),
            summary="Append an event to a streamed message (deltas in memory, the rest through Raft)",
        ),
        "/message/eventsync": Route(
            "POST",
            eventsync,
            (
                *CHANNEL,
                F("from_uid", "uid", default="", max_bytes=c.MAX_UID_BYTES),
                F("client_msg_no", required=True),
                F("event_key", default="", max_bytes=c.MAX_EVENT_KEY_BYTES),
                F("from_msg_event_seq", "int", default=0),
                F("limit", "int", default=0, high=1 << 31),
                F("include_private", "flag", default=0),
            ),
            summary="The persisted events of a streamed message: each event key's state, by msg_event_seq",
        ),
        PEER_EVENTS_PATH: Route(
            "POST",
            peer_events,
            (F("events", "objs", required=True, high=PEER_EVENTS_MAX),),
            summary="Node-to-node only: message events for this node's connections",
            peer=True,
        ),
    }
