"""Single-node figures against a running node: send→ack latency at low load, and pipelined acks/s.

    python -m node.bench --host 127.0.0.1 --port 5100 [--runs 5] [--pipeline 1000] [--samples 500]

Uses the project's own client with encryption on (as the SDKs use it). The full load generator with
fan-out, loss and duplicate accounting is `imnode bench` (a later issue); this measures the two figures the
core issue asks for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import trio

from node.client import open_client
from node.protocol import Reason


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def measure(
    host: str, port: int, runs: int, pipeline: int, samples: int, payload_bytes: int
) -> dict[str, object]:
    tag = uuid.uuid4().hex[:8]
    payload = b"x" * payload_bytes
    async with (
        open_client(host, port, f"bench-a-{tag}") as sender,
        open_client(host, port, f"bench-b-{tag}") as peer,
    ):
        latencies: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            ack = await sender.send(peer_uid := f"bench-b-{tag}", 1, payload)
            latencies.append((time.perf_counter() - started) * 1000)
            if ack.reason_code != Reason.SUCCESS:
                raise SystemExit(f"send failed with reason {ack.reason_code}")
            await peer.recv()
        rates: list[float] = []
        for _ in range(runs):
            started = time.perf_counter()
            acks = await sender.send_many([(peer_uid, 1, payload)] * pipeline, timeout_s=120)
            elapsed = time.perf_counter() - started
            if any(a.reason_code != Reason.SUCCESS for a in acks):
                raise SystemExit("a pipelined send failed")
            rates.append(pipeline / elapsed)
            for _ in range(pipeline):
                await peer.recv(timeout_s=60)
    return {
        "low_load_ack_p50_ms": round(statistics.median(latencies), 2),
        "low_load_ack_p99_ms": round(_percentile(latencies, 0.99), 2),
        "pipelined_sends": pipeline,
        "pipelined_acked_per_s_median": round(statistics.median(rates)),
        "pipelined_acked_per_s_runs": [round(r) for r in rates],
        "payload_bytes": payload_bytes,
        "encryption": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pipeline", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--payload", type=int, default=200)
    args = parser.parse_args()
    result = trio.run(measure, args.host, args.port, args.runs, args.pipeline, args.samples, args.payload)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
