"""Webhook delivery: the leader posts the replicated outbox, in order, at least once.

Three streams, each with its own task so a failing one never holds up the others: `msg.notify` (a JSON
array of up to `batch_max` messages per POST), `msg.offline` (a message with `to_uids`, the subscribers
offline when it was applied, see `offline_uids`: one object per POST as in WuKongIM, or arrays with
`offline_array`), and `user.onlinestatus` (an array of
"uid-deviceFlag-online-connId-deviceOnlineCount-totalOnlineCount" strings). A batch of up to `batch_max`
events is posted (in one POST, or one per msg.offline object), then the cursor advances once: one Raft
commit per batch. Only HTTP 200 counts as delivered. A failed POST is retried with exponential backoff;
after `attempts` failures its events move to the replicated dead-letter list. An https receiver's
certificate and host name are checked against the system's trust store, or only against
`webhook.ca_file` when it is set; a failed check is a failed attempt. Every POST carries
`X-Imnode-Event-Id: <stream>:<first seq>-<last seq>` so a receiver can drop the repeats that
at-least-once delivery allows (after a leader change, for example).
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from node.cluster.presence import DEVICE_LEVEL_MASTER as MASTER_LEVEL
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
from storage.keys import channel_key
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


async def post(
    url: str,
    event: str,
    body: bytes,
    event_id: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """POST `body` to `url?event=NAME` (http, or https checked against `ssl_context`); the status code.

    `timeout_s` bounds the whole exchange. The answer's body is never read: only its status counts.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"unsupported webhook url {url!r} (http[s]://host:port/path)")
    headers = {"Content-Type": "application/json", "X-Imnode-Event-Id": event_id}
    verify: ssl.SSLContext | bool = False  # plain http: nothing to check, and no trust store to load
    if parts.scheme == "https":
        verify = ssl_context if ssl_context is not None else ssl.create_default_context()
    with trio.move_on_after(timeout_s):
        try:
            async with (
                httpx.AsyncClient(
                    verify=verify,
                    timeout=timeout_s,
                    # A new connection per POST: a receiver may close after each answer, and a POST sent
                    # on a connection it is closing would count as a failed attempt.
                    limits=httpx.Limits(max_keepalive_connections=0),
                    # Behaviour from the config file alone, not from proxy or CA variables of whoever
                    # started the node.
                    trust_env=False,
                ) as client,
                client.stream("POST", url, params={"event": event}, content=body, headers=headers) as answer,
            ):
                return answer.status_code
        except httpx.HTTPError as exc:
            raise WebhookError(_reason(exc)) from None
    raise WebhookError(f"no answer within {timeout_s}s")


def _reason(exc: BaseException) -> str:
    """The innermost message of an exception chain: on trio, httpx reports an untrusted certificate as
    ConnectError('') around BrokenResourceError() around the ssl error that says what is wrong."""
    reason = type(exc).__name__
    seen = 0
    found: BaseException | None = exc
    while found is not None and seen < 10:  # bounded: a chain is never long, but guard against a loop
        reason = str(found) or reason
        found = found.__cause__ or found.__context__
        seen += 1
    return reason


def offline_uids(txn: Txn, recipients: list[str], sender: str, index: int) -> list[str]:
    """The recipients without a master device online when the message at log `index` was applied, and
    still without one.

    As WuKongIM (`channel/handler/event_distribute.go`), a user counts as offline for this event when no
    *master* device (device_level 1, from `/user/token`) is online, so a user on the web only still gets a
    phone push; without token auth every device is a slave and every recipient is listed. Presence is
    replicated, so "online at index" is known exactly for a recipient whose rows have not changed since: a
    recipient with a master row now is online (even if its row landed after the message: its CONNECT raced
    the send, and it received the message live or syncs it), and one whose master connection went away at
    or after `index` was online when the message was applied. Events written before `index` was recorded
    (0) fall back to "no master row now".
    """
    return [
        uid
        for uid in recipients
        if uid != sender
        and not any(row.get("level") == MASTER_LEVEL for _n, _c, row in txn.presence_of(uid))
        and not (index and txn.presence_left(uid) >= index)
    ]


