"""`imnode bench --mode stream`: AI-chat streams through a running cluster, measured end to end.

One "AI backend" (this process) opens `--streams` streams with `/message/send is_stream 1`, each to its own
reader, and posts `--deltas-per-s` stream.delta events per stream to the first member for `--duration`
seconds, then a stream.finish. Each reader is an imnode client (protocol version 5) on another member, so
every delta crosses the node-to-node path. A delta carries the time it was posted (this process's clock):
its latency is POST to EVENT read by the reader. At the end:

- `deltas_posted`, `deltas_delivered` and `deltas_per_s` (delivered over the sending time), `lost` (posted,
  answered 200, never read), `out_of_order` (a reader saw a delta of its stream before an earlier one),
- `latency_ms_p50`, `_p99`, `_max` of delivered deltas, and `post_ms_p50`/`_p99` of the POSTs,
- `raft_entries`: entries the cluster committed during the run (the first member's applied index before
  and after): deltas take none, so this stays near the number of anchors and finishes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from typing import Any

import httpx
import trio

from node.client import Client, open_client
from node.config import Config
from node.metrics import percentile
from node.tools import operator as op

POST_TIMEOUT_S = 10.0


class StreamBench:
    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.latencies_ms: list[float] = []
        self.post_ms: list[float] = []
        self.posted = 0
        self.post_errors: dict[str, int] = {}
        self.seen: dict[int, int] = {}  # stream -> the last delta index its reader read
        self.delivered = 0
        self.out_of_order = 0
        self.finished = 0

    def reader_uid(self, stream: int) -> str:
        return f"sbench-{self.run_id}-{stream}"

    async def run(self) -> dict[str, Any]:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per POST
        _leader, members = op.members(self.config)
        nodes = [m for m in members if m in self.config.nodes]
        entry = nodes[0]
        readers_at = nodes[1:] or nodes
        base = f"http://{self.config.node(entry).http}"
        headers = {"token": self.config.manager_token} if self.config.manager_token else {}
        applied_before = (op.node_status(self.config, entry) or {}).get("applied_index", 0)
        streams = self.args.streams
        limits = httpx.Limits(max_connections=min(streams, 64), max_keepalive_connections=min(streams, 64))
        async with (
            httpx.AsyncClient(base_url=base, headers=headers, timeout=POST_TIMEOUT_S, limits=limits) as http,
            trio.open_nursery() as nursery,
        ):
            clients: list[Client | None] = [None] * streams
            ready = trio.Semaphore(0)
            done = trio.Event()

            async def hold(stream: int) -> None:
                node_id = readers_at[stream % len(readers_at)]
                host, port = self.config.node(node_id).tcp.rsplit(":", 1)
                async with open_client(host, int(port), self.reader_uid(stream), timeout_s=30) as client:
                    clients[stream] = client
                    ready.release()
                    with trio.move_on_after(self.args.duration + 60):
                        while not done.is_set():
                            self.on_event(stream, await client.event(timeout_s=self.args.duration + 60))

            for stream in range(streams):
                nursery.start_soon(hold, stream)
            for _ in range(streams):
                await ready.acquire()
            await self.wait_online(http, [self.reader_uid(i) for i in range(streams)])
            started = time.perf_counter()
            async with trio.open_nursery() as posters:
                for stream in range(streams):
                    posters.start_soon(self.post_stream, http, stream)
            sent_s = time.perf_counter() - started
            with trio.move_on_after(10):  # until every finish is read, or nothing more comes
                while self.finished < streams:  # noqa: ASYNC110 - counted by the readers' tasks
                    await trio.sleep(0.05)
            done.set()
            nursery.cancel_scope.cancel()
        applied_after = (op.node_status(self.config, entry) or {}).get("applied_index", 0)
        lat = self.latencies_ms
        return {
            "streams": streams,
            "deltas_posted": self.posted,
            "deltas_delivered": self.delivered,
            "deltas_per_s": round(self.delivered / sent_s) if sent_s else 0,
            "lost": max(0, self.posted - self.delivered),
            "out_of_order": self.out_of_order,
            "latency_ms_p50": round(percentile(lat, 0.5), 2) if lat else None,
            "latency_ms_p99": round(percentile(lat, 0.99), 2) if lat else None,
            "latency_ms_max": round(max(lat), 2) if lat else None,
            "post_ms_p50": round(percentile(self.post_ms, 0.5), 2) if self.post_ms else None,
            "post_ms_p99": round(percentile(self.post_ms, 0.99), 2) if self.post_ms else None,
            "raft_entries": applied_after - applied_before,
            "errors": self.post_errors,
            "nodes": {},
        }

    async def wait_online(self, http: httpx.AsyncClient, uids: list[str]) -> None:
        """Until the posting node's replicated presence shows every reader (so no early delta is missed)."""
        with trio.fail_after(30):
            while True:
                answer = await http.post("/user/onlinestatus", json=uids)
                if answer.status_code == 200 and len(answer.json()) >= len(uids):
                    return
                await trio.sleep(0.1)

    async def post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> bool:
        began = time.perf_counter()
        try:
            answer = await http.post(path, json=body)
        except httpx.HTTPError as exc:
            name = type(exc).__name__
            self.post_errors[name] = self.post_errors.get(name, 0) + 1
            return False
        self.post_ms.append((time.perf_counter() - began) * 1000)
        if answer.status_code != 200:
            name = f"http_{answer.status_code}"
            self.post_errors[name] = self.post_errors.get(name, 0) + 1
            return False
        return True

    async def post_stream(self, http: httpx.AsyncClient, stream: int) -> None:
        client_msg_no = f"sbench-{self.run_id}-{stream}"
        target = {"channel_id": self.reader_uid(stream), "channel_type": 1, "from_uid": f"sbot-{self.run_id}"}
        anchor = {**target, "client_msg_no": client_msg_no, "is_stream": 1, "payload": "e30="}
        if not await self.post(http, "/message/send", anchor):
            return
        interval = 1.0 / self.args.deltas_per_s
        # Staggered over one interval, so the streams' deltas do not all leave at the same instant.
        await trio.sleep(interval * stream / max(1, self.args.streams))
        next_at = trio.current_time()
        end_at = next_at + self.args.duration
        index = 0
        event = {**target, "client_msg_no": client_msg_no}
        while trio.current_time() < end_at:
            delta = {"kind": "text", "delta": f"{index}:{time.perf_counter():.6f} "}
            body = {**event, "event_id": f"d{index}", "event_type": "stream.delta", "payload": delta}
            if await self.post(http, "/message/event", body):
                self.posted += 1
            index += 1
            next_at += interval
            await trio.sleep_until(next_at)
        await self.post(
            http, "/message/event", {**event, "event_id": "finish", "event_type": "stream.finish"}
        )

    def on_event(self, stream: int, packet: Any) -> None:
        now = time.perf_counter()
        if packet.type == "stream.finish":
            self.finished += 1
            return
        if packet.type != "stream.delta":
            return
        delta = json.loads(packet.data)["payload"]["delta"]
        index_text, _, posted_at = delta.strip().partition(":")
        index = int(index_text)
        if index <= self.seen.get(stream, -1):
            self.out_of_order += 1
        self.seen[stream] = index
        self.delivered += 1
        self.latencies_ms.append((now - float(posted_at)) * 1000)
