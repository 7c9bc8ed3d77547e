"""Day-partitioned Parquet of events: what `authopt log import` and `log export` write, training reads.

`DIR/attempts/day=YYYY-MM-DD/<source>.parquet`, one file per source (an imported file, an export
run) and UTC day, with three columns: `event_id`, `attempted_at` (timestamp, microseconds, UTC) and
`event` (the serialized `authopt.v1.AttemptEvent`: the one event model, not a copy of its fields).
Decisions (`authopt.v1.DecisionRecord`, exported from the decision log) lie the same way under
`DIR/decisions/`, with `decided_at` for their time and `<request_id>@<decided_at µs>` for their id.
A source's files are written to temporary names and renamed only when the source is complete,
replacing what an earlier run of the same source wrote, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from authopt.v1 import events_pb2

__all__ = [
    "SCHEMA",
    "SCHEMAS",
    "DayWriter",
    "Kind",
    "LogRecords",
    "day_of",
    "decision_id",
    "event_ids",
    "log_files",
    "read_decisions",
    "read_events",
    "read_records",
]

Kind = Literal["attempts", "decisions"]


def _schema(time_column: str) -> pa.Schema:
    return pa.schema(
        [("event_id", pa.string()), (time_column, pa.timestamp("us", tz="UTC")), ("event", pa.binary())]
    )


SCHEMAS: dict[str, pa.Schema] = {"attempts": _schema("attempted_at"), "decisions": _schema("decided_at")}
SCHEMA = SCHEMAS["attempts"]
_ROWS_PER_FLUSH = 65_536


_DAY_US = 86_400_000_000
_DAYS: dict[int, str] = {}


def day_of(at_us: int) -> str:
    """The UTC day of a time in epoch microseconds, "YYYY-MM-DD" (memoized per day)."""
    index = at_us // _DAY_US
    day = _DAYS.get(index)
    if day is None:
        day = _DAYS[index] = datetime.fromtimestamp(index * 86_400, UTC).strftime("%Y-%m-%d")
    return day


class DayWriter:
    """Writes one source's events into its day partitions (temporary until `commit`)."""

    def __init__(self, out_dir: Path, source: str, kind: Kind = "attempts") -> None:
        self._root = out_dir / kind
        self._schema = SCHEMAS[kind]
        self._source = source
        self._pending: dict[str, tuple[list[str], list[int], list[bytes]]] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._tables: dict[str, list[pa.Table]] = {}  # add_many's, per day, until written
        self._buffered = 0  # rows in _tables
        self._time_type = pa.timestamp("us", tz="UTC")

    def _tmp(self, day: str) -> Path:
        return self._root / f"day={day}" / f".{self._source}.parquet.tmp"

    def add(self, event_id: str, at_us: int, event: bytes) -> None:
        day = day_of(at_us)
        ids, times, events = self._pending.setdefault(day, ([], [], []))
        ids.append(event_id)
        times.append(at_us)
        events.append(event)
        if len(ids) >= _ROWS_PER_FLUSH:
            self._flush(day)

    def add_many(self, event_ids: pa.Array, at_us: npt.NDArray[np.int64], events: pa.BinaryArray) -> None:
        """Many events at once (ids and serialized events as Arrow arrays), kept per day as tables
        and written when a day has _ROWS_PER_FLUSH of them (fewer, larger row groups), or all days
        when four times that many are kept."""
        if not len(event_ids):
            return
        days = at_us // _DAY_US
        for index in np.unique(days).tolist():
            rows = np.flatnonzero(days == index)
            whole = len(rows) == len(event_ids)
            table = pa.table(
                [
                    event_ids if whole else event_ids.take(rows),
                    pa.array(at_us if whole else at_us[rows], self._time_type),
                    events if whole else events.take(rows),
                ],
                schema=self._schema,
            )
            day = day_of(index * _DAY_US)
            tables = self._tables.setdefault(day, [])
            tables.append(table)
            self._buffered += table.num_rows
            if sum(t.num_rows for t in tables) >= _ROWS_PER_FLUSH:
                self._write_tables(day)
        if self._buffered >= 4 * _ROWS_PER_FLUSH:  # many days each short of a flush: bounded memory
            for day in list(self._tables):
                self._write_tables(day)

    def _write_tables(self, day: str) -> None:
        tables = self._tables.pop(day, [])
        self._buffered -= sum(t.num_rows for t in tables)
        if tables:
            self._writer(day).write_table(pa.concat_tables(tables))

    def _writer(self, day: str) -> pq.ParquetWriter:
        writer = self._writers.get(day)
        if writer is None:
            path = self._tmp(day)
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self._writers[day] = pq.ParquetWriter(path, self._schema, compression="zstd")
        return writer

    def _flush(self, day: str) -> None:
        ids, times, events = self._pending.pop(day)
        self._writer(day).write_table(
            pa.table([ids, pa.array(times, self._time_type), events], schema=self._schema)
        )

    def commit(self) -> set[str]:
        """Publish the source's files (replacing an earlier import of it); returns the days written."""
        for day in list(self._pending):
            self._flush(day)
        for day in list(self._tables):
            self._write_tables(day)
        for writer in self._writers.values():
            writer.close()
        days = set(self._writers)
        for old in self._root.glob(f"day=*/{self._source}.parquet"):
            if old.parent.name.removeprefix("day=") not in days:
                old.unlink()  # a day the earlier import had and this one has not
        for day in days:
            os.replace(self._tmp(day), self._tmp(day).with_name(f"{self._source}.parquet"))
        return days

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.close()
        for day in self._writers:
            self._tmp(day).unlink(missing_ok=True)
        self._writers.clear()
        self._pending.clear()
        self._tables.clear()
        self._buffered = 0


