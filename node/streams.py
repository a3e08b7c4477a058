"""Streamed messages for AI chat (WuKongIM's message events): `/message/event` and the EVENT packet.

An AI backend sends an anchor message with `/message/send is_stream: 1` (setting bit 0x02), then posts events
keyed by its client_msg_no. This module is the node side of those events:

- `stream.delta` never touches Raft. The node that takes the POST folds it into the stream's text in memory
  (`Lane`) and sends it, as an EVENT packet, to the online connections of the channel's subscribers: its own
  at once, every other node's through that node's `Relay` queue (the node-to-node HTTP path, signed with the
  cluster secret). One queue and one call in flight per destination node: the events of a stream reach each
  node in the order they were posted to this one.
- Every other event type is proposed as a `msg_event` op (raft/msgevents.py) and sent the same way once
  committed. A terminal event (close, error, cancel, finish) carries the text the deltas built, merged here
  into its payload (`snapshot`) and into the op, so the stored state has the whole answer.

What survives what: a persisted event survives what a message survives (committed on a majority); the text
of deltas lives only in the memory of the node that took them until the next stream.snapshot or terminal
event persists it, so a crash of that node loses the deltas since then (WuKongIM's promise too), nothing
else. Post a stream's events to one node: the text is kept where its deltas arrive.

Bounded: open streams per node, snapshot bytes per stream, event keys per stream, items queued per
destination node, deltas queued per connection (`Connection.send_event`); a stream idle for
`stream_idle_timeout_s` is ended with a persisted stream.error ("idle timeout") on every open key, its text
kept.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from node.cluster.proposer import Proposer
from node.config import Tuning
from node.gateway.registry import Registry
from node.wire.protocol import Event
from raft import commands as c
from raft import msgevents
from storage import keys
from storage.store import Store

log = logging.getLogger("imnode.streams")

PEER_EVENTS_PATH = "/peer/stream/events"
RELAY_BATCH_MAX = 512  # events in one node-to-node call
RELAY_BATCH_BYTES = 1 << 20
RELAY_TIMEOUT_S = 2.0
DELTA_IDS_KEPT = 64  # recent delta event ids per key: a retried delta is not appended twice
TEXT = "text"
ROUTE_TTL_S = 1.0  # how long a stream's subscribers and their nodes are reused (StreamHub._route)


class StreamRefused(Exception):
    """The event is not taken; the message says why (the API answers 400 with it, WuKongIM's shape)."""


def snapshot_text(snapshot: bytes | None) -> str | None:
    """The text of a `{"kind": "text", "text": ...}` snapshot, None for any other."""
    if not snapshot:
        return None
    try:
        parsed = json.loads(snapshot)
    except ValueError:
        return None
    if isinstance(parsed, dict) and parsed.get("kind") == TEXT and isinstance(parsed.get("text"), str):
        return str(parsed["text"])
    return None


def legacy_stream_data(snapshot: bytes) -> bytes:
    """WuKongIM's `stream_data` of a snapshot: a text snapshot's text, else the snapshot as it is."""
    text = snapshot_text(snapshot)
    return snapshot if text is None else text.encode()


@dataclass
class Lane:
    """One event key of a stream, in the memory of the node taking its events."""

    status: str = c.STATUS_OPEN
    text: str = ""
    # A delta whose payload is not `{"kind": "text"}` replaces the snapshot instead of appending to the text.
    other: bytes | None = None
    seq: int = 0  # the last msg_event_seq persisted on this key
    ending: bool = False  # a terminal event of this key is being committed: no more deltas
    delta_ids: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=DELTA_IDS_KEPT)
    )

    def snapshot(self) -> bytes | None:
        if self.text:
            return json.dumps({"kind": TEXT, "text": self.text}, ensure_ascii=False).encode()
        return self.other

    def size(self) -> int:
        return len(self.text.encode()) + len(self.other or b"")