@dataclass(frozen=True)
class Post:
    """One POST of a stream: its body delivers the events up to seq `last`; `first` starts its event id."""

    first: int
    last: int
    body: bytes


def _message(txn: Txn, event: dict[str, Any]) -> dict[str, Any] | None:
    """The message an event refers to, as WuKongIM shows it; None once its channel was deleted."""
    row = txn.message(event["ck"], event["seq"])
    return None if row is None else message_json(row)


def _offline_message(txn: Txn, event: dict[str, Any]) -> dict[str, Any] | None:
    """A msg.offline object (the message and its `to_uids`); None when nobody is left to tell.

    A no_persist message is not stored: its event carries it (`m`). A command's stored row lives in the
    command channel, so the recipients come from the row itself (its uid list, or its original channel).
    """
    row = event.get("m") if isinstance(event.get("m"), dict) else txn.message(event["ck"], event["seq"])
    if row is None:
        return None
    message = message_json(row)
    if row["ct"] == CHANNEL_PERSON:
        recipients = [event.get("to") or message["channel_id"]]
    elif "subs" in row:
        recipients = list(dict.fromkeys(row["subs"]))
    else:
        recipients = txn.members("subscribers", channel_key(row["cid"], row["ct"]))
    to_uids = offline_uids(txn, recipients, row["from"], int(event.get("i", 0)))
    if not to_uids:
        return None
    message["to_uids"] = to_uids
    return message