def decision_id(record: events_pb2.DecisionRecord) -> str:
    """A decision's event id in the log: its request id and when it was decided."""
    return f"{record.request.request_id}@{record.decided_at.ToMicroseconds()}"


def log_files(out_dir: Path, kind: Kind = "attempts") -> list[Path]:
    """The Parquet files of the log's `kind` under `out_dir` (sorted; empty when there are none)."""
    return sorted((out_dir / kind).glob("day=*/*.parquet"))


def event_ids(out_dir: Path, kind: Kind, day: str) -> set[str]:
    """The event ids already stored for one UTC day ("YYYY-MM-DD")."""
    files = sorted((out_dir / kind / f"day={day}").glob("*.parquet"))
    if not files:
        return set()
    return set(pq.read_table(files, columns=["event_id"]).column("event_id").to_pylist())


@dataclass(frozen=True)
class LogRecords:
    """A log's events, serialized, in time order, each event id once."""

    records: list[bytes]
    times_us: list[int]  # each record's attempted_at, epoch microseconds
    duplicates: int  # events dropped because an earlier one (by time) had their event id
    event_ids: list[str] = field(default_factory=list)  # each record's event id (the log's column)


def read_records(out_dir: Path, kind: Kind = "attempts") -> LogRecords:
    """Every event of `kind` under `out_dir`, in time order (ties by event id), each event id once:
    two imports that overlap hold an event twice, and it is one event."""
    files = log_files(out_dir, kind)
    if not files:
        return LogRecords([], [], 0)
    schema = SCHEMAS[kind]
    time_column = schema.names[1]
    table = pq.read_table(files, schema=schema).sort_by(
        [(time_column, "ascending"), ("event_id", "ascending")]
    )
    ids = table.column("event_id").to_pylist()
    seen: set[str] = set()
    keep: list[bool] = []
    for event_id in ids:
        keep.append(event_id not in seen)
        seen.add(event_id)
    duplicates = len(ids) - len(seen)
    if duplicates:
        table = table.filter(pa.array(keep))
        ids = table.column("event_id").to_pylist()
    times = table.column(time_column).cast(pa.int64()).to_pylist()
    return LogRecords(table.column("event").to_pylist(), times, duplicates, ids)


def read_events(out_dir: Path) -> Iterator[events_pb2.AttemptEvent]:
    """Every event under `out_dir/attempts`, in time order (ties by event id)."""
    for raw in read_records(out_dir).records:
        yield events_pb2.AttemptEvent.FromString(raw)


def read_decisions(out_dir: Path) -> Iterator[events_pb2.DecisionRecord]:
    """Every decision under `out_dir/decisions`, in time order."""
    for raw in read_records(out_dir, "decisions").records:
        yield events_pb2.DecisionRecord.FromString(raw)
