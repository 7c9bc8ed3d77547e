"""`authopt features backfill`: the same point-in-time rows from the local replay and from Spark.

The Spark tests run PySpark `local[2]` on a real JVM (`scripts/setup --dev` installs both where it
may): skipped here without them, failed under CI, where a missing install step must not pass.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from authopt.v1 import attempt_pb2, events_pb2
from cli.main import main
from history.backfill import BackfillError, backfill, read_rows
from history.store import DayWriter, read_records
from model.dataset import build_training_set
from server.models import load_model_dir
from sim import World
from tests.test_history_train import tiny, world_events

COSTS = {"acq-a": 20, "acq-b": 25, "acq-c": 30}


def _write(out: Path, source: str, events: list[events_pb2.AttemptEvent]) -> None:
    writer = DayWriter(out, source)
    for e in events:
        writer.add(e.outcome.event_id, e.outcome.attempted_at.ToMicroseconds(), e.SerializeToString())
    writer.commit()


@pytest.fixture(scope="module")
def events() -> list[events_pb2.AttemptEvent]:
    """A world's events, some of them reported late (received an hour or more after the attempt)."""
    out = world_events(2)
    for e in out[3::11]:
        e.received_at.FromMicroseconds(e.outcome.attempted_at.ToMicroseconds() + 3_900_000_000)
    return out


def _log(tmp: Path, events: list[events_pb2.AttemptEvent]) -> Path:
    """The events, every seventh imported twice (a second source), one the feature code refuses."""
    log = tmp / "log"
    _write(log, "a", events)
    refused = events_pb2.AttemptEvent()
    refused.CopyFrom(events[5])
    refused.outcome.event_id = "refused-1"
    refused.outcome.attempt.card.fingerprint = ""  # MISSING_FIELD: a row, no feature change
    _write(log, "b", [*events[::7], refused])
    return log


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One local[2] session for the module (a backfill uses the active session and leaves it open)."""
    from history.spark import MIN_JAVA, java_version

    missing = None
    try:
        import pyspark  # noqa: F401
    except ImportError:
        missing = "pyspark not installed (pip install 'authopt[spark]'; scripts/setup --dev installs it)"
    else:
        version = java_version()
        if version is None or version < MIN_JAVA:
            missing = (
                f"no Java {MIN_JAVA}+ (Debian: openjdk-17-jre-headless; scripts/setup --dev installs it)"
            )
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    from history.spark import _session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PySpark's own deprecation notes at start
        session, _ = _session("local[2]", 2, {})
    yield session
    session.stop()


def test_local_rows_are_the_replays_rows(tmp_path: Path, events: list[events_pb2.AttemptEvent]) -> None:
    log = _log(tmp_path, events)
    result = backfill(log, tmp_path / "rows", COSTS)
    rows = read_rows(result.out)
    records = read_records(log)
    want, summary = build_training_set(records.records, COSTS)
    assert np.array_equal(rows.data.x, want.x) and np.array_equal(rows.data.y, want.y)
    assert np.array_equal(rows.data.column, want.column)
    assert result.events == len(events) + 1 and result.duplicates == len(events[::7])
    assert rows.summary.dead_letters == summary.dead_letters == {"MISSING_FIELD": 1}
    assert rows.summary.retry_rows_by_bucket == summary.retry_rows_by_bucket
    doc = json.loads((result.out / "_summary.json").read_text())
    assert doc["engine"] == "local" and doc["rows"] == len(want.y) == result.rows


@pytest.mark.slow
def test_spark_rows_equal_the_local_replays(
    tmp_path: Path, events: list[events_pb2.AttemptEvent], spark: Any
) -> None:
    """Late and duplicate events, a refused one: the Spark fold gives the local replay's rows, bit for bit."""
    log = _log(tmp_path, events)
    local = read_rows(backfill(log, tmp_path / "local", COSTS).out)
    result = backfill(log, tmp_path / "spark", COSTS, engine="spark", partitions=3)
    on_spark = read_rows(result.out)
    assert result.engine == "spark" and result.duplicates == len(events[::7])
    assert on_spark.data.x.shape == local.data.x.shape and len(local.data.y) > len(events)  # retry rows too
    assert np.array_equal(on_spark.at_us, local.at_us)
    assert np.array_equal(on_spark.data.column, local.data.column)
    assert np.array_equal(on_spark.data.y, local.data.y)
    np.testing.assert_array_equal(on_spark.data.x, local.data.x)
    assert on_spark.summary == local.summary