class Webhooks:
    """Every node runs one; only the leader's delivers (`is_leader` is asked before every batch).

    `ssl_context`: what an https receiver's certificate is checked against (built once by the caller:
    loading a trust store per POST costs more than the POST); None for http.
    """

    def __init__(
        self,
        settings: WebhookSettings,
        store: Store,
        proposer: Proposer,
        is_leader: Callable[[], bool],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._proposer = proposer
        self._is_leader = is_leader
        self.ssl_context = ssl_context
        self.streams = {name: StreamState() for name in WEBHOOK_STREAMS}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_config)
            for stream in WEBHOOK_STREAMS:
                nursery.start_soon(self._deliver_forever, stream)

    async def _keep_config(self) -> None:
        """On the leader: the replicated settings follow this node's config, "off" included.

        Checked all along, not once: a node becomes leader at any time, and a follower that started with
        another file may have published its own settings meanwhile. The leader's file wins.
        """
        while True:
            await self.publish_config()
            await trio.sleep(IDLE_POLL_S)

    async def publish_config(self) -> None:
        """On the leader, make the replicated webhook settings match this node's config (no url: off).

        Returns at once on a follower, or when they already match. Events are written by apply only while
        a url is replicated, so switching off stops new events; those already pending stay in the outbox
        (posted if a webhook is switched on again).
        """
        settings = self.settings
        op = webhook_config_op(
            settings.url, list(settings.events), settings.outbox_max, settings.deadletters_max
        )
        wanted = {key: op[key] for key in ("url", "events", "outbox_max", "deadletters_max")}
        while self._is_leader():
            with self._store.read() as txn:
                current = outbox.config(txn)
            if current == wanted or (current is None and not self.settings.url):
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
                events = outbox.pending(txn, stream, self.settings.batch_max) if hook else []
                start = outbox.cursor(txn, stream)
                posts = self._posts(txn, stream, start, events) if events else []
            if hook is None or not events:
                await trio.sleep(IDLE_POLL_S)
                continue
            end = events[-1][0]
            done, error, failing = start, "", None
            for item in posts:
                error = await self._send(hook["url"], stream, item)
                if error:
                    failing = item
                    done = item.first - 1  # what came before it was delivered or needed no POST
                    break
                done = item.last
            else:
                done = end  # events that needed no POST after the last one are passed too
            if done > start:
                # One Raft commit for the whole batch, however many POSTs (or none) it took.
                state.delivered += done - start
                state.failures = 0
                delay = self.settings.backoff_initial_s
                await self._proposer.call([webhook_advance_op(stream, start, done)])
            if failing is None:
                continue
            state.failures += 1
            log.warning("webhook %s: attempt %d failed: %s", stream, state.failures, error)
            state.last_error = error
            if state.failures >= self.settings.attempts:
                log.warning(
                    "webhook %s: %d attempts failed (%s); events %d-%d dead-lettered",
                    stream,
                    state.failures,
                    error,
                    done + 1,
                    failing.last,
                )
                await self._proposer.call(
                    [
                        webhook_deadletter_op(
                            stream, done, failing.last, error[:ERROR_MAX_CHARS], state.failures
                        )
                    ]
                )
                state.dead_lettered += failing.last - done
                state.failures = 0
                delay = self.settings.backoff_initial_s
                continue
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.backoff_max_s)

    async def _send(self, url: str, stream: str, item: Post) -> str:
        """POST one body; the error, or "" once the receiver answered 200."""
        try:
            status = await post(
                url,
                WEBHOOK_EVENT_OF_STREAM[stream],
                item.body,
                f"{stream}:{item.first}-{item.last}",
                self.settings.timeout_s,
                self.ssl_context,
            )
        except (OSError, WebhookError) as exc:
            return str(exc) or type(exc).__name__
        return "" if status == 200 else f"HTTP {status}"

    def _posts(
        self, txn: Txn, stream: str, start: int, events: list[tuple[int, dict[str, Any]]]
    ) -> list[Post]:
        """The POSTs that deliver `events` (the seqs after `start`), in order.

        An event with nothing to tell needs no POST (its message was deleted since, or a msg.offline finds
        nobody offline, as WuKongIM posts msg.offline only when someone is): the cursor passes it.
        msg.offline is one JSON object per POST (WuKongIM's shape, what its receivers parse) unless
        `offline_array` asks for arrays like msg.notify's.
        """
        end = events[-1][0]
        if stream == "online":
            return [Post(start + 1, end, json.dumps([event["status"] for _seq, event in events]).encode())]
        if stream == "notify":
            messages = [m for _seq, event in events if (m := _message(txn, event)) is not None]
            return [Post(start + 1, end, json.dumps(messages).encode())] if messages else []
        offline = [(seq, m) for seq, event in events if (m := _offline_message(txn, event)) is not None]
        if not offline:
            return []
        if self.settings.offline_array:
            return [Post(start + 1, end, json.dumps([m for _seq, m in offline]).encode())]
        return [Post(seq, seq, json.dumps(m).encode()) for seq, m in offline]

    async def replay_deadletters(self) -> dict[str, Any]:
        """Send every dead letter again (oldest first); the delivered ones leave the list."""
        with self._store.read() as txn:
            hook = outbox.config(txn)
            letters = outbox.deadletters(txn)
            posts = [
                (stream, seq, self._posts(txn, stream, seq - 1, [(seq, value["event"])]))
                for stream, seq, value in letters
            ]
        if hook is None:
            return {"replayed": 0, "failed": len(letters), "error": "no webhook configured"}
        replayed, failed, last_error = 0, 0, ""
        done: dict[str, list[int]] = {}
        for stream, seq, items in posts:
            errors = [error for item in items if (error := await self._send(hook["url"], stream, item))]
            if errors:
                failed += 1
                last_error = errors[-1]
                continue
            done.setdefault(stream, []).append(seq)
            replayed += 1
        # One Raft commit per stream for the whole replay, not one per letter.
        if done:
            await self._proposer.call([deadletter_remove_op(stream, seqs) for stream, seqs in done.items()])
        return {"replayed": replayed, "failed": failed, "error": last_error}

    def statistics(self) -> dict[str, Any]:
        return {name: vars(state) for name, state in self.streams.items()}
