"""The load generator behind `imnode bench` (see bench.py for what it reports and how it counts).

Kept apart from bench.py so the command line imports trio and the client only when a bench runs.

It shares the machine with the nodes it measures, so its own cost per message is kept low without
cutting corners: every SEND is encrypted and signed as the SDKs do, and every RECV has its msg_key checked
and its payload decrypted by the client before it is counted, and is acknowledged. What it saves is the
orchestration: no task, waiter or queue per message. Each sender fills its window with one write of
SENDs; each connection's reader task hands its SENDACKs and RECVs straight to the tally
(`Sender.on_sendack`, `Bench.on_recv`) and acknowledges a whole read's RECVs in one write.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.lowlevel

from node.client import Client, ClientError, open_client
from node.client.jsonrpc_client import JsonRpcClient, open_jsonrpc_client
from node.config import Config
from node.metrics import percentile
from node.tools import operator as op
from node.wire.protocol import Reason, Recv, Sendack

DRAIN_IDLE_S = 10.0  # after sending stops, wait for deliveries until none arrived for this long
DRAIN_MAX_S = 300.0
PROGRESS_EVERY_S = 1.0
SENDACK_TIMEOUT_S = 30.0


# What a bench client is: imnode's binary client, or the JSON-RPC light client (`--protocol jsonrpc`).
BenchClient = Client | JsonRpcClient


def reason_name(code: int) -> str:
    """The protocol's name of a reason code (`Reason` in node/wire/protocol.py), as errors are reported."""
    try:
        return Reason(code).name
    except ValueError:
        return f"REASON_{code}"


