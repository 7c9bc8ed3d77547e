"""`authopt world history` → `authopt log import` → `authopt train --log`: a model from a log alone.

A world's history goes out through the public import schema and comes back as the same events; a log
trains a model that the server loads, with a time-based hold-out and a manifest that says what the
log held and which steps were skipped; a log that cannot train a sound model is refused, naming why.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from authopt.samples import sample_attempt
from authopt.v1 import attempt_pb2, events_pb2
from cli.main import main
from history import import_file, read_events
from history.store import DayWriter, read_records
from history.train import LogTrainConfig, LogTrainingRefused, holdout_start, min_span_s, train_log
from history.writer import write_history
from server.models import load_model_dir
from server.settings import RouteConfig
from sim import World, load_world
from sim.config import WorldConfig
from sim.emit import emit_log
from streams.replay import iter_records

ROUTES = [RouteConfig(id=r, cost_bps=20) for r in ("acq-a", "acq-b")]
START = datetime(2026, 11, 2, tzinfo=UTC)


def tiny(hours: float, per_hour: float = 300) -> WorldConfig:
    config = load_world("default")
    return config.model_copy(
        update={
            "traffic": config.traffic.model_copy(update={"payments_per_hour": per_hour, "hours": hours}),
            "cards": config.cards.model_copy(update={"count": 1500}),
        }
    )


def world_events(hours: float, seed: int = 7) -> list[events_pb2.AttemptEvent]:
    import io

    world = World(tiny(hours), seed)
    buffer = io.BytesIO()
    emit_log(world, buffer, payments=world.payments(), seed=seed)
    return [events_pb2.AttemptEvent.FromString(r) for r in iter_records(buffer.getvalue())]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_world_history_round_trips_through_the_import_schema(tmp_path: Path, suffix: str) -> None:
    events = world_events(2)
    path = tmp_path / f"history{suffix}"
    assert write_history(events, path) == len(events)
    summary = import_file(path, tmp_path / "log")
    assert summary.accepted == len(events) and not summary.rejected
    back = {e.outcome.event_id: e.outcome for e in read_events(tmp_path / "log")}
    assert len(back) == len(events)
    for e in events:
        want = e.outcome  # field for field, the one event model; times kept to the microsecond
        want.attempted_at.FromMicroseconds(want.attempted_at.ToMicroseconds())
        assert back[want.event_id] == want


def _log(tmp_path: Path, outcomes: list[attempt_pb2.AttemptOutcome]) -> Path:
    out = tmp_path / "log"
    writer = DayWriter(out, "test")
    for o in outcomes:
        event = events_pb2.AttemptEvent(outcome=o)
        writer.add(o.event_id, o.attempted_at.ToMicroseconds(), event.SerializeToString())
    writer.commit()
    return out


def _outcome(i: int, at: datetime, route: str, approved: bool) -> attempt_pb2.AttemptOutcome:
    o = attempt_pb2.AttemptOutcome(
        event_id=f"e-{i}",
        request_id=f"pay-{i}",
        route_id=route,
        status=attempt_pb2.OUTCOME_STATUS_APPROVED if approved else attempt_pb2.OUTCOME_STATUS_DECLINED,
        response_code="" if approved else "51",
        attempt=sample_attempt(),
    )
    o.attempted_at.FromDatetime(at)
    return o


def _synthetic(
    n: int, span: timedelta, *, routes: tuple[str, ...] = ("acq-a", "acq-b"), approve: int = 3
) -> list:
    step = span / max(n - 1, 1)
    return [_outcome(i, START + i * step, routes[i % len(routes)], i % approve != 0) for i in range(n)]


@pytest.mark.parametrize(
    ("outcomes", "routes", "message"),
    [
        ([], ROUTES, "no attempts"),
        (_synthetic(600, timedelta(days=2), approve=10**9), ROUTES, "one class only"),
        (_synthetic(600, timedelta(days=2), routes=("acq-a", "acq-x")), ROUTES, "acq-x \\(300 attempts"),
        (_synthetic(600, timedelta(days=2)), [], "no routes configured"),
        (
            _synthetic(600, timedelta(days=2), routes=("acq-a",) * 9 + ("acq-b",)),
            ROUTES,
            "acq-b \\(60 attempts",
        ),
        (_synthetic(600, timedelta(hours=20)), ROUTES, "spans 20.0 h, shorter than"),
    ],
    ids=["empty", "one-class", "unknown-route", "no-routes", "thin-route", "short-span"],
)
def test_a_log_that_cannot_train_is_refused_naming_why(
    tmp_path: Path, outcomes: list[attempt_pb2.AttemptOutcome], routes: list[RouteConfig], message: str
) -> None:
    log = _log(tmp_path, outcomes)
    with pytest.raises(LogTrainingRefused, match=message):
        train_log(log, tmp_path / "models", routes, LogTrainConfig(progress=False))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").glob("log-*"))


def test_the_shortest_log_is_the_longest_shared_feature_window() -> None:
    assert min_span_s() == 86_400  # the route and merchant rates' 24 h half-life


def test_the_holdout_is_the_newest_days() -> None:
    day = 86_400_000_000
    start = int(START.timestamp() * 1e6)
    # four days of 100 attempts each: the newest day holds 25 % -> held out from its start
    times = [start + d * day + k * 1_000_000 for d in range(4) for k in range(100)]
    assert holdout_start(times, 0.15) == start + 3 * day
    # two days, the newest holding 60 %: no day boundary holds 15-50 % -> the 85 % quantile by time
    times = [start + k for k in range(40)] + [start + day + k for k in range(60)]
    assert holdout_start(times, 0.15) == times[85]


def test_duplicate_events_across_imports_are_one_event(tmp_path: Path) -> None:
    outcomes = _synthetic(50, timedelta(hours=3))
    out = tmp_path / "log"
    for source in ("a", "b"):  # two overlapping imports of the same events
        writer = DayWriter(out, source)
        for o in outcomes:
            writer.add(
                o.event_id,
                o.attempted_at.ToMicroseconds(),
                events_pb2.AttemptEvent(outcome=o).SerializeToString(),
            )
        writer.commit()
    log = read_records(out)
    assert len(log.records) == 50 and log.duplicates == 50
    assert log.times_us == sorted(log.times_us)


@pytest.mark.slow
def test_train_log_through_the_public_schema_gives_a_model_the_server_loads(tmp_path: Path) -> None:
    history = tmp_path / "history.parquet"
    routes = tmp_path / "routes.json"
    runner = CliRunner()
    world = runner.invoke(
        main,
        ["world", "history", "default", "--out", str(history), "--hours", "0.5", "--routes-out", str(routes)],
    )
    assert world.exit_code == 0, world.output
    assert json.loads(routes.read_text())[0] == {"id": "acq-us", "cost_bps": 18, "fixed_fee_minor": 8}
    # the history trained on: a smaller world (fewer payments an hour) over more than a day, its routes
    # the same as the command's default world's
    events = world_events(27, seed=11)
    write_history(events, history)
    imported = runner.invoke(main, ["log", "import", str(history), "--out", str(tmp_path / "log"), "--quiet"])
    assert imported.exit_code == 0, imported.output
    trained = runner.invoke(
        main,
        [
            "train", "--log", str(tmp_path / "log"), "--routes", str(routes),
            "--out", str(tmp_path / "models"), "--epochs", "2", "--hidden", "16", "--members", "1",
            "--version", "from-log", "--quiet",
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    version = tmp_path / "models" / "from-log"
    manifest = json.loads((version / "manifest.json").read_text())
    info = manifest["data_summary"]
    assert info["source"] == "log" and info["log"]["attempts"] == len(events)
    assert set(info["log"]["attempts_by_route"]) <= {r["id"] for r in json.loads(routes.read_text())}
    assert 0 < info["log"]["approved_share"] < 1
    assert info["holdout"]["rows"] > 0 and info["holdout"]["train_rows"] > info["holdout"]["rows"]
    assert set(info["skipped"]) == {"onpolicy_refit", "selection_correction"}
    assert 0.5 < manifest["metrics"]["val_auc_route"] <= 1.0
    assert load_model_dir(version).version == "from-log"  # the server's checks: contract, layout


def test_train_log_refuses_world_options_and_bad_routes(tmp_path: Path) -> None:
    log = _log(tmp_path, _synthetic(10, timedelta(hours=1)))
    runner = CliRunner()
    clash = runner.invoke(main, ["train", "--log", str(log), "--out", str(tmp_path / "m"), "--hours", "5"])
    assert clash.exit_code == 2 and "--hours simulate a world" in clash.output
    days = runner.invoke(
        main, ["train", "--log", str(log), "--out", str(tmp_path / "m"), "--selection-days", "6"]
    )
    assert days.exit_code == 2 and "--selection-days simulate a world" in days.output
    bad = runner.invoke(
        main, ["train", "--log", str(log), "--out", str(tmp_path / "m"), "--routes", '[{"id": 3}]']
    )
    assert bad.exit_code == 2 and "--routes" in bad.output
    refused = runner.invoke(
        main, ["train", "--log", str(log), "--out", str(tmp_path / "m"), "--routes", '[{"id": "acq-a"}]']
    )
    assert refused.exit_code == 1 and "does not know: acq-b" in refused.output


@pytest.mark.slow
def test_evaluate_on_a_log_and_promote_through_the_gate(tmp_path: Path) -> None:
    """A tiny world's history with the logging policy's propensities → import → a model trained on
    it, evaluated off-policy against an untrained net; the gate promotes neither blindly."""
    from model import make_tiny_artifact
    from sim.emit import logging_choices

    world = World(tiny(27), 11)
    buffer = io.BytesIO()
    payments = world.payments()
    emit_log(world, buffer, payments=payments, seed=11)
    events = [events_pb2.AttemptEvent.FromString(r) for r in iter_records(buffer.getvalue())]
    history = tmp_path / "history.parquet"
    write_history(events, history, logging_choices(world, payments, events))
    routes = json.dumps(
        [
            {"id": r.id, "cost_bps": r.cost_bps, "fixed_fee_minor": r.fixed_fee_minor}
            for r in world.config.routes
        ]
    )
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["log", "import", str(history), "--out", str(tmp_path / "log"), "--quiet"]
        ).exit_code
        == 0
    )
    models = tmp_path / "models"
    trained = runner.invoke(
        main,
        ["train", "--log", str(tmp_path / "log"), "--routes", routes, "--out", str(models), "--epochs", "3",
         "--hidden", "32", "--members", "1", "--version", "trained", "--quiet"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    manifest = json.loads((models / "trained" / "manifest.json").read_text())
    fit = manifest["data_summary"]["selection"]  # fitted off-policy from the imported decisions ...
    assert fit["logged_decisions"] > 0 and not fit["applied"]  # ... a platform's routing: not applied
    assert "selection_correction" in manifest["data_summary"]["skipped"] and not manifest.get(
        "route_selection"
    )
    make_tiny_artifact(models, "untrained", seed=5)

    evaluated = runner.invoke(
        main,
        ["evaluate", "--log", str(tmp_path / "log"), "--model", str(models / "trained"), "--champion",
         str(models / "untrained"), "--routes", routes, "--out", str(tmp_path / "ope")],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    doc = json.loads((tmp_path / "ope" / "ope.json").read_text())
    assert (
        doc["window_from"]
        == json.loads((models / "trained" / "manifest.json").read_text())["data_summary"]["holdout"]["from"]
    )
    logged = [e.outcome for e in events if e.outcome.attempt.attempt_number == 1]
    assert 0 < doc["decisions"] < len(logged)  # the hold-out days' first attempts
    for role in ("candidate", "champion"):
        value = doc["policies"][role]
        assert set(value["approval"]) == {"dm", "ips", "snips", "dr"}
        assert 0 < value["ess"] <= value["rows_weighted"] == doc["decisions"]
        dr = value["approval"]["dr"]
        assert dr["low"] <= dr["value"] <= dr["high"]
        assert doc["rules"][role]["violations"] == 0 and doc["rules"][role]["declines"] > 0
    assert doc["uplift"]["approval"]["value"] > 0  # a trained model routes better than a random net
    assert (tmp_path / "ope" / "report.md").read_text().count("| candidate `trained` |") == 2

    # the untrained net, promoted over the trained one, is refused, naming the condition
    promoted = runner.invoke(
        main,
        ["model", "promote", "trained", "--models", str(models), "--log", str(tmp_path / "log"), "--routes",
         routes, "--force", "--reason", "first model"],
    )  # fmt: skip
    assert promoted.exit_code == 0, promoted.output
    refused = runner.invoke(
        main,
        ["model", "promote", "untrained", "--models", str(models), "--log", str(tmp_path / "log"), "--routes",
         routes, "--since", doc["window_from"][:10]],
    )  # fmt: skip
    assert refused.exit_code == 1 and "FAIL uplift" in refused.output and "not promoted" in refused.output
    assert (models / "CURRENT").read_text().strip() == "trained"


@pytest.mark.slow
@pytest.mark.timeout(180)  # about a minute alone on this 2-core machine
def test_a_served_models_log_is_read_as_its_own_routing(tmp_path: Path) -> None:
    """`authopt world served` writes a served model's attempts and decision records as `log export`
    does; each first attempt joins its decision, with the server's propensities; `train --log` reads
    them as that model's own routing and applies the selection correction fitted on them."""
    from history.ope import collect
    from history.store import read_decisions
    from model.artifacts import DEFAULT_MODEL_DIR
    from sim.served import served_log
    from streams.decisions import join_decisions

    runner = CliRunner()
    served = tmp_path / "served"
    argv = ["world", "served", "default", "--model", str(DEFAULT_MODEL_DIR), "--out", str(served),
            "--hours", "0.2", "--seed", "3", "--start", "2026-11-05", "--quiet"]  # fmt: skip
    ran = runner.invoke(main, argv)
    assert ran.exit_code == 0, ran.output
    decisions = list(read_decisions(served))
    joined = join_decisions(decisions, read_events(served))
    assert len(joined.pairs) == joined.decisions == len(decisions) > 300 and not joined.unanswered
    assert min(d.decided_at.ToDatetime(UTC) for d in decisions) >= datetime(2026, 11, 5, tzinfo=UTC)
    for decision, event in joined.pairs:
        assert event.outcome.attempt.attempt_number == 1
        assert event.outcome.request_id.startswith("s3-pay-")  # unique beside another world's history
        assert decision.response.model_version == "default-s1000" and decision.exploration_rate == 0.1
        props = list(decision.first_position_propensities)
        assert sum(props) == pytest.approx(1) and props[0] == pytest.approx(decision.response.propensity)
        assert decision.response.routes[0].route_id == event.outcome.route_id  # the first route was tried
    again = runner.invoke(main, argv)  # a rerun replaces what it wrote
    assert again.exit_code == 0 and len(list(read_decisions(served))) == len(decisions)
    refused = runner.invoke(
        main, ["world", "served", "default", "--model", str(tmp_path), "--out", str(served)]
    )
    assert refused.exit_code == 1 and str(tmp_path) in refused.output

    # a history, then a day and a half of the bundled model serving after it: trained on together
    log = tmp_path / "log"
    write_history(world_events(27, seed=11), tmp_path / "history.parquet")
    import_file(tmp_path / "history.parquet", log)
    later = tiny(36, per_hour=300).model_copy(update={"start": START + timedelta(hours=27)})
    stats = served_log(World(later, 12), load_model_dir(DEFAULT_MODEL_DIR), log, seed=12)
    assert stats.decisions == stats.payments and 0.6 < stats.first_attempt_approval < 0.95
    routes = [
        RouteConfig(id=r.id, cost_bps=r.cost_bps, fixed_fee_minor=r.fixed_fee_minor) for r in later.routes
    ]
    logged = collect(log, routes)
    assert len(logged) == stats.payments  # the imported history has no candidates: only served decisions
    # each decision's issuer key, so a model's issuer offsets apply off-policy as the server applies them
    assert len(logged.issuer) == len(logged) and all(k.count("|") == 1 for k in logged.issuer)
    from history.ope import predict
    from model import make_tiny_artifact

    sel = {"intercept": -0.1, "mean_scale": 1.0, "spread_scale": 0.8}
    key = logged.issuer[0]
    plain = make_tiny_artifact(tmp_path / "plain", "1", route_selection=sel)
    shifted = make_tiny_artifact(
        tmp_path / "shifted", "1", route_selection=sel, route_selection_issuer={key: -0.5}
    )
    pa, pb = predict(load_model_dir(plain), logged), predict(load_model_dir(shifted), logged)
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    for k, a, b in zip(logged.issuer, pa, pb, strict=True):
        assert logit(b) - logit(a) == pytest.approx(np.full(len(a), -0.5 if k == key else 0.0), abs=1e-6)
    assert sum(k == key for k in logged.issuer) < len(logged)  # some other issuer's kept as they were
    path = train_log(
        log, tmp_path / "models", routes,
        LogTrainConfig(epochs=2, hidden=16, members=1, version="v2", progress=False),
    )  # fmt: skip
    info = json.loads((path / "manifest.json").read_text())["data_summary"]
    assert "default-s1000" in info["onpolicy"] and "onpolicy_refit" not in info.get("skipped", {})
    fit = info["selection"]  # a handful decided by the fallback (no features yet for a route)
    assert 0.99 * stats.decisions <= fit["served_model_decisions"] <= stats.decisions
    assert fit["decisions"] > 0 and fit["ece_before"] is not None  # the net's own choices were found
    assert fit["applied"] == bool(fit["correction"])  # a served model's own decisions: applied when fitted
