"""Recommend throughput against the number of server processes on one port (SO_REUSEPORT).

  python -m bench.serve_processes [--processes 1,2] [--connections 8] [--streams 4] [--duration 5]
                                  [--repeats 3]

For each count N: N `bench.servers recommend` processes (the bundled model, synthetic fresh route
features, as bench.recommend_load) bound to one port with AUTHOPT_SERVER_REUSE_PORT — what `authopt
serve --processes N` starts — then h2load over `--connections` connections (the kernel spreads
connections, not calls, over the processes) with `--streams` concurrent streams each, `--repeats`
runs of `--duration` s: median QPS and p99, and each process's RSS after the runs. On a machine with
fewer cores than processes + the load generator the figure says so, not the method.
Needs h2load (Debian: nghttp2-client). Only 127.0.0.1. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def _h2load(port: int, body: Path, connections: int, streams: int, duration: float) -> tuple[float, float]:
    log = body.with_name("log.tsv")
    log.unlink(missing_ok=True)
    cmd = [
        "h2load", "-c", str(connections), "-t", "1", "-m", str(streams), "-D", f"{duration:g}",
        "--warm-up-time", "1", "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", str(body), "--log-file", str(log),
        f"http://127.0.0.1:{port}/authopt.v1.AuthorizationOptimizerService/Recommend",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    qps = float(re.search(r"finished in [0-9.]+s, ([0-9.]+) req/s", out).group(1))  # type: ignore[union-attr]
    lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip())
    return qps, lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000


def main() -> None:
    from bench.recommend_load import _check_decision, _request_body
    from streams.broker import free_port

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-procs-"))
    body = tmp / "body.bin"
    body.write_bytes(_request_body())
    model_dir = ROOT / "model" / "artifacts"
    env = {**os.environ, "AUTHOPT_SERVER_REUSE_PORT": "true"}
    print(
        f"{os.cpu_count()} cores; h2load {args.connections} connections x {args.streams} streams", flush=True
    )
    rows = []
    for n in [int(x) for x in args.processes.split(",")]:
        port = free_port()
        procs = []
        for _ in range(n):
            p = subprocess.Popen(
                [sys.executable, "-m", "bench.servers", "recommend", "--port", str(port),
                 "--model-dir", str(model_dir), "--no-sdk"],
                cwd=ROOT, stdout=subprocess.PIPE, env=env,
            )  # fmt: skip
            assert p.stdout is not None
            if b"ready" not in p.stdout.readline():
                raise SystemExit("a server did not start")
            procs.append(p)
        try:
            source = _check_decision(port)
            runs = [
                _h2load(port, body, args.connections, args.streams, args.duration)
                for _ in range(args.repeats)
            ]
            time.sleep(0.2)
            rss = [_rss_mib(p.pid) for p in procs]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
        qps, p99 = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append((n, qps, p99, rss))
        mib = statistics.median(rss)
        print(f"  {n} process(es) ({source}): {qps:.0f} req/s, p99 {p99:.2f} ms, RSS/process {mib:.0f} MiB")
    base = rows[0][1]
    print("\n| processes | QPS | ratio to 1 | p99 ms | RSS per process MiB |\n|---:|---:|---:|---:|---:|")
    for n, qps, p99, rss in rows:
        print(f"| {n} | {qps:.0f} | {qps / base:.2f} | {p99:.2f} | {statistics.median(rss):.0f} |")


if __name__ == "__main__":
    main()
