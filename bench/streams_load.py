"""Streams worker throughput, feature freshness and state memory, on the local broker.

  python -m bench.streams_load [--events 50000] [--repeats 3] [--rate 1000] [--fresh-seconds 10]
                               [--keys 100000] [--json PATH]

Per repeat, on a fresh Tansu broker (127.0.0.1):
1. produces `--events` valid attempt events (10 routes; 400 BINs and 2,000 merchants with Zipf(1.1)
   volumes; a new card for every event, the worst case for per-card state) before any consumer runs;
2. full worker: starts `authopt worker` (all features, memory store) and a replica; throughput is
   events / time between the first and the last snapshot that reaches the replica;
3. bare agent: bench.bare_agent (counts records, nothing else) on the same topic, same broker,
   same accommodations; throughput from its first to its last record;
4. freshness: with the worker caught up, produces at `--rate` events/s for `--fresh-seconds`, each
   for a new card, and times send -> the card's row visible in the replica (p50, p99).
Then, in this process: memory of `--keys` card x merchant states in the worker's table (snapshot
bytes) and in a replica (merged states + rows), scaled to one million keys.
Prints medians over the repeats and the ratio full/bare measured in the same repeat. Never fails on
a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from authopt.v1 import events_pb2
from streams.broker import LocalBroker, start_broker, start_worker, stop_process
from streams.contract import Entity
from streams.kafka import ATTEMPTS_TOPIC, KafkaSettings
from streams.processor import FeatureProcessor
from streams.replica import FeatureReplica, Materializer
from streams.store import InMemoryFeatureStore

ROUTES = [f"acq-{i}" for i in range(10)]
_BINS = [f"4{i:05d}00" for i in range(400)]
_COUNTRIES = ["DE", "FR", "NL", "US"]


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


_BIN_W, _MERCHANT_W = _zipf_weights(len(_BINS)), _zipf_weights(2000)


def make_event(i: int, rng: random.Random, at: float, fingerprint: str) -> events_pb2.AttemptEvent:
    ev = events_pb2.AttemptEvent(producer="bench")
    o = ev.outcome
    o.event_id = f"bench-{i}"
    o.route_id = rng.choice(ROUTES)
    r = rng.random()
    o.status = 1 if r < 0.75 else (2 if r < 0.97 else 3)
    if o.status == 2:
        o.response_code = rng.choice(["51", "05", "91", "14", "57"])
    o.latency_ms = rng.randrange(40, 1500)
    o.attempted_at.FromMicroseconds(int(at * 1e6))
    ev.received_at.FromMicroseconds(int(at * 1e6))
    a = o.attempt
    a.merchant.id = f"m-{rng.choices(range(2000), _MERCHANT_W)[0]}"
    a.amount_minor = rng.choice([999, 1999, 4999, 12000])
    a.currency = "EUR"
    b = rng.choices(range(len(_BINS)), _BIN_W)[0]  # issuers' volumes are skewed: a few BINs dominate
    a.card.bin = _BINS[b]
    a.card.issuer_country = _COUNTRIES[b % len(_COUNTRIES)]
    a.card.fingerprint = fingerprint
    return ev


async def produce_all(bootstrap: str, events: list[events_pb2.AttemptEvent]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    await producer.start()
    try:
        pending = []
        for ev in events:
            key = ev.outcome.attempt.card.fingerprint.encode()
            pending.append(await producer.send(ATTEMPTS_TOPIC, ev.SerializeToString(), key=key))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def _route_events(replica: FeatureReplica) -> int:
    return sum(replica.materializer.events_for(Entity.ROUTE, r) for r in ROUTES)


async def full_worker_rate(
    broker: LocalBroker,
    n: int,
    logdir: Path,
    publish_interval_s: float = 0.1,
    env: dict[str, str] | None = None,
) -> tuple[float, FeatureReplica, Any, dict[str, float]]:
    first: dict[str, float] = {}
    replica = FeatureReplica(KafkaSettings.for_bootstrap(broker.bootstrap), InMemoryFeatureStore())
    seen: dict[str, float] = {}

    def on_apply(snap: events_pb2.FeatureSnapshot) -> None:
        if not first:
            first["t"] = time.perf_counter()
            first["n"] = _route_events(replica)
        if snap.entity == "card_merchant" and snap.key not in seen:
            seen[snap.key] = time.perf_counter()

    replica.materializer._on_apply = on_apply  # the replica builds its materializer itself
    replica.start()
    worker = start_worker(
        broker.bootstrap,
        logdir / "worker.log",
        env={
            "AUTHOPT_WORKER_STATS_INTERVAL_S": "5",
            "AUTHOPT_WORKER_PUBLISH_INTERVAL_S": str(publish_interval_s),
            **(env or {}),
        },
    )
    deadline = time.monotonic() + 600
    while _route_events(replica) < n:
        if time.monotonic() > deadline or worker.process.poll() is not None:
            raise RuntimeError(f"worker did not finish: see {logdir / 'worker.log'}")
        await asyncio.sleep(0.02)
    done = time.perf_counter()
    rate = (n - first["n"]) / (done - first["t"])
    return rate, replica, worker, seen


def bare_agent_rate(broker: LocalBroker, n: int, logdir: Path) -> float:
    out = logdir / "bare.json"
    env = {
        **os.environ,
        "AUTHOPT_KAFKA_BOOTSTRAP": broker.bootstrap,
        "BARE_EXPECT": str(n),
        "BARE_OUT": str(out),
    }
    with (logdir / "bare.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_agent"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"bare agent did not finish: see {logdir / 'bare.log'}")
            time.sleep(0.05)
    finally:
        stop_process(proc, 10)
    times = json.loads(out.read_text())
    return (n - 1) / (times["last"] - times["first"])


async def freshness(
    broker: LocalBroker, seen: dict[str, float], rate: float, seconds: float, start_index: int
) -> list[float]:
    rng = random.Random(99)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
    await producer.start()
    sent: dict[str, float] = {}
    try:
        total = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            fp = f"fresh-{i}"
            ev = make_event(start_index + i, rng, time.time(), fp)
            sent[f"{fp}|{ev.outcome.attempt.merchant.id}"] = time.perf_counter()
            await producer.send(ATTEMPTS_TOPIC, ev.SerializeToString(), key=fp.encode())
        await producer.flush()
    finally:
        await producer.stop()
    deadline = time.monotonic() + 30
    while any(k not in seen for k in sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    missing = sum(k not in seen for k in sent)
    if missing:
        print(f"  freshness: {missing} of {len(sent)} events not visible after 30 s", flush=True)
    return [seen[k] - t for k, t in sent.items() if k in seen]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def memory_per_million(keys: int) -> tuple[float, float]:
    rng = random.Random(5)
    records = [
        make_event(i, rng, 1_790_000_000.0 + i * 0.01, f"mem-{i}").SerializeToString() for i in range(keys)
    ]
    # Worker: its table holds one snapshot per key (memory store: a dict of bytes).
    states: dict[bytes, bytes | None] = {}
    processor = FeatureProcessor(states)
    for i in range(0, keys, 5000):
        processor.process(0, records[i : i + 5000], states.__setitem__)
    gc.collect()
    worker_bytes = sum(
        sys.getsizeof(k) + sys.getsizeof(v) for k, v in states.items() if k.startswith(b"card_merchant:")
    )
    worker_bytes += sys.getsizeof(states) * sum(k.startswith(b"card_merchant:") for k in states) / len(states)
    # Replica: merged state per (entity, key) partition, the card row and its amount row.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = InMemoryFeatureStore()
    materializer = Materializer(store)
    for k, v in states.items():
        if k.startswith(b"card_merchant:") and v:
            materializer.apply_bytes(v)
    gc.collect()
    replica_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    scale = 1_000_000 / keys
    return worker_bytes * scale, replica_bytes * scale


async def one_repeat(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    rng = random.Random(1)
    now = time.time()
    events = [
        make_event(i, rng, now - args.events * 0.001 + i * 0.001, f"card-{i}") for i in range(args.events)
    ]
    with start_broker() as broker:
        t = time.perf_counter()
        await produce_all(broker.bootstrap, events)
        print(f"  produced {args.events} events in {time.perf_counter() - t:.1f}s", flush=True)
        rate, replica, worker, seen = await full_worker_rate(
            broker, args.events, logdir, args.publish_interval
        )
        print(f"  full worker: {rate:,.0f} events/s", flush=True)
        try:
            lags = await freshness(broker, seen, args.rate, args.fresh_seconds, args.events)
            p50, p99 = _pct(lags, 0.5) * 1000, _pct(lags, 0.99) * 1000
            print(f"  freshness at {args.rate:g}/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms ({len(lags)} events)")
        finally:
            await replica.stop()
            worker.stop()
        bare = bare_agent_rate(broker, args.events, logdir)
        print(f"  bare agent: {bare:,.0f} events/s (ratio {rate / bare:.2f})", flush=True)
    out = {"full": rate, "bare": bare, "ratio": rate / bare, "fresh_p50_ms": p50, "fresh_p99_ms": p99}
    if args.online_store:  # the same events, a fresh broker, the worker also writing card rows
        with start_broker() as broker:
            await produce_all(broker.bootstrap, events)
            (logdir / "store").mkdir()
            env = {"AUTHOPT_WORKER_ONLINE_STORE": args.online_store}
            stored, replica, worker, _ = await full_worker_rate(
                broker, args.events, logdir / "store", args.publish_interval, env
            )
            await replica.stop()
            worker.stop()
        out["full_store"], out["store_ratio"] = stored, stored / rate
        print(f"  full worker + online store: {stored:,.0f} events/s ({stored / rate:.2f}x)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s for the freshness run")
    parser.add_argument("--fresh-seconds", type=float, default=10.0)
    parser.add_argument(
        "--publish-interval", type=float, default=0.1, help="the worker's AUTHOPT_WORKER_PUBLISH_INTERVAL_S"
    )
    parser.add_argument(
        "--keys", type=int, default=100_000, help="card x merchant keys for the memory figure"
    )
    parser.add_argument(
        "--online-store",
        metavar="URL",
        help="also time the full worker writing card rows to this redis:// store (a fresh broker)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="authopt-bench-") as tmp:
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}", flush=True)
            logdir = Path(tmp) / f"r{r}"
            logdir.mkdir()
            runs.append(asyncio.run(one_repeat(args, logdir)))
    worker_mb, replica_mb = (b / 2**20 for b in memory_per_million(args.keys))
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    print()
    print(
        f"streams worker, {args.events:,} events, publish interval {args.publish_interval:g}s,"
        f" median of {args.repeats} (2-core shared machine)"
    )
    print(f"  full worker (all features):  {med['full']:>8,.0f} attempts/s")
    print(f"  bare counting agent:         {med['bare']:>8,.0f} attempts/s")
    print(f"  ratio full / bare:           {med['ratio']:>8.2f}  (median of per-repeat ratios)")
    if args.online_store:
        print(f"  full + online store writes:  {med['full_store']:>8,.0f} attempts/s")
        print(f"  ratio with / without store:  {med['store_ratio']:>8.2f}  (median of per-repeat ratios)")
    fresh = f"p50 {med['fresh_p50_ms']:.0f} ms, p99 {med['fresh_p99_ms']:.0f} ms"
    print(f"  freshness at {args.rate:g}/s:       {fresh}")
    memory = f"worker table {worker_mb:,.0f} MiB, replica {replica_mb:,.0f} MiB"
    print(f"  memory per 1M card x merchant keys: {memory}")
    print(f"    (measured on {args.keys:,} keys with one attempt each, scaled linearly)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"runs": runs, "median": med, "worker_mib_per_m": worker_mb, "replica_mib_per_m": replica_mb}
            )
        )


if __name__ == "__main__":
    main()