@dataclass
class Stream:
    """A streamed message open on this node: where it is and what its keys hold so far."""

    chan: bytes
    channel_id: str  # as the backend names it (a person channel: the receiver)
    channel_type: int
    stored_id: str
    sender: str
    client_msg_no: str
    message_id: int
    lanes: dict[str, Lane]
    touched: float
    ending: bool = False  # a stream.finish is being committed: no more deltas
    route: tuple[list[str], dict[str, set[int]]] | None = None  # see StreamHub._route
    route_at: float = 0.0


@dataclass(frozen=True)
class Posted:
    """One `/message/event` request, checked."""

    channel_id: str
    channel_type: int
    stored_id: str
    sender: str
    client_msg_no: str
    event_id: str
    event_type: str
    event_key: str
    visibility: str
    occurred_at: int
    payload: Any  # the JSON value, None when absent


# Posts a batch of events to another node's PEER_EVENTS_PATH, signed with the cluster secret (the node's
# `Peers.call`): {"ok": True, ...} or {"ok": False, "error": why}.
PeerPost = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Relay:
    """Events on their way to other nodes: a bounded queue and one call in flight per destination."""

    def __init__(
        self,
        post: PeerPost,
        node_ids: Callable[[int], str | None],
        queue_max: int,
        *,
        queue_bytes_max: int = 64 << 20,
    ) -> None:
        self._post = post
        self._node_ids = node_ids
        self._queue_max = queue_max
        # An item holds its event's whole JSON (a snapshot up to 1 MiB): a count alone would let one slow or
        # down node make this one hold gigabytes.
        self._queue_bytes_max = queue_bytes_max
        self._queue_bytes: dict[int, int] = {}
        self._queues: dict[int, collections.deque[dict[str, Any]]] = {}
        self._wakeups: dict[int, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.sent = 0
        self.dropped = 0
        self.calls = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    def enqueue(self, node: int, item: dict[str, Any]) -> None:
        queue = self._queues.get(node)
        if queue is None:
            if self._nursery is None:
                self.dropped += 1
                return
            queue = self._queues[node] = collections.deque()
            self._queue_bytes[node] = 0
            self._wakeups[node] = trio.Event()
            self._nursery.start_soon(self._send_loop, node)
        size = _item_bytes(item)
        if len(queue) >= self._queue_max or self._queue_bytes[node] + size > self._queue_bytes_max:
            self.dropped += 1  # that node is not keeping up (or down): its clients lose this event
            return
        queue.append(item)
        self._queue_bytes[node] += size
        self._wakeups[node].set()

    async def _send_loop(self, node: int) -> None:
        queue = self._queues[node]
        while True:
            if not queue:
                self._wakeups[node] = trio.Event()
                await self._wakeups[node].wait()
            batch: list[dict[str, Any]] = []
            size = 0
            while queue and len(batch) < RELAY_BATCH_MAX and size < RELAY_BATCH_BYTES:
                item = queue.popleft()
                batch.append(item)
                size += _item_bytes(item)
            self._queue_bytes[node] -= size
            node_id = self._node_ids(node)
            if node_id is None:
                self.dropped += len(batch)
                continue
            self.calls += 1
            try:
                answer = await self._post(node_id, {"events": batch})
            except Exception as exc:  # never take the node down for events: they are best effort
                log.exception("stream events to %s failed", node_id)
                answer = {"ok": False, "error": repr(exc)}
            if answer["ok"]:
                self.sent += len(batch)
            else:
                self.dropped += len(batch)
                log.warning("stream events to %s lost: %s", node_id, answer.get("error"))


def _item_bytes(item: dict[str, Any]) -> int:
    return len(item["data"]) + 64  # the event's JSON and roughly what the rest of the item takes


def deliver_local(registry: Registry, items: Iterable[dict[str, Any]], deltas_max: int) -> int:
    """Hand events to this node's connections of their uids; how many connections took one."""
    taken = 0
    for item in items:
        packet = Event(item["id"], item["type"], item["ts"], item["data"].encode())
        for uid in item["uids"]:
            for conn in registry.of_uid(uid):
                if conn.authenticated and conn.send_event(packet, delta=item["delta"], deltas_max=deltas_max):
                    taken += 1
    return taken


class StreamHub:
    """The streams open on this node and the events posted to them."""

    def __init__(
        self,
        tuning: Tuning,
        store: Store,
        proposer: Proposer,
        registry: Registry,
        relay: Relay,
        node: int,
    ) -> None:
        self._tuning = tuning
        self._store = store
        self._proposer = proposer
        self._registry = registry
        self._relay = relay
        self._node = node
        self.streams: dict[tuple[bytes, str, str], Stream] = {}  # by (channel, sender, client_msg_no)
        self.deltas = 0
        self.persisted = 0
        self.timed_out = 0

    # -- the streams --------------------------------------------------------------------------------
    def _open(self, posted: Posted) -> Stream:
        chan = keys.channel_key(posted.stored_id, posted.channel_type)
        found = self.streams.get((chan, posted.sender, posted.client_msg_no))
        if found is not None:
            return found
        with self._store.read() as txn:
            if posted.channel_type not in c.PAIR_CHANNEL_TYPES and txn.channel(chan) is None:
                raise StreamRefused(
                    f"channel {posted.channel_id!r} (type {posted.channel_type}) does not exist"
                )
            dedup = txn.dedup(chan, posted.sender, posted.client_msg_no)
            message = txn.message(chan, int(dedup.get("seq", 0))) if isinstance(dedup, dict) else None
            row = txn.get("msg_events", keys.msg_event_key(chan, posted.sender, posted.client_msg_no))
        if message is None:
            raise StreamRefused(
                f"no message with client_msg_no {posted.client_msg_no!r} from {posted.sender!r} "
                "in this channel"
            )
        if not int(message.get("setting", 0)) & c.SETTING_STREAM:
            raise StreamRefused(f"message {posted.client_msg_no!r} was not sent as a stream (is_stream 1)")
        state = row if isinstance(row, dict) else msgevents.empty_state()
        lanes: dict[str, Lane] = {}
        for key, persisted in state["keys"].items():
            snapshot = persisted.get("snap")
            lane = lanes[key] = Lane(status=str(persisted["st"]), seq=int(persisted["seq"]))
            text = snapshot_text(snapshot)
            if text is not None:
                lane.text = text
            else:
                lane.other = snapshot
        stream = Stream(
            chan,
            posted.channel_id,
            posted.channel_type,
            posted.stored_id,
            posted.sender,
            posted.client_msg_no,
            int(message["mid"]),
            lanes,
            trio.current_time(),
            ending=msgevents.finished(state),
        )
        # A stream whose every key has ended is answered from its stored state, not kept open.
        if not stream.ending and not (
            lanes and all(msgevents.is_terminal(lane.status) for lane in lanes.values())
        ):
            self._keep(stream)
        return stream

    def _keep(self, stream: Stream) -> None:
        key = (stream.chan, stream.sender, stream.client_msg_no)
        if key in self.streams:
            return
        if len(self.streams) >= self._tuning.stream_sessions_max:
            raise StreamRefused(
                f"this node has {self._tuning.stream_sessions_max} streams open (tuning.stream_sessions_max)"
            )
        self.streams[key] = stream

    def _forget_if_done(self, stream: Stream) -> None:
        if stream.ending or all(msgevents.is_terminal(lane.status) for lane in stream.lanes.values()):
            self.streams.pop((stream.chan, stream.sender, stream.client_msg_no), None)

    def lanes_of(self, chan: bytes, sender: str, client_msg_no: str) -> dict[str, Lane] | None:
        """The keys of a stream open on this node (for messagesync: text not persisted yet)."""
        stream = self.streams.get((chan, sender, client_msg_no))
        return None if stream is None else stream.lanes

    # -- posting ------------------------------------------------------------------------------------
    async def post(self, posted: Posted) -> dict[str, Any]:
        """Take one event; the answer WuKongIM gives (`eventAppendResp`). Raises StreamRefused."""
        stream = self._open(posted)
        stream.touched = trio.current_time()
        if posted.event_type == c.EVENT_STREAM_DELTA:
            seq, status = self._delta(stream, posted)
        else:
            seq, status = await self._persist(stream, posted)
        return {
            "client_msg_no": posted.client_msg_no,
            "event_key": posted.event_key,
            "event_id": posted.event_id,
            "msg_event_seq": seq,
            "stream_status": status,
            "channel_id": posted.channel_id,
            "channel_type": posted.channel_type,
            "from_uid": "" if posted.sender == c.SYSTEM_UID else posted.sender,
        }

    def _delta(self, stream: Stream, posted: Posted) -> tuple[int, str]:
        lane = stream.lanes.get(posted.event_key)
        if stream.ending or (lane is not None and (lane.ending or msgevents.is_terminal(lane.status))):
            raise StreamRefused("stream closed")
        if lane is None:
            if len(stream.lanes) >= c.MAX_EVENT_KEYS:
                raise StreamRefused(f"a stream has at most {c.MAX_EVENT_KEYS} event keys")
            self._keep(stream)  # a new key of a stream whose other keys had ended opens it again
            lane = stream.lanes[posted.event_key] = Lane()
        if posted.event_id in lane.delta_ids:
            return lane.seq, lane.status  # a retried delta: taken once
        payload = posted.payload
        limit = self._tuning.stream_snapshot_max_bytes
        size = sum(other.size() for other in stream.lanes.values())
        if (
            isinstance(payload, dict)
            and payload.get("kind") == TEXT
            and isinstance(payload.get("delta"), str)
        ):
            piece = payload["delta"]
            if size + len(piece.encode()) > limit:
                raise StreamRefused(
                    f"the stream's text would pass {limit} bytes (tuning.stream_snapshot_max_bytes)"
                )
            lane.text += piece
        elif payload is not None:
            other = json.dumps(payload, ensure_ascii=False).encode()
            if size - lane.size() + len(other) > limit:
                raise StreamRefused(
                    f"the stream's snapshot would pass {limit} bytes (tuning.stream_snapshot_max_bytes)"
                )
            lane.text, lane.other = "", other
        lane.delta_ids.append(posted.event_id)
        self.deltas += 1
        self._send(stream, posted, lane.seq, lane.status, payload, delta=True)
        return lane.seq, lane.status

    async def _persist(self, stream: Stream, posted: Posted) -> tuple[int, str]:
        key, event_type = posted.event_key, posted.event_type
        payload = posted.payload
        lane = stream.lanes.get(key)
        snapshots: dict[str, bytes] = {}
        end_reason, error = 0, ""
        if event_type == c.EVENT_STREAM_FINISH:
            for other_key, other in stream.lanes.items():
                snapshot = other.snapshot()
                if snapshot is not None and not msgevents.is_terminal(other.status):
                    snapshots[other_key] = snapshot
            main = stream.lanes.get(c.EVENT_KEY_MAIN)
            main_snapshot = None if main is None else main.snapshot()
            if main_snapshot is not None:
                payload = _with_snapshot(payload, main_snapshot)
        elif event_type in c.TERMINAL_STATUS_OF:
            snapshot = lane.snapshot() if lane is not None else None
            if snapshot is not None:
                payload = _with_snapshot(payload, snapshot)
            if isinstance(payload, dict):
                if "snapshot" in payload:
                    snapshots[key] = json.dumps(payload["snapshot"], ensure_ascii=False).encode()
                end_reason = _end_reason(payload.get("end_reason"))
                error = str(payload.get("error") or "")[: c.MAX_EVENT_ERROR_BYTES // 4]
        raw = b"" if payload is None else json.dumps(payload, ensure_ascii=False).encode()
        if len(raw) > c.MAX_PAYLOAD_BYTES or sum(map(len, snapshots.values())) > c.MAX_PAYLOAD_BYTES:
            raise StreamRefused(f"the event's payload is larger than {c.MAX_PAYLOAD_BYTES} bytes")
        if event_type == c.EVENT_STREAM_SNAPSHOT:
            # A snapshot replaces its key's text in memory: the stream's bound holds for it as for deltas.
            limit = self._tuning.stream_snapshot_max_bytes
            size = sum(other.size() for other in stream.lanes.values()) - (lane.size() if lane else 0)
            if size + len(raw) > limit:
                raise StreamRefused(
                    f"the stream's snapshot would pass {limit} bytes (tuning.stream_snapshot_max_bytes)"
                )
        text_before = lane.text if lane is not None else ""
        op = c.msg_event_op(
            channel_id=stream.stored_id,
            channel_type=stream.channel_type,
            sender=stream.sender,
            client_msg_no=stream.client_msg_no,
            event_id=posted.event_id,
            event_key=key,
            event_type=event_type,
            visibility=posted.visibility,
            occurred_at=posted.occurred_at,
            payload=raw,
            snapshots=snapshots or None,
            end_reason=end_reason,
            error=error,
        )
        ending = event_type == c.EVENT_STREAM_FINISH
        # No delta may slip in behind the text merged above while the end is being committed.
        if ending:
            stream.ending = True
        elif lane is not None and event_type in c.TERMINAL_STATUS_OF:
            lane.ending = True
        try:
            [result] = await self._proposer.call([op])
        finally:
            if lane is not None:
                lane.ending = False
        if result.get("r") != c.R_SUCCESS:
            if ending:
                stream.ending = False
            raise StreamRefused(str(result.get("err") or f"not committed (reason {result.get('r')})"))
        seq, status = int(result["seq"]), str(result["st"])
        if result.get("dup") or result.get("final"):
            return seq, status  # answered before, or the key had ended: nothing new to send
        self.persisted += 1
        if not ending:
            lane = stream.lanes.setdefault(key, Lane())  # a delta may have opened the key meanwhile
        if lane is not None:
            lane.seq, lane.status = seq, status
            if event_type == c.EVENT_STREAM_SNAPSHOT:
                text = snapshot_text(raw)
                # Deltas taken while the snapshot was being committed were sent after it: they stay on top.
                later = lane.text[len(text_before) :] if lane.text.startswith(text_before) else ""
                lane.text, lane.other = (text + later, None) if text is not None else ("", raw or None)
        if ending:
            for other in stream.lanes.values():
                if not msgevents.is_terminal(other.status):
                    other.status, other.seq = c.STATUS_CLOSED, seq
        self._send(stream, posted, seq, status, payload, delta=False)
        self._forget_if_done(stream)
        return seq, status

    # -- delivery -----------------------------------------------------------------------------------
    def _send(
        self, stream: Stream, posted: Posted, seq: int, status: str, payload: Any, *, delta: bool
    ) -> None:
        """The EVENT to every online connection of the channel's subscribers, on whichever node."""
        uids, nodes_of = self._route(stream)
        by_view: dict[str, list[str]] = {}
        for uid in uids:
            # A person channel appears to each party as the other one, an agent channel as the id the
            # backend posted (as RECV shows them).
            shown = (
                c.person_peer(stream.stored_id, uid)
                if stream.channel_type == c.CHANNEL_PERSON
                else stream.channel_id
            )
            by_view.setdefault(shown, []).append(uid)
        deltas_max = self._tuning.stream_deltas_queued_max
        for shown, viewers in by_view.items():
            data: dict[str, Any] = {
                "client_msg_no": stream.client_msg_no,
                "channel_id": shown,
                "channel_type": stream.channel_type,
                "from_uid": "" if stream.sender == c.SYSTEM_UID else stream.sender,
                "message_id": stream.message_id,
                "event_key": posted.event_key,
                "msg_event_seq": seq,
                "stream_status": status,
            }
            if posted.visibility:
                data["visibility"] = posted.visibility
            if payload is not None:
                data["payload"] = payload
            item = {
                "uids": viewers,
                "id": posted.event_id,
                "type": posted.event_type,
                "ts": posted.occurred_at,
                "data": json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                "delta": delta,
            }
            remote: dict[int, list[str]] = {}
            for uid in viewers:
                for node in nodes_of[uid]:
                    if node != self._node:
                        remote.setdefault(node, []).append(uid)
            deliver_local(self._registry, [item], deltas_max)
            for node, node_uids in remote.items():
                self._relay.enqueue(node, {**item, "uids": node_uids})

    def _route(self, stream: Stream) -> tuple[list[str], dict[str, set[int]]]:
        """The channel's subscribers and the nodes each is online on, read at most every ROUTE_TTL_S per
        stream: a delta to a large group would otherwise read every member's presence. A device that
        connects meanwhile misses at most that long of deltas (the terminal event carries the text)."""
        now = trio.current_time()
        if stream.route is not None and now - stream.route_at < ROUTE_TTL_S:
            return stream.route
        with self._store.read() as txn:
            if stream.channel_type in c.PAIR_CHANNEL_TYPES:
                # An agent channel's other party is the uid the anchor was sent to.
                peer = (
                    c.person_peer(stream.stored_id, stream.sender)
                    if stream.channel_type == c.CHANNEL_PERSON
                    else stream.channel_id
                )
                uids = [uid for uid in (stream.sender, peer) if uid]
            else:
                uids = txn.members("subscribers", stream.chan)
            nodes_of = {uid: {node for node, _conn, _row in txn.presence_of(uid)} for uid in uids}
        stream.route, stream.route_at = (uids, nodes_of), now
        return stream.route

    # -- idle streams -------------------------------------------------------------------------------
    async def expire_idle(self) -> None:
        """End streams idle past `stream_idle_timeout_s`: each open key gets a persisted stream.error
        ("idle timeout") carrying its text, so messagesync shows what was streamed and that it stopped."""
        idle_s = self._tuning.stream_idle_timeout_s
        while True:
            await trio.sleep(min(idle_s / 4, 30.0))
            now = trio.current_time()
            for stream in [s for s in self.streams.values() if now - s.touched > idle_s]:
                self.timed_out += 1
                for key, lane in list(stream.lanes.items()):
                    if msgevents.is_terminal(lane.status) or key == c.EVENT_KEY_FINISH:
                        continue
                    posted = Posted(
                        stream.channel_id,
                        stream.channel_type,
                        stream.stored_id,
                        stream.sender,
                        stream.client_msg_no,
                        f"idle-timeout-{key}",
                        c.EVENT_STREAM_ERROR,
                        key,
                        "",
                        int(time.time() * 1000),
                        {"error": "idle timeout"},
                    )
                    try:
                        await self._persist(stream, posted)
                    except StreamRefused as exc:
                        log.warning("idle stream %s: %s", stream.client_msg_no, exc)
                self.streams.pop((stream.chan, stream.sender, stream.client_msg_no), None)

    def statistics(self) -> dict[str, int]:
        return {
            "streams_open": len(self.streams),
            "deltas": self.deltas,
            "persisted_events": self.persisted,
            "timed_out": self.timed_out,
            "relay_sent": self._relay.sent,
            "relay_dropped": self._relay.dropped,
            "relay_calls": self._relay.calls,
        }


def _with_snapshot(payload: Any, snapshot: bytes) -> Any:
    """WuKongIM's `mergeTerminalPayloadWithSnapshot`: the payload object with `snapshot` set (a payload
    that is not an object is kept as `raw_payload`)."""
    body: dict[str, Any] = dict(payload) if isinstance(payload, dict) else {}
    if payload is not None and not isinstance(payload, dict):
        body["raw_payload"] = payload
    try:
        body["snapshot"] = json.loads(snapshot)
    except ValueError:
        body["snapshot"] = snapshot.decode(errors="replace")
    return body


def _end_reason(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int) and 0 <= value <= 255:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) <= 255:
        return int(value)
    return 0
