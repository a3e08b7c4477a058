"""Webhook delivery: the leader posts the replicated outbox, in order, at least once.

Three streams, each with its own task so a failing one never holds up the others: `msg.notify` (a JSON array
of up to `batch_max` messages per POST), `msg.offline` (one message per POST, with `to_uids`: subscribers
with no device online anywhere in the cluster, computed when it is sent), and `user.onlinestatus` (an array
of "uid-deviceFlag-online-connId-deviceOnlineCount-totalOnlineCount" strings). Only HTTP 200 counts as
delivered. A failed POST is retried with exponential backoff; after `attempts` failures the events move to
the replicated dead-letter list. Every POST carries `X-Imnode-Event-Id: <stream>:<first seq>-<last seq>` so
a receiver can drop the repeats that at-least-once delivery allows (after a leader change, for example).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.cluster.proposer import Proposer
from node.config import WebhookSettings
from node.shapes import message_json
from raft import outbox
from raft.commands import (
    CHANNEL_PERSON,
    R_SUCCESS,
    WEBHOOK_EVENT_OF_STREAM,
    WEBHOOK_STREAMS,
    deadletter_remove_op,
    webhook_advance_op,
    webhook_config_op,
    webhook_deadletter_op,
)
from storage.keys import split_channel_key
from storage.store import Store, Txn

log = logging.getLogger("imnode.webhook")
IDLE_POLL_S = 0.2
CONFIG_RETRY_S = 1.0
# A dead letter's error text is capped in the log (1 KiB of UTF-8): 256 characters always fit.
ERROR_MAX_CHARS = 256


@dataclass
class StreamState:
    delivered: int = 0
    failures: int = 0
    dead_lettered: int = 0
    last_error: str = ""


class WebhookError(Exception):
    pass


async def post(url: str, event: str, body: bytes, event_id: str, timeout_s: float) -> int:
    """POST `body` to `url?event=NAME` (HTTP/1.1, http only); returns the status code."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise WebhookError(f"unsupported webhook url {url!r} (http://host:port/path)")
    query = (parts.query + "&" if parts.query else "") + urllib.parse.urlencode({"event": event})
    target = f"{parts.path or '/'}?{query}"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Imnode-Event-Id: {event_id}\r\nConnection: close\r\n\r\n"
    ).encode()
    with trio.move_on_after(timeout_s) as scope:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
        async with stream:
            await stream.send_all(head + body)
            response = b""
            while b"\r\n" not in response:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                response += chunk
    if scope.cancelled_caught:
        raise WebhookError(f"no answer within {timeout_s}s")
    status_line = response.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise WebhookError("not an HTTP response")
    return int(status_line[1])


