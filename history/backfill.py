"""`authopt features backfill`: a log's point-in-time training rows, as Parquet, on one process or Spark.

Both engines give the rows `model.dataset.build_training_set` defines (a route row per attempt, a
retry row per decline retried after one of the retry head's delays), each from the features as they
stood just before its attempt (a retry row: just after), through the streams' own feature code:

- `local`: the log replayed in order in this process (`build_training_set`): every attempt of the
  log parsed and held in memory, one core;
- `spark`: the same fold, partitioned (history.spark): per entity, its events and the rows that
  read it, sorted by event time, folded with the worker's `EntityState` code; then each row's
  entity values joined back and encoded. It scales with the cluster's cores and holds no whole log
  anywhere.

The rows lie under `OUT` as Parquet (`ROWS_SCHEMA`), sorted by their attempt's time, event id and
column: the order `build_training_set` gives them, which the trainer's time split relies on.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from history.errors import HistoryError
from history.store import log_files, read_records
from model.dataset import DatasetSummary, build_training_set
from model.layout import DELAY_BUCKETS_S, INPUT_LAYOUT
from model.train import TrainingSet
from streams.features import Attempt
from streams.processor import check_event

__all__ = [
    "ROWS_SCHEMA",
    "BackfillError",
    "BackfillResult",
    "Engine",
    "Rows",
    "backfill",
    "read_rows",
    "summarize",
]

Engine = Literal["local", "spark"]

# One row per training row: its attempt's time (the log's `attempted_at`) and event id, its output
# column (0: route head; 1 + b: retry head, delay bucket b), label, inputs (float32, little-endian,
# len(INPUT_LAYOUT) of them) and, on a route row whose attempt the feature code refused, why
# (streams.processor.DeadReason: the row is there, its attempt changed no feature).
ROWS_SCHEMA = pa.schema(
    [
        ("at_us", pa.int64()),
        ("event_id", pa.string()),
        ("column", pa.int16()),
        ("y", pa.float32()),
        ("x", pa.binary()),
        ("dead", pa.string()),
    ]
)
_SORT = [("at_us", "ascending"), ("event_id", "ascending"), ("column", "ascending")]
_INF = float("inf")


class BackfillError(HistoryError):
    """The backfill cannot run (no log, no Spark or no Java); the message says what to do."""


@dataclass(frozen=True)
class BackfillResult:
    out: Path
    engine: Engine
    rows: int
    events: int
    duplicates: int  # events dropped by event id when reading the log
    seconds: float


@dataclass(frozen=True)
class Rows:
    """Training rows read back, in order, and where the time split falls."""

    data: TrainingSet
    at_us: np.ndarray  # each row's attempt time
    summary: DatasetSummary

    def split_row(self, holdout_us: int) -> int:
        """The first row of an attempt at or after `holdout_us` (all rows before it are older)."""
        return int(np.searchsorted(self.at_us, holdout_us, side="left"))


def backfill(
    log_dir: Path,
    out: Path,
    route_cost_bps: Mapping[str, int],
    *,
    engine: Engine = "local",
    master: str = "local[2]",
    partitions: int | None = None,
    spark_conf: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BackfillResult:
    """Write the training rows of the log under `log_dir` to `out` (replaced when it exists)."""
    say = progress or (lambda _msg: None)
    if not log_files(log_dir):
        raise BackfillError(
            f"{log_dir}: no attempts (expected day-partitioned Parquet under {log_dir / 'attempts'}, "
            "as `authopt log import` or `authopt log export` writes)"
        )
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if engine == "local":
        events, duplicates = _local(log_dir, tmp, route_cost_bps, say)
    elif engine == "spark":
        from history.spark import spark_rows

        events, duplicates = spark_rows(
            log_dir, tmp, route_cost_bps, master=master, partitions=partitions, conf=spark_conf, say=say
        )
    else:
        raise BackfillError(f"unknown engine {engine!r} (local or spark)")
    files = _row_files(tmp)
    table = pq.read_table(files, columns=["at_us", "event_id", "column", "y", "dead"]).sort_by(_SORT)
    result = BackfillResult(out, engine, table.num_rows, events, duplicates, time.perf_counter() - start)
    doc = {
        "engine": engine,
        "events": events,
        "duplicates_dropped": duplicates,
        "rows": table.num_rows,
        "seconds": round(result.seconds, 3),
        **summarize(table).as_dict(),
    }
    (tmp / "_summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result


def _local(
    log_dir: Path, out: Path, route_cost_bps: Mapping[str, int], say: Callable[[str], None]
) -> tuple[int, int]:
    log = read_records(log_dir)
    n = len(log.records)
    say(f"replaying {n:,} attempts in this process")
    step = max(1, n // 10)

    def tick(k: int) -> None:
        if k % step == 0:
            say(f"  {k:,} of {n:,} attempts")

    data, _ = build_training_set(log.records, route_cost_bps, progress=tick)
    first = np.cumsum(data.column == 0) - 1  # each row's attempt (a route row starts each)
    dead = [
        None if isinstance(c := check_event(r, lateness_s=_INF, max_future_s=_INF), Attempt) else c[0].value
        for r in log.records
    ]
    width = len(INPUT_LAYOUT) * 4
    x = data.x.astype("<f4", copy=False).tobytes()
    xs = pa.Array.from_buffers(
        pa.binary(),
        len(data.y),
        [None, pa.py_buffer(np.arange(0, len(data.y) + 1, dtype=np.int32) * width), pa.py_buffer(x)],
    )
    at = np.asarray(log.times_us, dtype=np.int64)
    table = pa.table(
        [
            pa.array(at[first]),
            pa.array(log.event_ids).take(pa.array(first)),
            pa.array(data.column.astype(np.int16)),
            pa.array(data.y),
            xs,
            pa.array(
                [
                    dead[e] if c == 0 else None
                    for e, c in zip(first.tolist(), data.column.tolist(), strict=True)
                ],
                pa.string(),
            ),
        ],
        schema=ROWS_SCHEMA,
    )
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-00000.parquet", compression="zstd")
    return n, log.duplicates


def _row_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.parquet"))


def read_rows(out: Path) -> Rows:
    """The rows `backfill` wrote to `out`, in order."""
    files = _row_files(out)
    if not files:
        raise BackfillError(f"{out}: no rows (run `authopt features backfill` first)")
    table = pq.read_table(files, schema=ROWS_SCHEMA).sort_by(_SORT)
    n = table.num_rows
    width = len(INPUT_LAYOUT)
    xs = table.column("x").combine_chunks()
    offsets = np.frombuffer(xs.buffers()[1], dtype=np.int32, count=n + 1, offset=xs.offset * 4)
    if n and not np.array_equal(np.diff(offsets), np.full(n, width * 4, dtype=np.int32)):
        raise BackfillError(f"{out}: rows of another input layout (expected {width} float32 inputs each)")
    data = np.frombuffer(xs.buffers()[2], dtype="<f4", count=n * width, offset=int(offsets[0]) if n else 0)
    column = table.column("column").to_numpy().astype(np.int64)
    y = table.column("y").to_numpy()
    at_us = table.column("at_us").to_numpy()
    training = TrainingSet(x=data.reshape(n, width).astype(np.float32, copy=False), column=column, y=y)
    return Rows(training, at_us, summarize(table))


def summarize(table: pa.Table) -> DatasetSummary:
    """What `build_training_set` reports of its rows, from the rows."""
    column = table.column("column").to_numpy()
    route = column == 0
    y = table.column("y").to_numpy()
    at = table.column("at_us").to_numpy()
    dead: dict[str, int] = {}
    for reason in table.column("dead").drop_null().to_pylist():
        dead[reason] = dead.get(reason, 0) + 1
    buckets = np.bincount(column[~route].astype(np.int64) - 1, minlength=len(DELAY_BUCKETS_S))
    events = int(route.sum())
    return DatasetSummary(
        events=events,
        route_rows=events,
        retry_rows=int((~route).sum()),
        retry_rows_by_bucket={b: int(k) for b, k in enumerate(buckets) if k},
        approved_share=float(y[route].mean()) if events else 0.0,
        dead_letters=dead,
        first_event_at=float(at[0]) / 1e6 if len(at) else 0.0,
        last_event_at=float(at[-1]) / 1e6 if len(at) else 0.0,
    )
