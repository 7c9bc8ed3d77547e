"""Memory per card held by a server's replica, and what `max_cards` bounds it to.

  python -m bench.card_memory [--cards 100000] [--max-cards N] [--events-per-card 1] [--rss]

Folds `--cards` card x merchant keys (bench.streams_load's synthetic events, `--events-per-card`
attempts each) through the worker's FeatureProcessor, then applies their snapshots to a
Materializer as the server's replica does (`--max-cards`: its limit; none: every card held) and
prints the memory it took per card held: Python allocations (tracemalloc), or with `--rss` the
process's resident set (tracemalloc off: its own bookkeeping would be counted). Never fails.
"""

from __future__ import annotations

import argparse
import gc
import random
import tracemalloc

from bench.streams_load import make_event
from streams.contract import Entity
from streams.processor import FeatureProcessor
from streams.replica import Materializer
from streams.store import InMemoryFeatureStore


def card_snapshots(cards: int, events_per_card: int) -> list[bytes]:
    """The worker's latest snapshot of each card x merchant key."""
    rng = random.Random(5)
    states: dict[bytes, bytes | None] = {}
    processor = FeatureProcessor(states)
    for start in range(0, cards, 5000):
        records = []
        for c in range(start, min(cards, start + 5000)):
            for k in range(events_per_card):
                ev = make_event(c * events_per_card + k, rng, 1_790_000_000.0 + c * 0.01 + k, f"mem-{c}")
                ev.outcome.attempt.merchant.id = f"m-{c % 2000}"  # one card x merchant key per card
                records.append(ev.SerializeToString())
        processor.process(0, records, states.__setitem__)
    return [v for k, v in states.items() if k.startswith(b"card_merchant:") and v]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cards", type=int, default=100_000, help="card x merchant keys applied")
    parser.add_argument("--max-cards", type=int, default=None, help="the Materializer's limit")
    parser.add_argument("--events-per-card", type=int, default=1, help="attempts behind each card")
    parser.add_argument("--rss", action="store_true", help="resident set instead of tracemalloc")
    args = parser.parse_args()
    snapshots = card_snapshots(args.cards, args.events_per_card)
    gc.collect()
    if not args.rss:
        tracemalloc.start()
    before = _rss() if args.rss else tracemalloc.get_traced_memory()[0]
    store = InMemoryFeatureStore()
    materializer = Materializer(store, max_cards=args.max_cards)
    for raw in snapshots:
        materializer.apply_bytes(raw)
    gc.collect()
    used = (_rss() if args.rss else tracemalloc.get_traced_memory()[0]) - before
    held = materializer.cards
    card_rows = sum(e in (Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT) for e, _ in store.rows())
    how = "RSS" if args.rss else "tracemalloc"
    print(
        f"{len(snapshots):,} cards applied, {held:,} held ({card_rows:,} card rows), "
        f"{materializer.evicted:,} evicted: {used / 2**20:,.1f} MiB, {used / max(held, 1):,.0f} bytes "
        f"per card held ({how}); {used / max(held, 1) * 1_000_000 / 2**20:,.0f} MiB per million"
    )


if __name__ == "__main__":
    main()