def disconnected_error(who: str, client: BenchClient) -> str:
    """`sender_disconnected` or `recipient_disconnected`, with the node's DISCONNECT reason if it sent one."""
    reason = client.disconnect_reason
    return who + "_disconnected" + ("" if reason is None else f":{reason_name(reason)}")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def difference(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def per_message_us(cpu_s: float | None, acked: int) -> float | None:
    return None if cpu_s is None or acked == 0 else round(cpu_s / acked * 1e6, 1)


@dataclass
class Tally:
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    duplicates: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    ack_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    # perf_counter of the last SENDACK and of the last first delivery: where a rate's time span ends
    last_ack_at: float = 0.0
    last_delivery_at: float = 0.0
    # (sender, counter) -> recipients that must get it; filled when acked
    expected: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    # (recipient, sender, counter) -> (message_id, seq) first seen
    seen: dict[tuple[int, int, int], tuple[int, int]] = field(default_factory=dict)


def make_payload(run: str, sender: int, counter: int, size: int) -> bytes:
    body = json.dumps({"b": run, "s": sender, "n": counter, "t": time.time_ns()}, separators=(",", ":"))
    pad = max(0, size - len(body) - 6)
    return (body[:-1] + ',"p":"' + "x" * pad + '"}').encode()


class Sender:
    """One sending client's account of its SENDs in flight: client_seq -> (counter, perf_counter at write).

    The client's reader calls `on_sendack` for each SENDACK; `room` wakes the sender once its window has
    space again (or the connection ended)."""

    def __init__(self, bench: Bench, index: int) -> None:
        self.bench = bench
        self.index = index
        self.recipients = bench.recipients(index)
        self.in_flight: dict[int, tuple[int, float]] = {}
        self.room = trio.Event()

    def on_sendack(self, ack: Sendack) -> None:
        entry = self.in_flight.pop(ack.client_seq, None)
        if entry is None:
            return  # counted as sendack_timeout already
        self.room.set()
        tally = self.bench.tally
        if ack.reason_code != Reason.SUCCESS:
            tally.errors[reason_name(ack.reason_code)] += 1
            return
        counter, started = entry
        tally.acked += 1
        tally.last_ack_at = now = time.perf_counter()
        tally.ack_ms.append((now - started) * 1000)
        tally.expected[(self.index, counter)] = self.recipients

    def fail_all(self, error: str) -> None:
        self.bench.tally.errors[error] += len(self.in_flight)
        self.in_flight.clear()

    def expire(self, now: float) -> float | None:
        """Count the sends unanswered for SENDACK_TIMEOUT_S; the time the oldest left expires (None: none)."""
        in_flight = self.in_flight
        while in_flight:
            seq, (_counter, started) = next(iter(in_flight.items()))  # the oldest: dicts keep write order
            if started + SENDACK_TIMEOUT_S > now:
                return started + SENDACK_TIMEOUT_S
            del in_flight[seq]
            self.bench.tally.errors["sendack_timeout"] += 1
        return None


class Bench:
    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.tally = Tally()
        self.stop_sending = trio.Event()
        self.drained = trio.Event()
        self.group = f"bench-{self.run_id}"
        self.stop_receiving = False
        self.senders = [Sender(self, index) for index in range(args.senders or args.clients)]

    def uid(self, index: int) -> str:
        return f"bench-{self.run_id}-{index}"

    def open(
        self,
        node_id: str,
        index: int,
        timeout_s: float,
        on_recv: Callable[[Recv], None] | None = None,
        on_sendack: Callable[[Sendack], None] | None = None,
    ) -> AbstractAsyncContextManager[BenchClient]:
        """Client `index` on `node_id`: binary on its TCP port (binary-ws: WebSocket), or JSON-RPC."""
        spec = self.config.node(node_id)
        if self.args.protocol == "jsonrpc":
            host, port = spec.ws.rsplit(":", 1)
            return open_jsonrpc_client(
                host, int(port), self.uid(index), timeout_s=timeout_s, on_recv=on_recv, on_sendack=on_sendack
            )
        websocket = self.args.protocol == "binary-ws"
        host, port = (spec.ws if websocket else spec.tcp).rsplit(":", 1)
        return open_client(
            host,
            int(port),
            self.uid(index),
            websocket=websocket,
            timeout_s=timeout_s,
            on_recv=on_recv,
            on_sendack=on_sendack,
        )

    def recipients(self, sender: int) -> set[int]:
        n = self.args.clients
        if self.args.mode == "person":
            return {(sender + 1) % n}
        return {i for i in range(min(self.args.group_size, n)) if i != sender}

    async def run(self) -> dict[str, Any]:
        if self.args.mode == "idle":
            return await self.run_idle()
        leader, members = op.members(self.config)
        nodes = [m for m in members if m in self.config.nodes]
        if self.args.mode == "group":
            size = min(self.args.group_size, self.args.clients)
            op.request(
                self.config,
                leader,
                "POST",
                "/channel",
                {
                    "channel_id": self.group,
                    "channel_type": 2,
                    "subscribers": [self.uid(i) for i in range(size)],
                },
                timeout_s=30,
            )
        # Counted from just before the first connect to after the drain, as ../shared/anchors counts CPU:
        # connecting, sending and draining all cost the machine the cluster runs on.
        before = self._node_cpu_s(self._statuses(nodes))
        own_before = own_cpu_s()
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            clients: list[BenchClient] = [None] * self.args.clients  # type: ignore[list-item]
            ready = trio.Semaphore(0)

            async def hold(index: int) -> None:
                node_id = nodes[index % len(nodes)]
                sender = self.senders[index] if index < len(self.senders) else None
                async with self.open(
                    node_id,
                    index,
                    30,
                    on_recv=lambda recv: self.on_recv(index, recv),
                    on_sendack=None if sender is None else sender.on_sendack,
                ) as client:
                    clients[index] = client
                    ready.release()
                    await client.disconnected.wait()
                    if sender is not None:
                        sender.room.set()  # a sender waiting for acks sees the end now
                    if not self.stop_receiving:
                        # Counted, because what this recipient then misses is reported as lost: a bench
                        # client too slow to read is disconnected by the node like any other.
                        self.tally.errors[disconnected_error("recipient", client)] += 1

            for index in range(self.args.clients):
                nursery.start_soon(hold, index)
            with trio.fail_after(60):
                for _ in range(self.args.clients):
                    await ready.acquire()
            began = time.perf_counter()
            async with trio.open_nursery() as watching:
                watching.start_soon(self._progress, began)
                async with trio.open_nursery() as senders:
                    for index, client in enumerate(clients[: self.args.senders or len(clients)]):
                        senders.start_soon(self._send, client, index, began + self.args.duration)
                    await trio.sleep(self.args.duration)
                    self.stop_sending.set()
                    sending_stopped = time.perf_counter()
                # Every send in flight has its SENDACK (or its timeout) here; deliveries may still be due.
                await self._drain()
                self.drained.set()
            drained = time.perf_counter()
            self.stop_receiving = True
            nursery.cancel_scope.cancel()
        own_cpu = own_cpu_s() - own_before
        statuses = self._statuses(nodes)
        after = self._node_cpu_s(statuses)
        node_cpu = {n: difference(before[n], after[n]) for n in nodes}
        phases = {
            "connect_s": began - started,
            "send_s": sending_stopped - began,
            "drain_s": drained - sending_stopped,
            "wall_s": time.perf_counter() - started,
        }
        return self._report(began, phases, statuses, node_cpu, own_cpu)

    async def _drain(self) -> None:
        """Wait for what is still due: an overloaded cluster still delivers its backlog; only what never
        arrives is lost. Ends when nothing is missing, or nothing arrived for DRAIN_IDLE_S."""
        with trio.move_on_after(DRAIN_MAX_S):
            last_count, last_change = self.tally.delivered, time.perf_counter()
            while self._missing() and time.perf_counter() - last_change < DRAIN_IDLE_S:
                await trio.sleep(0.1)
                if self.tally.delivered != last_count:
                    last_count, last_change = self.tally.delivered, time.perf_counter()

    def _statuses(self, nodes: list[str]) -> dict[str, dict[str, Any]]:
        return {n: op.node_status(self.config, n) or {} for n in nodes}

    @staticmethod
    def _node_cpu_s(statuses: dict[str, dict[str, Any]]) -> dict[str, float | None]:
        """Each node's process CPU seconds (utime + stime of every thread), None if it did not answer.

        The status rounds to 10 ms: a run of a few thousand messages carries a few µs of error per node."""
        return {n: s.get("process", {}).get("cpu_s") for n, s in statuses.items()}

    async def run_idle(self) -> dict[str, Any]:
        """Hold --clients connections open (with heartbeats) for --duration; report the nodes' memory."""
        _leader, members = op.members(self.config)
        nodes = [m for m in members if m in self.config.nodes]
        connected = 0
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)

            async def hold(index: int) -> None:
                nonlocal connected
                try:
                    async with self.open(nodes[index % len(nodes)], index, 120) as client:
                        connected += 1
                        ready.release()
                        while True:
                            await trio.sleep(self.args.ping_interval)
                            await client.ping(timeout_s=60)
                except ClientError as exc:
                    self.tally.errors[str(exc)[:60]] += 1
                    ready.release()

            for index in range(self.args.clients):
                nursery.start_soon(hold, index)
                if index % 200 == 199:
                    await trio.sleep(0.05)  # pace the handshakes a little
            for _ in range(self.args.clients):
                await ready.acquire()
            opened = time.perf_counter() - started
            if not self.args.json:
                print(
                    f"{connected} connections open after {opened:.1f}s; holding {self.args.duration}s",
                    file=sys.stderr,
                )
            await trio.sleep(self.args.duration)
            statuses = {n: op.node_status(self.config, n) or {} for n in nodes}
            nursery.cancel_scope.cancel()
        return {
            "mode": "idle",
            "protocol": self.args.protocol,
            "clients": self.args.clients,
            "connected": connected,
            "connect_s": round(opened, 2),
            "ping_interval_s": self.args.ping_interval,
            "errors": dict(self.tally.errors),
            "nodes": {
                n: {
                    "connections": s.get("connections"),
                    "peak_rss_mb": s.get("process", {}).get("peak_rss_mb"),
                    "cpu_s": s.get("process", {}).get("cpu_s"),
                }
                for n, s in statuses.items()
            },
        }

    def _missing(self) -> int:
        tally = self.tally
        return sum(
            1
            for (sender, counter), who in tally.expected.items()
            for r in who
            if (r, sender, counter) not in tally.seen
        )

    async def _send(self, client: BenchClient, index: int, deadline: float) -> None:
        target = self.group if self.args.mode == "group" else self.uid((index + 1) % self.args.clients)
        channel_type = 2 if self.args.mode == "group" else 1
        sender = self.senders[index]
        window = self.args.window
        sending = len(self.senders)
        per_client = None if self.args.rate == "max" else float(self.args.rate) / sending
        interval = 1.0 / per_client if per_client else 0.0
        # Senders start spread over one interval, so a fixed rate arrives evenly: in lockstep every sender
        # fired at the same instant, and `--rate 100` from 20 clients measured bursts of 20 (17 ms p50
        # where one message alone takes 3).
        next_at = time.perf_counter() + interval * index / sending
        if interval:
            with trio.move_on_after(max(0.0, next_at - time.perf_counter())):
                await self.stop_sending.wait()
        tally = self.tally
        run_id, size = self.run_id, self.args.payload
        counter = 0
        while not self.stop_sending.is_set() and not client.disconnected.is_set():
            free = window - len(sender.in_flight)
            if free <= 0:
                await self._wait_for_room(sender, client)
                continue
            # At --rate max the whole free window goes in one write; paced, one send per interval.
            count = 1 if interval else free
            items = []
            for _ in range(count):
                counter += 1
                items.append((target, channel_type, make_payload(run_id, index, counter, size)))
            seqs, frames = client.prepare_sends(items)
            started = time.perf_counter()
            first = counter - count + 1
            for offset, seq in enumerate(seqs):
                sender.in_flight[seq] = (first + offset, started)
            tally.sent += count
            try:
                if self.args.write_each:
                    for frame in frames:  # the nodes read them one by one, as from apps
                        await client.write_frames([frame])
                else:
                    await client.write_frames(frames)
            except ClientError:
                break  # counted below, with everything else in flight on this connection
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    with trio.move_on_after(delay):
                        await self.stop_sending.wait()
            else:
                await trio.lowlevel.checkpoint()
        # Every send in flight gets its SENDACK, its timeout, or the connection's end.
        while sender.in_flight and not client.disconnected.is_set():
            await self._wait_for_room(sender, client)
        if sender.in_flight:
            # A closed connection fails every send in flight on it at once.
            sender.fail_all(disconnected_error("sender", client))

    async def _wait_for_room(self, sender: Sender, client: BenchClient) -> None:
        """Until a SENDACK arrives, the connection ends, or the oldest send in flight times out."""
        sender.room = trio.Event()
        expires = sender.expire(time.perf_counter())
        if expires is None or client.disconnected.is_set():
            return
        with trio.move_on_after(max(0.0, expires - time.perf_counter())):
            await sender.room.wait()
        sender.expire(time.perf_counter())

    def on_recv(self, index: int, recv: Recv) -> None:
        """Count one RECV the client verified (msg_key) and decrypted: a delivery, a duplicate, or neither."""
        try:
            body = json.loads(recv.payload)
        except ValueError:
            return
        if not isinstance(body, dict) or body.get("b") != self.run_id:
            return
        tally = self.tally
        key = (index, int(body["s"]), int(body["n"]))
        ids = (recv.message_id, recv.message_seq)
        first = tally.seen.get(key)
        if first is None:
            tally.seen[key] = ids
            tally.delivered += 1
            tally.last_delivery_at = time.perf_counter()
            tally.e2e_ms.append((time.time_ns() - int(body["t"])) / 1e6)
        elif first != ids:
            tally.duplicates += 1  # the same send under another id or seq (a DUP resend keeps its id)

    @staticmethod
    def rate(count: int, last_at: float, began: float) -> int:
        """Per second, from the first send to the last event counted: the one definition of acked/s and
        delivered/s, in the live lines and the summary alike. A backlog delivered while draining counts,
        and so does the time it took; waiting after the last delivery does not."""
        return round(count / max(last_at - began, 1e-9)) if count else 0

    async def _progress(self, began: float) -> None:
        if self.args.json:
            return
        live = sys.stderr.isatty()
        while not self.drained.is_set():
            with trio.move_on_after(PROGRESS_EVERY_S):
                await self.drained.wait()
            t = self.tally
            phase = "draining" if self.stop_sending.is_set() else "sending"
            line = (
                f"{time.perf_counter() - began:5.1f}s {phase:8}  sent {t.sent}  "
                f"acked {t.acked} ({self.rate(t.acked, t.last_ack_at, began):,}/s)  "
                f"delivered {t.delivered} ({self.rate(t.delivered, t.last_delivery_at, began):,}/s)  "
                f"errors {sum(t.errors.values())}"
            )
            if live:  # one line rewritten in place
                print(f"\r{line}   ", end="", file=sys.stderr, flush=True)
            else:  # a file or a pipe: plain lines, one per report
                print(line, file=sys.stderr, flush=True)
        if live:
            print(file=sys.stderr)

    def _report(
        self,
        began: float,
        phases: dict[str, float],
        statuses: dict[str, dict[str, Any]],
        node_cpu: dict[str, float | None],
        own_cpu: float,
    ) -> dict[str, Any]:
        t = self.tally
        lost = self._missing()
        node_stats = {}
        for node_id, status in statuses.items():
            process = status.get("process", {})
            run_cpu = node_cpu[node_id]
            node_stats[node_id] = {
                "peak_rss_mb": process.get("peak_rss_mb"),
                "cpu_s": process.get("cpu_s"),
                "run_cpu_s": None if run_cpu is None else round(run_cpu, 2),
            }
        # The sum only when every node answered both times: a partial sum would look like a cheaper node.
        known = [cpu for cpu in node_cpu.values() if cpu is not None]
        node_cpu_s = sum(known) if len(known) == len(node_cpu) else None
        return {
            "mode": self.args.mode,
            "protocol": self.args.protocol,
            "clients": self.args.clients,
            "senders": self.args.senders or self.args.clients,
            "window": self.args.window,
            "write_each": self.args.write_each,
            "rate": self.args.rate,
            "payload_bytes": self.args.payload,
            **{name: round(seconds, 2) for name, seconds in phases.items() if name != "wall_s"},
            "sent": t.sent,
            "acked": t.acked,
            "acked_per_s": self.rate(t.acked, t.last_ack_at, began),
            "delivered": t.delivered,
            "delivered_per_s": self.rate(t.delivered, t.last_delivery_at, began),
            "ack_p50_ms": round(percentile(t.ack_ms, 0.50), 2),
            "ack_p99_ms": round(percentile(t.ack_ms, 0.99), 2),
            "e2e_p50_ms": round(percentile(t.e2e_ms, 0.50), 2),
            "e2e_p99_ms": round(percentile(t.e2e_ms, 0.99), 2),
            "errors": dict(t.errors.most_common()),
            "lost": lost,
            "duplicates": t.duplicates,
            "node_cpu_s": None if node_cpu_s is None else round(node_cpu_s, 2),
            "node_cpu_us_per_msg": per_message_us(node_cpu_s, t.acked),
            "node_cpu_us_per_msg_by_node": {n: per_message_us(cpu, t.acked) for n, cpu in node_cpu.items()},
            "bench_cpu_s": round(own_cpu, 2),
            "bench_cpu_us_per_msg": per_message_us(own_cpu, t.acked),
            "nodes": node_stats,
            "wall_s": round(phases["wall_s"], 2),
        }