@pytest.mark.slow
def test_no_spark_row_sees_its_own_or_a_later_outcome(
    tmp_path: Path, events: list[events_pb2.AttemptEvent], spark: Any
) -> None:
    """Flip the outcome of one attempt: no row before it, and not its own route row, changes; later
    rows of the same card or route do (the fold is not blind)."""
    ordered = sorted(events, key=lambda e: (e.outcome.attempted_at.ToMicroseconds(), e.outcome.event_id))
    k = len(ordered) // 2
    flipped = [events_pb2.AttemptEvent() for _ in ordered]
    for f, e in zip(flipped, ordered, strict=True):
        f.CopyFrom(e)
    o = flipped[k].outcome
    o.status = (
        attempt_pb2.OUTCOME_STATUS_DECLINED
        if o.status == attempt_pb2.OUTCOME_STATUS_APPROVED
        else attempt_pb2.OUTCOME_STATUS_APPROVED
    )
    o.response_code = "05" if o.status == attempt_pb2.OUTCOME_STATUS_DECLINED else ""
    _write(tmp_path / "a", "a", ordered)
    _write(tmp_path / "b", "b", flipped)
    a = read_rows(backfill(tmp_path / "a", tmp_path / "ra", COSTS, engine="spark", partitions=2).out)
    b = read_rows(backfill(tmp_path / "b", tmp_path / "rb", COSTS, engine="spark", partitions=2).out)
    t_k = ordered[k].outcome.attempted_at.ToMicroseconds()
    upto = int(np.searchsorted(a.at_us, t_k, side="left")) + 1  # rows before k, and k's route row
    assert a.data.column[upto - 1] == 0 and a.at_us[upto - 1] == t_k
    np.testing.assert_array_equal(a.data.x[:upto], b.data.x[:upto])
    assert not np.array_equal(a.data.x[upto:], b.data.x[upto:])


def test_backfill_refuses_a_missing_log_and_an_unknown_engine(tmp_path: Path) -> None:
    with pytest.raises(BackfillError, match="no attempts"):
        backfill(tmp_path / "nothing", tmp_path / "rows", COSTS)
    _write(tmp_path / "log", "a", world_events(0.2))
    with pytest.raises(BackfillError, match="unknown engine 'dask'"):
        backfill(tmp_path / "log", tmp_path / "rows", COSTS, engine="dask")  # type: ignore[arg-type]
    assert not (tmp_path / "rows").exists()


def test_features_backfill_command(tmp_path: Path, events: list[events_pb2.AttemptEvent]) -> None:
    log = _log(tmp_path, events)
    routes = json.dumps([{"id": r, "cost_bps": c} for r, c in COSTS.items()])
    result = CliRunner().invoke(
        main, ["features", "backfill", "--log", str(log), "--out", str(tmp_path / "rows"), "--routes", routes]
    )
    assert result.exit_code == 0, result.output
    assert "rows" in result.output and "local" in result.output
    assert read_rows(tmp_path / "rows").summary.events == len(events) + 1
    missing = CliRunner().invoke(
        main,
        [
            "features",
            "backfill",
            "--log",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "r2"),
            "--routes",
            routes,
        ],
    )
    assert missing.exit_code != 0 and "no attempts" in missing.output


@pytest.mark.slow
def test_train_log_on_spark_gives_the_local_engines_model(tmp_path: Path, spark: Any) -> None:
    """`authopt train --log --engine spark`: the same rows, so the same seed gives the same model."""
    world = World(tiny(1), 11)
    routes = json.dumps(
        [{"id": r, "cost_bps": int(c)} for r, c in zip(world.route_ids, world.route_cost_bps, strict=True)]
    )
    _write(tmp_path / "log", "a", world_events(27, seed=11))
    manifests = {}
    for engine in ("local", "spark"):
        trained = CliRunner().invoke(
            main,
            [
                "train", "--log", str(tmp_path / "log"), "--routes", routes, "--engine", engine,
                "--out", str(tmp_path / engine), "--epochs", "2", "--hidden", "16", "--members", "1",
                "--version", "v", "--quiet",
            ],
        )  # fmt: skip
        assert trained.exit_code == 0, trained.output
        manifests[engine] = json.loads((tmp_path / engine / "v" / "manifest.json").read_text())
    local, on_spark = manifests["local"], manifests["spark"]
    assert on_spark["metrics"] == local["metrics"] and 0.5 < local["metrics"]["val_auc_route"] <= 1.0
    assert on_spark["data_summary"]["holdout"] == local["data_summary"]["holdout"]
    assert load_model_dir(tmp_path / "spark" / "v").version == "v"
