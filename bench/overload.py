"""Goodput under overload: Recommend at a normal and a far too high number of calls in flight.

  python -m bench.overload [--client h2load|python] [--duration 8] [--inflight 16,1000]
                           [--connections 1] [--deadline-ms 50] [--max-in-flight N]

Starts the real server in its own process (`bench.servers recommend`: the bundled model, synthetic
route features so decisions come from the model; `--max-in-flight` sets its admission limit, 0 for
none), then for each in-flight level keeps that many calls going over one channel, each with a
`--deadline-ms` deadline, for `--duration` seconds, and prints: goodput (answers back within their
deadline, per second), the share answered, `DEADLINE_EXCEEDED` and other errors, and the answers'
decision sources (model vs shed to the fallback). The issue's target: goodput at 1,000 in flight
>= 0.5x goodput at 16. Only 127.0.0.1 is targeted; never fails on a timing.

`--client h2load` (the default when `h2load` is on PATH: Debian's nghttp2-client) is the issue's
measurement: one HTTP/2 connection, that many concurrent streams, each a gRPC Recommend with a
`grpc-timeout` header. h2load cannot read gRPC statuses (every answer is HTTP 200), so goodput is
taken from the server's own counters: decisions made minus answers finished after their deadline
(`authopt_late_answers_total`). The server runs with idempotency off (h2load sends one body; a
replayed request id would be answered from the cache, not decided). `--client python` keeps the
calls going from a grpc.aio client in this process, which saturates its own core near 1,000 calls
in flight (a finding in docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from authopt.v1 import optimizer_pb2, optimizer_pb2_grpc
from bench.servers import ROUTES
from model.artifacts import DEFAULT_MODEL_DIR
from streams.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


def _request(i: int) -> optimizer_pb2.RecommendRequest:
    from authopt.samples import sample_request

    return sample_request(f"ov-{i}", [(r, 150 + 10 * k, 5) for k, r in enumerate(ROUTES)])


async def _load(port: int, inflight: int, duration_s: float, deadline_s: float) -> dict[str, object]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
        outcomes: Counter[str] = Counter()
        sources: Counter[str] = Counter()
        counter = iter(range(10**9))
        end = time.monotonic() + duration_s

        async def one_at_a_time() -> None:
            while time.monotonic() < end:
                try:
                    resp = await stub.Recommend(_request(next(counter)), timeout=deadline_s)
                    outcomes["OK"] += 1
                    sources[optimizer_pb2.DecisionSource.Name(resp.decision_source)] += 1
                except grpc.aio.AioRpcError as err:
                    outcomes[err.code().name] += 1

        started = time.monotonic()
        await asyncio.gather(*(one_at_a_time() for _ in range(inflight)))
        took = time.monotonic() - started
    total = sum(outcomes.values())
    return {
        "inflight": inflight,
        "goodput": outcomes["OK"] / took,
        "answered": outcomes["OK"] / total if total else 0.0,
        "outcomes": dict(outcomes),
        "sources": dict(sources),
    }


def _h2load(
    port: int, inflight: int, duration_s: float, deadline_ms: float, body: Path, connections: int
) -> dict[str, object]:
    """h2load's run: `inflight` concurrent streams over `connections` connections for `duration_s` s."""
    connections = min(connections, inflight)
    cmd = [
        "h2load",
        f"-c{connections}",
        "-t1",
        f"-m{-(-inflight // connections)}",
        f"-D{duration_s:g}",
        "--warm-up-time=1",
        f"-d{body}",
        "-Hcontent-type: application/grpc",
        "-Hte: trailers",
        f"-Hgrpc-timeout: {int(deadline_ms)}m",
        f"http://127.0.0.1:{port}/authopt.v1.AuthorizationOptimizerService/Recommend",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {
        "inflight": inflight,
        "took": duration_s,
        "h2load_done": int(done.group(3)) if done else -1,
        "request_time_min_max_mean": lat.groups() if lat else None,
    }


def _grpc_body() -> bytes:
    """The bench request as one gRPC length-prefixed message (uncompressed)."""
    msg = _request(0).SerializeToString()
    return struct.pack(">BI", 0, len(msg)) + msg


def _server_counts(port: int) -> dict[str, float]:
    """The server's decisions by source and shed requests by reason, from its Prometheus endpoint."""
    import urllib.request

    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(
                ("authopt_decisions_total{", "authopt_shed_total{", "authopt_late_answers_total ")
            ):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--inflight", default="16,1000")
    parser.add_argument("--deadline-ms", type=float, default=50.0)
    parser.add_argument("--max-in-flight", type=int, default=None, help="the server's limit; 0: none")
    parser.add_argument("--connections", type=int, default=1, help="h2load: connections the streams share")
    parser.add_argument(
        "--client", choices=("h2load", "python"), default="h2load" if shutil.which("h2load") else "python"
    )
    args = parser.parse_args(argv)
    port = free_port()
    metrics = free_port()
    while metrics == port:  # two free ports, not the same one twice
        metrics = free_port()
    env = dict(os.environ)
    if args.max_in_flight is not None:
        env["AUTHOPT_SERVER_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    if args.client == "h2load":
        env["AUTHOPT_SERVER_IDEMPOTENCY_TTL_S"] = "0"
    body = Path(tempfile.mkdtemp()) / "recommend.grpc"
    body.write_bytes(_grpc_body())
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.servers",
            "recommend",
            "--port",
            str(port),
            "--model-dir",
            str(DEFAULT_MODEL_DIR),
            "--metrics-port",
            str(metrics),
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
        asyncio.run(_load(port, 4, 2.0, args.deadline_ms / 1000))  # warm up
        rows = []
        for n in args.inflight.split(","):
            before = _server_counts(metrics)
            if args.client == "h2load":
                row = _h2load(port, int(n), args.duration, args.deadline_ms, body, args.connections)
            else:
                row = asyncio.run(_load(port, int(n), args.duration, args.deadline_ms / 1000))
            after = _server_counts(metrics)
            row["server"] = counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            if args.client == "h2load":
                decided = sum(v for k, v in counts.items() if k.startswith("authopt_decisions_total"))
                late = counts.get("authopt_late_answers_total", 0.0)
                # h2load's warm-up second is in the server's counts too: divide by the whole span.
                span = float(row.pop("took")) + 1.0
                row["goodput"] = (decided - late) / span
                row["answered"] = (decided - late) / row["h2load_done"] if row["h2load_done"] > 0 else 0.0
            rows.append(row)
    finally:
        server.terminate()
        server.wait(10)
    base = rows[0]["goodput"]
    for r in rows:
        if args.client == "h2load":
            print(
                f"in flight {r['inflight']:>5}: goodput {r['goodput']:8,.0f}/s ({r['goodput'] / base:.2f}x) "
                f"[decided minus late, by the server's counters], h2load completed {r['h2load_done']:,} "
                f"streams, request time min/max/mean {r['request_time_min_max_mean']}; "
                f"the server's own counts: {r['server']}"
            )
            continue
        print(
            f"in flight {r['inflight']:>5}: goodput {r['goodput']:8,.0f}/s ({r['goodput'] / base:.2f}x), "
            f"answered {100 * r['answered']:.1f} %, {r['outcomes']}, sources {r['sources']}; "
            f"the server's own counts: {r['server']}"
        )


if __name__ == "__main__":
    main()
