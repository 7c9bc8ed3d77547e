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
from history.backfill import ROWS_SCHEMA, BackfillError
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
_BATCH_ROWS = 20_000  # rows per Arrow batch a step yields (at most about)
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
_OUT = ROWS_SCHEMA


_SPARK_TYPES = {
    pa.int8(): "tinyint",
    pa.int16(): "smallint",
    pa.int64(): "bigint",
    pa.float32(): "float",
    pa.float64(): "double",
    pa.string(): "string",
    pa.binary(): "binary",
}


def _ddl(schema: pa.Schema) -> str:
    """A mapInArrow output schema in Spark's DDL."""
    return ", ".join(f"`{f.name}` {_SPARK_TYPES[f.type]}" for f in schema)


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
        # a Python worker that dies says where (a traceback, not "exited unexpectedly")
        .config("spark.python.worker.faulthandler.enabled", "true")
        .config("spark.sql.execution.pyspark.udf.faulthandler.enabled", "true")
    )
    if master.startswith("local"):  # everything on this machine, on the loopback interface
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (
            builder.config("spark.driver.memory", "6g")
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


_FOLD_COLS = ("gentity", "gkey", "t", "eid", "phase", "column", "at", "payload", "want", "want_key")
_SPEC_COLS = ("t", "eid", "phase", "column", "y", "route", "attempt", "ctx", "dead")


class _Items:
    """Step 2's output, filled row by row: fold items and row specs, each in its own columns."""

    __slots__ = ("fold", "specs")

    def __init__(self) -> None:
        self.fold: list[list[Any]] = [[] for _ in _FOLD_COLS]
        self.specs: list[list[Any]] = [[] for _ in _SPEC_COLS]

    def batch(self) -> pa.RecordBatch:
        n, m = len(self.fold[0]), len(self.specs[0])
        arrays = []
        for f in _ITEMS:
            if f.name == "kind":
                arrays.append(pa.array([0] * n + [1] * m, pa.int8()))
                continue
            head = (
                pa.array(self.fold[_FOLD_COLS.index(f.name)], f.type)
                if f.name in _FOLD_COLS
                else pa.nulls(n, f.type)
            )
            tail = (
                pa.array(self.specs[_SPEC_COLS.index(f.name)], f.type)
                if f.name in _SPEC_COLS
                else pa.nulls(m, f.type)
            )
            arrays.append(pa.concat_arrays([head, tail]))
        return pa.RecordBatch.from_arrays(arrays, schema=_ITEMS)


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
                    if len(out.fold[0]) >= _BATCH_ROWS:  # ~15 items an attempt: bounded batches
                        yield out.batch()
                        out = _Items()
                pending, current = [], pay[i]
            pending.append((t[i], eid[i], event[i]))
        yield out.batch()
    if pending:
        out = _Items()
        _payment(pending, out, increments)
        yield out.batch()


def _payment(events: list[tuple[int, str, bytes]], out: _Items, increments: dict[int, str]) -> None:
    """One payment's attempts (log order): each accepted attempt's updates, then each row's reads and spec."""
    gentity, gkey, t_, eid_, phase_, column_, at_, payload_, want_, want_key_ = out.fold
    checked = [check_event(e, lateness_s=_INF, max_future_s=_INF) for _, _, e in events]
    for (t, eid, _), a in zip(events, checked, strict=True):
        if not isinstance(a, Attempt):
            continue  # refused by the feature code: it changes nothing
        updates = aggregate_updates(a)
        k = len(updates) + 1
        gentity.append(_CARD.value)
        gkey.append(f"{a.fingerprint}|{a.merchant}")
        payload_.append(json.dumps(recent_entry(a)))
        for entity, key, inc in updates:
            gentity.append(entity.value)
            gkey.append(key)
            text = increments.get(id(inc))  # a few fixed sets (streams.features), serialized once
            if text is None:
                text = increments[id(inc)] = json.dumps(dict(inc))
            payload_.append(text)
        t_.extend([t] * k)
        eid_.extend([eid] * k)
        phase_.extend([_APPLY] * k)
        column_.extend([-1] * k)
        at_.extend([a.at] * k)
        want_.extend([None] * k)
        want_key_.extend([None] * k)
    parsed = [events_pb2.AttemptEvent.FromString(e).outcome for _, _, e in events]
    s_t, s_eid, s_phase, s_column, s_y, s_route, s_attempt, s_ctx, s_dead = out.specs
    for spec in payment_rows(parsed):
        t, eid, _ = events[spec.index]
        phase = _AFTER if spec.after else _BEFORE
        recorder = _Recorder()
        lookup_features(recorder, spec.attempt, [spec.route])
        card = card_key(spec.attempt)
        for entity, key in recorder.asked:
            if entity is _CARD_AMOUNT:  # derived from the card x merchant state: read there
                gentity.append(_CARD.value)
                gkey.append(card)
                payload_.append(key[len(card) + 1 :])
            else:
                gentity.append(entity.value)
                gkey.append(key)
                payload_.append(None)
            want_.append(entity.value)
            want_key_.append(key)
        k = len(recorder.asked)
        t_.extend([t] * k)
        eid_.extend([eid] * k)
        phase_.extend([phase] * k)
        column_.extend([spec.column] * k)
        at_.extend([None] * k)
        verdict = checked[spec.index]
        s_t.append(t)
        s_eid.append(eid)
        s_phase.append(phase)
        s_column.append(spec.column)
        s_y.append(spec.y)
        s_route.append(spec.route)
        s_attempt.append(spec.attempt.SerializeToString())
        s_ctx.append(json.dumps(spec.ctx))
        s_dead.append(None if isinstance(verdict, Attempt) or spec.after else verdict[0].value)


def _fold(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Step 3: over items sorted by entity key, then log order: each read's values."""
    increments: dict[str, Increments] = {}
    group: tuple[str, str] | None = None
    entity = _CARD
    state = EntityState()
    # The state's values as JSON, and its card x merchant x amount rows, until the next update: a
    # state is read more often than it changes (an issuer's between its declines).
    text: str | None = None
    amounts: dict[str, str] | None = None
    for b in batches:
        cols = _columns(b)
        gentity, gkey, t, eid, _phase, column, at, payload, want, want_key = cols  # _FOLD_COLS
        out: list[list[Any]] = [[] for _ in _READS]
        o_t, o_eid, o_col, o_kind, o_want, o_key, o_values, o_as_of = out[:8]
        for i in range(len(t)):
            g = (gentity[i], gkey[i])
            if g != group:
                group, entity, state = g, Entity(g[0]), EntityState()
                text = amounts = None
            if want[i] is None:  # an update
                text = amounts = None
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
            values: str | None = None
            if state.events:
                if payload[i] is not None:  # a card x merchant x amount row
                    if amounts is None:
                        amounts = {k: json.dumps(v) for k, v in card_amount_rows(state).items()}
                    values = amounts.get(payload[i])
                else:
                    if text is None:
                        text = json.dumps(evaluate(entity, state))
                    values = text
            o_t.append(t[i])
            o_eid.append(eid[i])
            o_col.append(column[i])
            o_kind.append(0)
            o_want.append(want[i])
            o_key.append(want_key[i])
            o_values.append(values)
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
        parsed: dict[str, dict[str, float]] = {}  # values by their JSON (the same rows recur)
        for b in batches:
            t, eid, column, kind, want, want_key, values, as_of, y, route, attempt, ctx, dead = _columns(b)
            out: list[list[Any]] = [[] for _ in _OUT]
            for i in range(len(t)):
                key = (t[i], eid[i], column[i])
                if key != row:
                    row, store = key, _Rows()
                if kind[i] == 0:
                    v = values[i]
                    if v is not None:
                        got = parsed.get(v)
                        if got is None:
                            if len(parsed) > 100_000:
                                parsed.clear()
                            got = parsed[v] = json.loads(v)
                        store.rows[(Entity(want[i]), want_key[i])] = FeatureRow(got, as_of[i])
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
            .persist(StorageLevel.DISK_ONLY)  # read twice (reads, specs); ~15 items per attempt
        )
        reads = (
            items.where(F.col("kind") == 0)
            .select(*_FOLD_COLS)
            .repartition(parts, "gentity", "gkey")
            .sortWithinPartitions("gentity", "gkey", "t", "eid", "phase", "column")
            .mapInArrow(_fold, _ddl(_READS))
        )
        specs = items.where(F.col("kind") == 1).select(
            *(
                F.col(f.name)
                if f.name in _ITEMS.names
                else F.lit(None).cast(_SPARK_TYPES[f.type]).alias(f.name)
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
