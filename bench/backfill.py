"""Training-row backfill: attempts/s of the local replay and of Spark, by log size.

    python -m bench.backfill [--attempts 1000000,5000000] [--engines local,spark] [--master local[2]]
                             [--dir /tmp/authopt-backfill] [--json PATH]

For each size, a log of the default world's logging policy (`sim.emit.emit_log`) is written once as
day-partitioned Parquet under DIR (kept for the next run): one world of about a million attempts,
repeated in consecutive periods of its span with fresh ids when more are asked for (the same cards,
merchants and routes going on; its entities' cardinality does not grow past the first period). Then
each engine runs `history.backfill.backfill` on it in a fresh process (its own peak RSS: the local
engine's is the whole log in memory; Spark's driver RSS is printed, the JVM's heap is capped by
spark.driver.memory). Prints attempts/s and rows/s by wall clock, one line per run and a table at the
end. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_CHUNK = 1_000_000  # attempts of one world period


def _world_log(attempts: int, seed: int = 5) -> tuple[list[bytes], int]:
    """A default-world log of about `attempts` attempts (at most one period) and its span in µs."""
    from sim import World, load_world
    from sim.emit import emit_log
    from streams.replay import iter_records

    config = load_world("default")
    tc = config.traffic
    per_payment = 1.3  # attempts per payment in the default world's logging policy (measured)
    rate = min(attempts, _CHUNK) / per_payment / tc.hours
    world = World(
        config.model_copy(update={"traffic": tc.model_copy(update={"payments_per_hour": rate})}), seed
    )
    buffer = io.BytesIO()
    emit_log(world, buffer, seed=seed)
    records = list(iter_records(buffer.getvalue()))
    return records, int(tc.hours * 3600 * 1_000_000) + 86_400_000_000 * 31  # past its longest retry


def make_log(out: Path, attempts: int) -> int:
    """Write the log (if absent); returns its attempts."""
    from authopt.v1 import events_pb2
    from history.store import DayWriter, log_files

    marker = out / "attempts.count"
    if marker.exists() and log_files(out):
        return int(marker.read_text())
    records, span_us = _world_log(attempts)
    writer = DayWriter(out, "bench")
    n = 0
    period = 0
    while n < attempts:
        shift = period * span_us
        for raw in records:
            if n >= attempts:
                break
            e = events_pb2.AttemptEvent.FromString(raw)
            o = e.outcome
            if period:
                o.event_id = f"p{period}-{o.event_id}"
                o.request_id = f"p{period}-{o.request_id}"
                o.attempted_at.FromMicroseconds(o.attempted_at.ToMicroseconds() + shift)
                e.received_at.FromMicroseconds(e.received_at.ToMicroseconds() + shift)
                raw = e.SerializeToString()
            writer.add(o.event_id, o.attempted_at.ToMicroseconds(), raw)
            n += 1
        period += 1
        print(f"  log: {n:,} of {attempts:,} attempts written", file=sys.stderr, flush=True)
    writer.commit()
    marker.write_text(str(n))
    return n


def _run_one(args: argparse.Namespace) -> None:
    """In a fresh process: one engine on one log; prints one JSON line."""
    from history.backfill import backfill
    from sim import load_world

    costs = {r.id: int(r.cost_bps) for r in load_world("default").routes}
    out = Path(args.dir) / f"rows-{args.engine}-{args.attempts}"
    start = time.perf_counter()
    result = backfill(
        Path(args.log),
        out,
        costs,
        engine=args.engine,
        master=args.master,
        progress=lambda m: print(m, file=sys.stderr),
    )
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "engine": args.engine,
                "attempts": result.events,
                "rows": result.rows,
                "seconds": round(wall, 1),
                "attempts_per_s": round(result.events / wall),
                "rows_per_s": round(result.rows / wall),
                "rss_mib": round(rss),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attempts", default="1000000,5000000", help="comma-separated log sizes")
    parser.add_argument("--engines", default="local,spark")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--dir", default="/tmp/authopt-backfill")
    parser.add_argument("--json", help="append each run's figures to this JSON-lines file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.attempts = int(args.attempts)
        _run_one(args)
        return
    base = Path(args.dir)
    results: list[dict[str, Any]] = []
    print(f"cores: {os.cpu_count()}, load: {os.getloadavg()[0]:.2f}", flush=True)
    for size in (int(s) for s in args.attempts.split(",")):
        log = base / f"log-{size}"
        t = time.perf_counter()
        n = make_log(log, size)
        print(f"log of {n:,} attempts at {log} ({time.perf_counter() - t:.0f}s to make or find)", flush=True)
        for engine in args.engines.split(","):
            cmd = [
                sys.executable,
                "-m",
                "bench.backfill",
                "--one",
                "--attempts",
                str(size),
                "--log",
                str(log),
            ]
            cmd += ["--engine", engine, "--master", args.master, "--dir", str(base)]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                print(f"{engine} on {size:,}: failed (exit {done.returncode})", flush=True)
                results.append({"engine": engine, "attempts": size, "failed": done.returncode})
                continue
            row = json.loads(lines[-1])
            row["load"] = round(os.getloadavg()[0], 2)
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("\n| engine | attempts | rows | seconds | attempts/s | rows/s | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "failed" in r:
            print(f"| {r['engine']} | {r['attempts']:,} | failed (exit {r['failed']}) | | | | |")
        else:
            print(
                f"| {r['engine']} | {r['attempts']:,} | {r['rows']:,} | {r['seconds']} | "
                f"{r['attempts_per_s']:,} | {r['rows_per_s']:,} | {r['rss_mib']:,} |"
            )


if __name__ == "__main__":
    main()
