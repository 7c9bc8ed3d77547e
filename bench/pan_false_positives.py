"""How often does PAN detection refuse a numeric id that is not a card number? Prints a table.

Each population is a way platforms make numeric ids: epoch timestamps in four units, snowflake ids
in the layouts of Twitter, Discord, Instagram and Sonyflake (a millisecond or 10 ms clock since a
custom epoch, shifted over worker and sequence bits), and uniformly random 64-bit and 63-bit
integers. An id is drawn as an unseparated decimal run, the way it reaches a request's string
fields ("ov-6-<19 digits>"). Compared: `server.pan.is_card_number` (issuer ranges, lengths, Luhn)
against Luhn alone on 12-19 digits (the detection before 2026-12-05).

    python -m bench.pan_false_positives [--n 200000] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

from server.pan import MAX_PAN, MIN_PAN, is_card_number, luhn_ok

__all__ = ["POPULATIONS", "draw"]

_2000, _2036 = 946_684_800, 2_082_758_400  # epoch seconds
_2015 = 1_420_070_400


def _timestamp(scale: int) -> Callable[[random.Random], int]:
    return lambda rng: int(rng.uniform(_2000, _2036) * scale)


def _snowflake(epoch_s: float, tick_per_s: int, shift: int) -> Callable[[random.Random], int]:
    """Ids of `shift` low bits (worker, sequence) under a clock of `tick_per_s` ticks since `epoch_s`,
    minted between 2015 and 2036."""
    return lambda rng: (
        (int((rng.uniform(_2015, _2036) - epoch_s) * tick_per_s) << shift) | rng.getrandbits(shift)
    )


# name -> draw(rng) -> a non-negative integer id
POPULATIONS: dict[str, Callable[[random.Random], int]] = {
    "timestamp s (2000-2036)": _timestamp(1),
    "timestamp ms": _timestamp(10**3),
    "timestamp us": _timestamp(10**6),
    "timestamp ns": _timestamp(10**9),
    "snowflake Twitter (2015-2036)": _snowflake(1_288_834_974.657, 1000, 22),
    "snowflake Discord": _snowflake(_2015, 1000, 22),
    "snowflake Instagram": _snowflake(1_293_840_000, 1000, 23),
    "snowflake Sonyflake": _snowflake(1_409_529_600, 100, 24),
    "random 64-bit": lambda rng: rng.getrandbits(64),
    "random 63-bit": lambda rng: rng.getrandbits(63),
}


def draw(population: str, n: int, seed: int) -> list[str]:
    """`n` ids of `population` as decimal strings, reproducible by `seed`."""
    rng = random.Random(f"{population}/{seed}")
    make = POPULATIONS[population]
    return [str(make(rng)) for _ in range(n)]


def _luhn_only(digits: str) -> bool:
    return MIN_PAN <= len(digits) <= MAX_PAN and luhn_ok(digits)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="ids per population (default 200,000)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"{'population':32} {'ids':>9} {'refused':>9} {'rate':>8}   {'Luhn alone':>10}")
    total = refused_total = 0
    for name in POPULATIONS:
        ids = draw(name, args.n, args.seed)
        refused = sum(map(is_card_number, ids))
        luhn = sum(map(_luhn_only, ids))
        total += len(ids)
        refused_total += refused
        print(f"{name:32} {len(ids):>9,} {refused:>9,} {refused / len(ids):>8.3%}   {luhn / len(ids):>10.3%}")
    print(f"{'all':32} {total:>9,} {refused_total:>9,} {refused_total / total:>8.3%}")


if __name__ == "__main__":
    main()
