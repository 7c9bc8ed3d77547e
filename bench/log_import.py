"""Throughput of `authopt log import` (history.imports) from Parquet and CSV, rows per second.

Writes a synthetic history in the public schema (docs/history.md) — 24 merchants, 4 routes, 5,000
cards, a third of the attempts declined, one row in a thousand bad — then imports it and prints the
rows per second (median of `--repeat` runs), of the columnar path (the default) and of the
row-by-row path beside it. The issue's target is 200,000 rows/s from Parquet on this 2-core machine.
`--logged` gives that share of the attempts the platform's candidates and propensity (each becomes a
decision record too).

    python -m bench.log_import [--rows 200000] [--repeat 3] [--logged 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from history import import_file


def history_table(rows: int, seed: int = 7, logged: float = 0.0) -> pa.Table:
    """A synthetic history of `rows` attempts over the last 30 days (`logged`: the share with the
    logging policy's candidates and propensity)."""
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1e6)
    at = now - rng.integers(3_600_000_000, 30 * 86_400_000_000, rows)
    declined = rng.random(rows) < 0.33
    currency = np.where(rng.random(rows) < 0.999, "EUR", "XYZ")  # one row in a thousand bad
    route = rng.integers(0, 4, rows)
    with_choice = rng.random(rows) < logged
    return pa.table(
        {
            "candidate_routes": pa.array(np.where(with_choice, "acq-0;acq-1;acq-2;acq-3", "")),
            "logging_propensity": pa.array(np.where(with_choice, 0.25, 0.0)),
            "time": pa.array(at, pa.timestamp("us", tz="UTC")),
            "payment_id": pa.array([f"pay-{i}" for i in range(rows)]),
            "attempt_number": pa.array(np.ones(rows, np.int64)),
            "merchant_id": pa.array([f"m-{k}" for k in rng.integers(0, 24, rows)]),
            "merchant_mcc": pa.array(["5411"] * rows),
            "merchant_country": pa.array(["DE"] * rows),
            "amount_minor": pa.array(rng.integers(100, 100_000, rows)),
            "currency": pa.array(currency),
            "card_bin": pa.array(["41111111"] * rows),
            "card_network": pa.array(["visa"] * rows),
            "card_funding": pa.array(["credit"] * rows),
            "issuer_country": pa.array(["DE"] * rows),
            "card_fingerprint": pa.array([f"fp-{k}" for k in rng.integers(0, 5000, rows)]),
            "channel": pa.array(["ecommerce"] * rows),
            "initiator": pa.array(["customer"] * rows),
            "route_id": pa.array([f"acq-{k}" for k in route]),
            "status": pa.array(np.where(declined, "declined", "approved")),
            "response_code": pa.array(np.where(declined, "51", "")),
            "latency_ms": pa.array(rng.integers(50, 900, rows)),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--logged", type=float, default=0.0, help="share of rows with a logged choice")
    args = parser.parse_args(argv)
    table = history_table(args.rows, logged=args.logged)
    with tempfile.TemporaryDirectory() as tmp:
        src = {"parquet": Path(tmp) / "h.parquet", "csv": Path(tmp) / "h.csv"}
        pq.write_table(table, src["parquet"])
        pacsv.write_csv(table, src["csv"])
        for fmt, path in src.items():
            medians = {}
            for columnar in (True, False):
                rates = []
                for r in range(args.repeat):  # the two paths alternate less than they would interleaved
                    summary = import_file(path, Path(tmp) / f"out-{fmt}-{columnar}-{r}", columnar=columnar)
                    rates.append(summary.rows / summary.seconds)
                medians[columnar] = statistics.median(rates)
                label = "columnar" if columnar else "row by row"
                each = ", ".join(f"{x:,.0f}" for x in rates)
                print(
                    f"{fmt:8} {label:10} {args.rows:,} rows: {medians[columnar]:,.0f} rows/s median of "
                    f"{args.repeat} ({each}); accepted {summary.accepted:,}, "
                    f"rejected {sum(summary.rejected.values()):,}, decisions {summary.decisions:,}"
                )
            print(f"{fmt:8} columnar / row by row: {medians[True] / medians[False]:.2f}x")


if __name__ == "__main__":
    main()