class Webhooks:
    """Every node runs one; only the leader's delivers (`is_leader` is asked before every batch)."""

    def __init__(
        self, settings: WebhookSettings, store: Store, proposer: Proposer, is_leader: Callable[[], bool]
    ) -> None:
        self.settings = settings
        self._store = store
        self._proposer = proposer
        self._is_leader = is_leader
        self.streams = {name: StreamState() for name in WEBHOOK_STREAMS}

    async def run(self) -> None:
        if self.settings.url:
            await self.publish_config()
        async with trio.open_nursery() as nursery:
            for stream in WEBHOOK_STREAMS:
                nursery.start_soon(self._deliver_forever, stream)

    async def publish_config(self) -> None:
        """Make the replicated webhook settings match this node's config (the same file on every node)."""
        op = webhook_config_op(self.settings.url, list(self.settings.events), self.settings.outbox_max)
        wanted = {key: op[key] for key in ("url", "events", "outbox_max")}
        while True:
            with self._store.read() as txn:
                current = txn.meta("webhook")
            if current == wanted:
                return
            [result] = await self._proposer.call([op])
            if result.get("r") == R_SUCCESS:
                return
            await trio.sleep(CONFIG_RETRY_S)

    async def _deliver_forever(self, stream: str) -> None:
        state = self.streams[stream]
        delay = self.settings.backoff_initial_s
        while True:
            if not self._is_leader():
                await trio.sleep(IDLE_POLL_S)
                continue
            with self._store.read() as txn:
                hook = outbox.config(txn)
                limit = self.settings.batch_max if stream != "offline" else 1
                events = outbox.pending(txn, stream, limit) if hook else []
                start = outbox.cursor(txn, stream)
                body = self._body(txn, stream, events) if events else b""
            if hook is None or not events:
                await trio.sleep(IDLE_POLL_S)
                continue
            end = events[-1][0]
            try:
                status = await post(
                    hook["url"],
                    WEBHOOK_EVENT_OF_STREAM[stream],
                    body,
                    f"{stream}:{start + 1}-{end}",
                    self.settings.timeout_s,
                )
                error = "" if status == 200 else f"HTTP {status}"
            except (OSError, WebhookError) as exc:
                error = str(exc) or type(exc).__name__
            if not error:
                state.delivered += end - start
                state.failures = 0
                delay = self.settings.backoff_initial_s
                await self._proposer.call([webhook_advance_op(stream, start, end)])
                continue
            state.failures += 1
            state.last_error = error
            if state.failures >= self.settings.attempts:
                log.warning(
                    "webhook %s: %d attempts failed (%s); events %d-%d dead-lettered",
                    stream,
                    state.failures,
                    error,
                    start + 1,
                    end,
                )
                await self._proposer.call(
                    [webhook_deadletter_op(stream, start, end, error[:ERROR_MAX_CHARS], state.failures)]
                )
                state.dead_lettered += end - start
                state.failures = 0
                delay = self.settings.backoff_initial_s
                continue
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.backoff_max_s)

    def _body(self, txn: Txn, stream: str, events: list[tuple[int, dict[str, Any]]]) -> bytes:
        if stream == "online":
            return json.dumps([event["status"] for _seq, event in events]).encode()
        messages = []
        for _seq, event in events:
            _channel_id, channel_type, _used = split_channel_key(event["ck"])
            row = txn.message(event["ck"], event["seq"])
            if row is None:
                continue  # the channel was deleted since: nothing left to tell
            message = message_json(row)
            if stream == "offline":
                if channel_type == CHANNEL_PERSON:
                    recipients = [event.get("to") or message["channel_id"]]
                else:
                    recipients = txn.members("subscribers", event["ck"])
                message["to_uids"] = [
                    uid for uid in recipients if uid != row["from"] and not txn.presence_of(uid)
                ]
                return json.dumps(message).encode()
            messages.append(message)
        return json.dumps(messages).encode()

    def body_of(self, txn: Txn, stream: str, seq: int, event: dict[str, Any]) -> bytes:
        return self._body(txn, stream, [(seq, event)])

    async def replay_deadletters(self) -> dict[str, Any]:
        """Send every dead letter again (oldest first); the delivered ones leave the list."""
        with self._store.read() as txn:
            hook = outbox.config(txn)
            letters = outbox.deadletters(txn)
            bodies = [
                (stream, seq, self.body_of(txn, stream, seq, value["event"]))
                for stream, seq, value in letters
            ]
        if hook is None:
            return {"replayed": 0, "failed": len(letters), "error": "no webhook configured"}
        replayed, failed, last_error = 0, 0, ""
        for stream, seq, body in bodies:
            try:
                status = await post(
                    hook["url"],
                    WEBHOOK_EVENT_OF_STREAM[stream],
                    body,
                    f"{stream}:{seq}-{seq}",
                    self.settings.timeout_s,
                )
            except (OSError, WebhookError) as exc:
                status, last_error = 0, str(exc)
            if status == 200:
                await self._proposer.call([deadletter_remove_op(stream, [seq])])
                replayed += 1
            else:
                failed += 1
                last_error = last_error or f"HTTP {status}"
        return {"replayed": replayed, "failed": failed, "error": last_error}

    def statistics(self) -> dict[str, Any]:
        return {name: vars(state) for name, state in self.streams.items()}
