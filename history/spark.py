"""The Spark engine of `authopt features backfill` (history.backfill): the point-in-time fold, partitioned.

Every step is a `mapInArrow` over rows hash-partitioned by a key and sorted within the partition by
key and log order (a secondary sort): one Python call per batch of rows. (`applyInPandas` calls
Python once per group, and with groups of one to three rows, as payments and cards are, that call
costs more than the fold.)

1. The log's Parquet, each event id once (the earliest by time, as `history.store.read_records`).
2. Per payment (request id), its attempts in log order (time, then event id):
   `model.dataset.payment_rows` gives its training rows; each row records the entity keys it reads
   (`model.features.lookup_features` against a store that records them: the server's own keys), and
   each attempt the feature code accepts (`streams.processor.check_event`) the entity updates it
   makes (`streams.features.aggregate_updates`, `recent_entry`).
3. Per entity key, its updates and the reads of it, in log order; a route row reads just before its
   attempt, a retry row just after. The state folds with `EntityState` as the worker folds it, and
   each read gets what the server's store would hold then (`evaluate`, `card_amount_rows`; a card x
   merchant state passes through its snapshot after each attempt, as the worker's and the replica's
   do).
4. Per row, its values are encoded with `model.dataset.encode_in_context`: the server's inputs.

A cluster runs the same code on its executors: they need authopt installed (`authopt[spark]`, the
same version) and the log's files at the same path (a shared filesystem).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from authopt.v1 import attempt_pb2, events_pb2
from history.backfill import BackfillError
from history.store import log_files
from model.dataset import encode_in_context, payment_rows
from model.features import card_key, lookup_features
from model.layout import AttemptContext
from streams.contract import Entity
from streams.features import (
    Attempt,
    EntityState,
    Increments,
    Recent,
    aggregate_updates,
    card_amount_rows,
    evaluate,
    from_snapshot,
    recent_entry,
    to_snapshot,
)
from streams.processor import check_event
from streams.store import FeatureRow

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["MIN_JAVA", "ROWS_PER_PARTITION", "java_version", "spark_rows"]

MIN_JAVA = 17  # PySpark 4
ROWS_PER_PARTITION = 250_000  # log records per partition when none is given
_INF = float("inf")
_CARD = Entity.CARD_MERCHANT
_CARD_AMOUNT = Entity.CARD_MERCHANT_AMOUNT
_BEFORE, _APPLY, _AFTER = 0, 1, 2  # a route row's read, an attempt's update, a retry row's read

# Step 2's output: fold items (kind 0: an update or a read of the entity `gentity`/`gkey`) and row
# specs (kind 1), in one schema.
_ITEMS = pa.schema(
    [
        ("kind", pa.int8()),
        ("gentity", pa.string()),
        ("gkey", pa.string()),
        ("t", pa.int64()),
        ("eid", pa.string()),
        ("phase", pa.int8()),
        ("column", pa.int16()),
        ("at", pa.float64()),
        ("payload", pa.string()),
        ("want", pa.string()),
        ("want_key", pa.string()),
        ("y", pa.float32()),
        ("route", pa.string()),
        ("attempt", pa.binary()),
        ("ctx", pa.string()),
        ("dead", pa.string()),
    ]
)
# Step 3's output, and step 4's input with the row specs.
_READS = pa.schema(
    [
        ("t", pa.int64()),
        ("eid", pa.string()),
        ("column", pa.int16()),
        ("kind", pa.int8()),
        ("want", pa.string()),
        ("want_key", pa.string()),
        ("values", pa.string()),
        ("as_of", pa.float64()),
        ("y", pa.float32()),
        ("route", pa.string()),
        ("attempt", pa.binary()),
        ("ctx", pa.string()),
        ("dead", pa.string()),
    ]
)
_LOG = pa.schema([("t", pa.int64()), ("eid", pa.string()), ("event", pa.binary()), ("pay", pa.string())])
_OUT = pa.schema(
    [
        ("at_us", pa.int64()),
        ("event_id", pa.string()),
        ("column", pa.int16()),
        ("y", pa.float32()),
        ("x", pa.binary()),
        ("dead", pa.string()),
    ]
)


def _ddl(schema: pa.Schema) -> str:
    names = {
        pa.int8(): "tinyint",
        pa.int16(): "smallint",
        pa.int64(): "bigint",
        pa.float32(): "float",
        pa.float64(): "double",
        pa.string(): "string",
        pa.binary(): "binary",
    }
    return ", ".join(f"`{f.name}` {names[f.type]}" for f in schema)


def java_version() -> int | None:
    """The major version of the `java` Spark would start (JAVA_HOME's, else PATH's); None: none."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if m is None:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def _session(master: str, partitions: int, conf: Mapping[str, str]) -> tuple[SparkSession, bool]:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise BackfillError(
            "the Spark engine needs PySpark: pip install 'authopt[spark]' (or use --engine local)"
        ) from None
    active = SparkSession.getActiveSession()
    if active is None:
        version = java_version()
        if version is None or version < MIN_JAVA:
            found = "no java found" if version is None else f"found Java {version}"
            raise BackfillError(
                f"Spark needs Java {MIN_JAVA} or newer ({found}): install a JDK (Debian: "
                "openjdk-17-jre-headless; scripts/setup --dev does where it may) or set JAVA_HOME"
            )
    # Python workers run this interpreter (else `python3` from PATH, which may lack authopt).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName("authopt-backfill")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(partitions))
    )
    if master.startswith("local"):  # everything on this machine, on the loopback interface
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (
            builder.config("spark.driver.memory", "3g")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
        )
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    return spark, active is None


