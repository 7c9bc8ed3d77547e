"""Simulator log emission: attempts/s of sim.emit.emit_log (Logging policy, open loop, vectorized).

  python -m bench.sim_emit [--world default] [--seed 0] [--payments N] [--repeat 3] [--pin CPU] [--json PATH]

Builds the world and its payments once (`World.payments()` is the world's own cost, timed apart and
not in the rate), then per repeat times `emit_log` end to end: the policy's rounds, the outcomes, the
network rules, the serialization and writing the delimited log to a file in a temporary directory.
`--payments N` takes the first N payments, or, above the world's count, scales its
`traffic.payments_per_hour` until it has N.

One process, one thread of Python; numpy's element-wise kernels are single-threaded, so this is one
core's work whatever the CPU affinity says (printed; `--pin CPU` restricts it to one CPU). Prints the
median over the repeats of attempts/s by wall clock and by this process's CPU time (the two differ
when other processes share the cores: the load average is printed too), and bytes per event. Never
fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sim import World, load_world
from sim.config import WorldConfig
from sim.emit import EmitStats, emit_log


def build(world_name: str, seed: int, payments: int | None) -> tuple[World, list[Any], float]:
    config: WorldConfig = load_world(world_name)
    tc = config.traffic
    have = round(tc.payments_per_hour * tc.hours)
    if payments is not None and payments > have:
        traffic = tc.model_copy(update={"payments_per_hour": payments / tc.hours * 1.001})
        config = config.model_copy(update={"traffic": traffic})
    world = World(config, seed)
    t = time.perf_counter()
    pays = world.payments()
    took = time.perf_counter() - t
    return world, pays[:payments] if payments is not None else pays, took


def one_repeat(world: World, pays: list[Any], seed: int, path: Path) -> tuple[EmitStats, float]:
    cpu = time.process_time()
    with path.open("wb") as out:
        stats = emit_log(world, out, payments=pays, seed=seed)
    return stats, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default="default", help="built-in world name or TOML path")
    parser.add_argument("--seed", type=int, default=0, help="world seed (the policy's seed is the repeat)")
    parser.add_argument("--payments", type=int, default=None, help="payments to play (default: the world's)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pin", type=int, default=None, help="restrict this process to this CPU")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    affinity = sorted(os.sched_getaffinity(0))
    world, pays, payments_s = build(args.world, args.seed, args.payments)
    print(
        f"world {world.config.name!r} seed {args.seed}: {len(pays):,} payments"
        f" (World.payments() {payments_s:.2f}s, not counted below)",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="authopt-emit-") as tmp:
        for r in range(args.repeat):
            stats, cpu_s = one_repeat(world, pays, r, Path(tmp) / f"r{r}.log")
            runs.append(
                {
                    "attempts": stats.attempts,
                    "seconds": stats.seconds,
                    "cpu_seconds": cpu_s,
                    "attempts_per_s": stats.attempts / stats.seconds,
                    "attempts_per_cpu_s": stats.attempts / cpu_s if cpu_s > 0 else float("nan"),
                    "bytes_per_event": stats.bytes / max(1, stats.attempts),
                    "approved": stats.approved,
                    "by_status": stats.by_status,
                    "hot_payments": stats.hot_payments,
                    "limit_refusals": stats.limit_refusals,
                }
            )
            print(
                f"  repeat {r + 1}/{args.repeat}: {stats.attempts:,} attempts in {stats.seconds:.3f}s"
                f" ({runs[-1]['attempts_per_s']:,.0f}/s wall, {runs[-1]['attempts_per_cpu_s']:,.0f}/s CPU)",
                flush=True,
            )
    med = {
        k: statistics.median(run[k] for run in runs)
        for k in ("attempts", "seconds", "attempts_per_s", "attempts_per_cpu_s", "bytes_per_event")
    }
    load = os.getloadavg()
    last = runs[-1]
    print()
    print(f"emit_log, {len(pays):,} payments -> {med['attempts']:,.0f} attempts, median of {args.repeat}")
    print(f"  attempts/s (wall clock):     {med['attempts_per_s']:>10,.0f}")
    print(f"  attempts/s (process CPU):    {med['attempts_per_cpu_s']:>10,.0f}")
    print(f"  bytes per event (delimited): {med['bytes_per_event']:>10.1f}")
    print(f"  outcomes: {last['by_status']}; counter pass: {last['hot_payments']:,} payments,"
          f" {last['limit_refusals']:,} retries refused by the limits")  # fmt: skip
    print(
        f"  one process (numpy element-wise, single-threaded = one core); sched_getaffinity: "
        f"{len(affinity)} CPU(s) {affinity if len(affinity) <= 8 else ''}; "
        f"load average {load[0]:.2f} on {os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "affinity": affinity, "loadavg": load}))


if __name__ == "__main__":
    main()
