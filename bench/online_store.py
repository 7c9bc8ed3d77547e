"""The online store's figures (streams/online.py), against a real redis-server on 127.0.0.1.

  python -m bench.online_store [--rows 200000] [--duration 5] [--repeats 3] [--inflight 16]
                               [--replica-cards 200000] [--json PATH]

Starts its own redis-server (a free port, nothing persisted; Debian's redis-server or valkey-server
on the PATH), then:
1. store memory and write rate: writes `--rows` card x merchant rows as the worker writes them
   (each from a state folded from 8 attempts at 3 amounts), 2,000 per pipelined round trip; Redis's
   used_memory before and after gives bytes per row and per million; rows/s of the writes;
2. Recommend with the card's state in memory vs in Redis: `bench.servers recommend` (the bundled
   model) in turn with the bench card's rows in its in-memory store, and with them in Redis
   (AUTHOPT_SERVER_ONLINE_STORE, the process's LRU off so every decision asks Redis: the worst
   case); h2load over one connection at `--inflight` streams, `--repeats` runs of `--duration` s:
   median QPS, p50, p99, and p99(Redis) - p99(memory), measured in the same run;
3. a server's memory with card state out of process: a feature replica's Materializer applying
   `--replica-cards` card snapshots with the cards held (as without a store) and skipped (as with
   one), tracemalloc's peak in this process.
Prints the figures; never fails on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from authopt.v1 import events_pb2
from tests.events import card_state  # the project's test builders; bench runs from the repo root

CARD = ("fp-abc", "m-1")  # the bench request's card x merchant (authopt.samples)


def _redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise SystemExit("needs redis-server (Debian: redis-server) or valkey-server on the PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


async def store_memory(url: str, rows: int) -> dict[str, float]:
    from streams.online import OnlineStore, card_value

    store = OnlineStore(url, timeout_s=5.0)
    try:
        await store._cache.raw("flushdb")
        before = int((await store._cache.raw("info", "memory"))["used_memory"])
        now = time.time()
        template = card_state("fp-template", "m-0", now)
        value_sizes = []
        spent = 0.0
        chunk = 2000
        for start in range(0, rows, chunk):
            # A new state per row would time the folding; rows differ by key and by their as-of time.
            values = {}
            for i in range(start, min(rows, start + chunk)):
                template.as_of = now - i * 1e-3
                values[f"fp-{i:09d}|m-{i % 5000}"] = card_value(template)
            value_sizes.append(len(next(iter(values.values()))))
            t = time.perf_counter()
            await store.write_values(values)
            spent += time.perf_counter() - t
        after = int((await store._cache.raw("info", "memory"))["used_memory"])
        keys = int(await store._cache.raw("dbsize"))
    finally:
        await store.close()
    per_row = (after - before) / max(keys, 1)
    return {
        "rows": keys,
        "value_bytes": statistics.median(value_sizes),
        "bytes_per_row": per_row,
        "mib_per_million": per_row * 1e6 / 2**20,
        "write_rows_per_s": rows / spent,
    }


def replica_memory(cards: int) -> dict[str, float]:
    from streams.contract import Entity
    from streams.features import to_snapshot
    from streams.replica import Materializer
    from streams.store import InMemoryFeatureStore

    now = time.time()
    template = card_state("fp-template", "m-0", now)
    raws = [
        to_snapshot(Entity.CARD_MERCHANT, f"fp-{i:09d}|m-{i % 5000}", 0, template).SerializeToString()
        for i in range(cards)
    ]
    out: dict[str, float] = {}
    for keep in (True, False):
        tracemalloc.start()
        m = Materializer(InMemoryFeatureStore(), keep_cards=keep)
        for raw in raws:
            m.apply_bytes(raw)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["held_mib" if keep else "skipped_mib"] = peak / 2**20
        del m
    out["cards"] = cards
    # An aggregate key (route x BIN here; route x issuer, issuer and merchant are alike): held
    # decoded, as every replica holds every aggregate.
    from streams.processor import FeatureProcessor

    agg_states: dict[bytes, bytes | None] = {}
    FeatureProcessor(agg_states).process(0, [_event_bytes(now)], agg_states.__setitem__, [0], 0)
    route_bin = next(v for k, v in agg_states.items() if k.startswith(b"route_bin:") and v)
    snap = events_pb2.FeatureSnapshot.FromString(route_bin)
    raws = []
    for i in range(cards):
        snap.key = f"acq-{i % 10}|{i:08d}"
        raws.append(snap.SerializeToString())
    tracemalloc.start()
    m = Materializer(InMemoryFeatureStore())
    for raw in raws:
        m.apply_bytes(raw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["aggregate_mib_per_million"] = peak / 2**20 * 1e6 / cards
    out["card_mib_per_million"] = out["held_mib"] * 1e6 / cards
    return out


def _event_bytes(now: float) -> bytes:
    from tests.events import event

    return event("agg-0", now - 60, received_at=now).SerializeToString()


def recommend(url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from bench.recommend_load import _check_decision, _h2load, _request_body, _start
    from streams.online import OnlineStore

    async def put_card() -> None:
        store = OnlineStore(url)
        await store.write({"|".join(CARD): card_state(*CARD, time.time())})
        await store.close()

    asyncio.run(put_card())
    tmp = Path(tempfile.mkdtemp(prefix="bench-online-"))
    (tmp / "body.bin").write_bytes(_request_body())
    model_dir = Path(__file__).resolve().parent.parent / "model" / "artifacts"
    variants = {
        "card state in memory": (["--no-sdk", "--card-in-memory"], {}),
        "card state in Redis (LRU off)": (
            ["--no-sdk"],
            {"AUTHOPT_SERVER_ONLINE_STORE": url, "AUTHOPT_SERVER_ONLINE_STORE_CACHE_TTL_S": "0"},
        ),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (extra, env) in variants.items():
        proc, port = _start("recommend", model_dir, extra, env)
        try:
            source = _check_decision(port)
            runs = [
                _h2load(port, tmp / "body.bin", args.inflight, args.duration, tmp / "log.tsv")
                for _ in range(args.repeats)
            ]
        finally:
            proc.terminate()
            proc.wait(10)
        r = results[name] = {k: statistics.median(x[k] for x in runs) for k in ("qps", "p50_ms", "p99_ms")}
        print(
            f"  {name:30s} ({source}) in flight {args.inflight}: {r['qps']:.0f} req/s  "
            f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms",
            flush=True,
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--replica-cards", type=int, default=200_000)
    parser.add_argument("--skip-recommend", action="store_true", help="no servers (no h2load needed)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    proc, url = _redis()
    out: dict[str, Any] = {}
    try:
        out["store"] = s = asyncio.run(store_memory(url, args.rows))
        print(
            f"store: {s['rows']:,.0f} rows, value {s['value_bytes']:.0f} B, {s['bytes_per_row']:.0f} B/row "
            f"in Redis ({s['mib_per_million']:.0f} MiB per million); "
            f"writes {s['write_rows_per_s']:,.0f} rows/s "
            "(2,000 per round trip)",
            flush=True,
        )
        if not args.skip_recommend:
            out["recommend"] = r = recommend(url, args)
            mem, red = r["card state in memory"], r["card state in Redis (LRU off)"]
            print(
                f"Recommend p99 with Redis - in memory: {red['p99_ms'] - mem['p99_ms']:+.2f} ms; "
                f"QPS ratio {red['qps'] / mem['qps']:.2f}",
                flush=True,
            )
    finally:
        proc.kill()
        proc.wait()
    out["replica"] = m = replica_memory(args.replica_cards)
    print(
        f"replica: {m['cards']:,.0f} card snapshots applied: {m['held_mib']:.0f} MiB held in memory, "
        f"{m['skipped_mib']:.1f} MiB with the cards in the store ({m['card_mib_per_million']:.0f} MiB per "
        f"million cards held); an aggregate key: {m['aggregate_mib_per_million']:.0f} MiB per million",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