def _columns(batch: pa.RecordBatch) -> list[list[Any]]:
    return [c.to_pylist() for c in batch.columns]


def _batch(schema: pa.Schema, cols: list[list[Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(cols, schema, strict=True)], schema=schema
    )


def _with_payment(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Step 1: each event's payment (request id)."""
    for b in batches:
        t, eid, event = _columns(b)
        pay = [events_pb2.AttemptEvent.FromString(e).outcome.request_id for e in event]
        yield _batch(_LOG, [t, eid, event, pay])


class _Recorder:
    """A FeatureStore that has nothing and records what is asked of it."""

    __slots__ = ("asked",)

    def __init__(self) -> None:
        self.asked: list[tuple[Entity, str]] = []

    def get(self, entity: Entity, key: str) -> FeatureRow | None:
        self.asked.append((entity, key))
        return None


class _Items:
    """Columns of step 2's output, filled row by row."""

    __slots__ = ("cols",)

    def __init__(self) -> None:
        self.cols: list[list[Any]] = [[] for _ in _ITEMS]

    def add(
        self,
        kind: int,
        group: tuple[Entity, str] | None,
        t: int,
        eid: str,
        phase: int,
        column: int,
        at: float | None = None,
        payload: str | None = None,
        want: tuple[Entity, str] | None = None,
        spec: tuple[float, str, bytes, str, str | None] | None = None,  # y, route, attempt, ctx, dead
    ) -> None:
        values = (
            kind,
            *((group[0].value, group[1]) if group else (None, None)),
            t,
            eid,
            phase,
            column,
            at,
            payload,
            *((want[0].value, want[1]) if want else (None, None)),
            *(spec or (None,) * 5),
        )
        for col, value in zip(self.cols, values, strict=True):
            col.append(value)

    def batch(self) -> pa.RecordBatch:
        return _batch(_ITEMS, self.cols)


def _payments(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Step 2: over events sorted by payment, then log order: fold items and row specs."""
    increments: dict[int, str] = {}
    pending: list[tuple[int, str, bytes]] = []
    current: str | None = None
    for b in batches:
        out = _Items()
        t, eid, event, pay = _columns(b)
        for i in range(len(t)):
            if pay[i] != current:
                if pending:
                    _payment(pending, out, increments)
                pending, current = [], pay[i]
            pending.append((t[i], eid[i], event[i]))
        yield out.batch()
    if pending:
        out = _Items()
        _payment(pending, out, increments)
        yield out.batch()


def _payment(events: list[tuple[int, str, bytes]], out: _Items, increments: dict[int, str]) -> None:
    """One payment's attempts (log order): each accepted attempt's updates, then each row's reads and spec."""
    checked = [check_event(e, lateness_s=_INF, max_future_s=_INF) for _, _, e in events]
    for (t, eid, _), a in zip(events, checked, strict=True):
        if not isinstance(a, Attempt):
            continue  # refused by the feature code: it changes nothing
        out.add(
            0, (_CARD, f"{a.fingerprint}|{a.merchant}"), t, eid, _APPLY, -1, a.at, json.dumps(recent_entry(a))
        )
        for entity, key, inc in aggregate_updates(a):
            text = increments.get(id(inc))  # a few fixed sets (streams.features), serialized once
            if text is None:
                text = increments[id(inc)] = json.dumps(dict(inc))
            out.add(0, (entity, key), t, eid, _APPLY, -1, a.at, text)
    parsed = [events_pb2.AttemptEvent.FromString(e).outcome for _, _, e in events]
    for spec in payment_rows(parsed):
        t, eid, _ = events[spec.index]
        phase = _AFTER if spec.after else _BEFORE
        recorder = _Recorder()
        lookup_features(recorder, spec.attempt, [spec.route])
        card = card_key(spec.attempt)
        for entity, key in recorder.asked:
            if entity is _CARD_AMOUNT:  # derived from the card x merchant state: read there
                out.add(
                    0, (_CARD, card), t, eid, phase, spec.column, None, key[len(card) + 1 :], (entity, key)
                )
            else:
                out.add(0, (entity, key), t, eid, phase, spec.column, None, None, (entity, key))
        verdict = checked[spec.index]
        dead = None if isinstance(verdict, Attempt) or spec.after else verdict[0].value
        body = (spec.y, spec.route, spec.attempt.SerializeToString(), json.dumps(spec.ctx), dead)
        out.add(1, None, t, eid, phase, spec.column, spec=body)


def _fold(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Step 3: over items sorted by entity key, then log order: each read's values."""
    increments: dict[str, Increments] = {}
    group: tuple[str, str] | None = None
    entity = _CARD
    state = EntityState()
    for b in batches:
        cols = _columns(b)
        gentity, gkey, t, eid, column, at, payload, want, want_key = (
            cols[_ITEMS.get_field_index(n)]
            for n in ("gentity", "gkey", "t", "eid", "column", "at", "payload", "want", "want_key")
        )
        out: list[list[Any]] = [[] for _ in _READS]
        o_t, o_eid, o_col, o_kind, o_want, o_key, o_values, o_as_of = out[:8]
        for i in range(len(t)):
            g = (gentity[i], gkey[i])
            if g != group:
                group, entity, state = g, Entity(g[0]), EntityState()
            if want[i] is None:  # an update
                if entity is _CARD:
                    state.add_recent(Recent(*json.loads(payload[i])))
                    # as the worker writes it and the replica (and the next batch) reads it back
                    state = from_snapshot(to_snapshot(_CARD, g[1], 0, state))
                else:
                    inc = increments.get(payload[i])
                    if inc is None:
                        inc = increments[payload[i]] = Increments(json.loads(payload[i]))
                    state.add(at[i], inc)
                continue
            values: Mapping[str, float] | None = None
            if state.events:
                if payload[i] is not None:  # a card x merchant x amount row
                    values = card_amount_rows(state).get(payload[i])
                else:
                    values = evaluate(entity, state)
            o_t.append(t[i])
            o_eid.append(eid[i])
            o_col.append(column[i])
            o_kind.append(0)
            o_want.append(want[i])
            o_key.append(want_key[i])
            o_values.append(None if values is None else json.dumps(values))
            o_as_of.append(state.as_of)
        for col in out[8:]:
            col.extend([None] * len(o_t))
        yield _batch(_READS, out)


class _Rows:
    """The entity rows one training row reads (a FeatureStore)."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: dict[tuple[Entity, str], FeatureRow] = {}

    def get(self, entity: Entity, key: str) -> FeatureRow | None:
        return self.rows.get((entity, key))


def _encoder(
    route_cost_bps: Mapping[str, int],
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    costs = dict(route_cost_bps)

    def encode(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Step 4: over reads and specs sorted by row (its reads first): the rows' inputs."""
        store = _Rows()
        row: tuple[int, str, int] | None = None
        for b in batches:
            t, eid, column, kind, want, want_key, values, as_of, y, route, attempt, ctx, dead = _columns(b)
            out: list[list[Any]] = [[] for _ in _OUT]
            for i in range(len(t)):
                key = (t[i], eid[i], column[i])
                if key != row:
                    row, store = key, _Rows()
                if kind[i] == 0:
                    if values[i] is not None:
                        store.rows[(Entity(want[i]), want_key[i])] = FeatureRow(
                            json.loads(values[i]), as_of[i]
                        )
                    continue
                a = attempt_pb2.Attempt.FromString(attempt[i])
                x = encode_in_context(
                    store, a, AttemptContext(*json.loads(ctx[i])), [(route[i], costs.get(route[i], 0))]
                )
                for col, value in zip(
                    out, (t[i], eid[i], column[i], y[i], x.tobytes(), dead[i]), strict=True
                ):
                    col.append(value)
            yield _batch(_OUT, out)

    return encode


def spark_rows(
    log_dir: Path,
    out: Path,
    route_cost_bps: Mapping[str, int],
    *,
    master: str = "local[2]",
    partitions: int | None = None,
    conf: Mapping[str, str] | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> tuple[int, int]:
    """Write the rows of the log under `log_dir` to `out` on Spark; (events, duplicates dropped)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    files = [str(f.resolve()) for f in log_files(log_dir)]
    spark, created = _session(master, partitions or 2, conf or {})
    try:
        raw = spark.read.schema("event_id string, attempted_at timestamp, event binary").parquet(*files)
        total = raw.count()
        parts = partitions or max(2, min(4000, -(-total // ROWS_PER_PARTITION)))
        spark.conf.set("spark.sql.shuffle.partitions", str(parts))
        say(f"spark {spark.version} on {master}: {total:,} records in {len(files)} files, {parts} partitions")
        log = (
            raw.select(F.unix_micros("attempted_at").alias("t"), F.col("event_id").alias("eid"), "event")
            .groupBy("eid")
            .agg(F.min("t").alias("t"), F.min_by("event", "t").alias("event"))
            .select("t", "eid", "event")
            .mapInArrow(_with_payment, _ddl(_LOG))
        )
        items = (
            log.repartition(parts, "pay")
            .sortWithinPartitions("pay", "t", "eid")
            .mapInArrow(_payments, _ddl(_ITEMS))
            .persist(StorageLevel.MEMORY_AND_DISK)
        )
        reads = (
            items.where(F.col("kind") == 0)
            .repartition(parts, "gentity", "gkey")
            .sortWithinPartitions("gentity", "gkey", "t", "eid", "phase", "column")
            .mapInArrow(_fold, _ddl(_READS))
        )
        specs = items.where(F.col("kind") == 1).select(
            *(
                F.col(f.name)
                if f.name in _ITEMS.names
                else F.lit(None).cast(_ddl(pa.schema([f])).split()[1]).alias(f.name)
                for f in _READS
            )
        )
        rows = (
            reads.unionByName(specs)
            .repartition(parts, "t", "eid", "column")
            .sortWithinPartitions("t", "eid", "column", "kind")
            .mapInArrow(_encoder(route_cost_bps), _ddl(_OUT))
        )
        say("folding: each event id once, payments, entity states, encoding")
        rows.write.mode("overwrite").option("compression", "zstd").parquet(str(out))
        events = items.where((F.col("kind") == 1) & (F.col("column") == 0)).count()
        items.unpersist()
        return events, total - events
    finally:
        if created:
            spark.stop()
