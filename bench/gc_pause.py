"""The garbage collector's full-collection pause with N cards held by a server's feature replica.

  python -m bench.gc_pause [--cards 100000,300000]

Applies the worker's own snapshots of N card x merchant keys to a Materializer (as the server's
replica does; bench.card_memory makes them), after freezing what was built first, the store's
containers included (as `authopt serve` does once the server is built), and prints the objects
the collector tracks and the median of 7 full collections. A full collection pauses every request
being served, so it must not grow with the cards held.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from bench.card_memory import card_snapshots
from streams.replica import Materializer
from streams.store import InMemoryFeatureStore


def measure(cards: int) -> tuple[int, int, float]:
    snaps = card_snapshots(cards, 1)
    store = InMemoryFeatureStore()
    m = Materializer(store)
    gc.collect()
    gc.freeze()  # as `authopt serve` does once the server (its store included) is built
    for raw in snaps:
        m.apply_bytes(raw)
    del snaps
    gc.collect()
    tracked = len(gc.get_objects())
    pauses = []
    for _ in range(7):
        t0 = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - t0) * 1000)
    gc.unfreeze()
    return len(store), tracked, statistics.median(pauses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", default="100000,300000")
    args = parser.parse_args()
    for n in (int(x) for x in args.cards.split(",")):
        rows, tracked, pause = measure(n)
        print(f"{n:>9,} cards ({rows:,} rows): {tracked:,} objects tracked, full collection {pause:.1f} ms")


if __name__ == "__main__":
    main()
