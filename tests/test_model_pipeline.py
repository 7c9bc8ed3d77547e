"""Training rows are point-in-time; train → export → evaluate works end to end on a tiny world."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from authopt.v1 import events_pb2
from cli.main import main
from model.dataset import build_training_set
from model.export import make_tiny_artifact
from model.features import attempt_context, lookup_features
from model.layout import encode_flat
from model.train import TrainingDataError, TrainingSet
from server.models import ModelRejected, load_model_dir
from sim import World, load_world
from sim.config import WorldConfig
from sim.evaluate import evaluate_world, write_results
from sim.pipeline import TrainConfig, train_world
from sim.play import play
from sim.policies import Logging
from streams.replay import read_log, replay_final

pytestmark = pytest.mark.slow


def tiny(hours: float = 3, per_hour: float = 300) -> WorldConfig:
    config = load_world("default")
    return config.model_copy(
        update={
            "traffic": config.traffic.model_copy(update={"payments_per_hour": per_hour, "hours": hours}),
            "cards": config.cards.model_copy(update={"count": 1500}),
        }
    )


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[World, list[bytes]]:
    world = World(tiny(), 21)
    path = tmp_path_factory.mktemp("log") / "attempts.log"
    with path.open("wb") as f:
        play(world, Logging(seed=3), log=f)
    return world, list(read_log(path))


def _costs(world: World) -> dict[str, int]:
    return {r: int(b) for r, b in zip(world.route_ids, world.route_cost_bps, strict=True)}


def test_route_rows_see_only_the_past(log: tuple[World, list[bytes]]) -> None:
    """Row i equals an encoding from the store built from records[:i] alone: no future leakage."""
    world, records = log
    data, summary = build_training_set(records, _costs(world))
    assert summary.events == len(records) and summary.dead_letters == {}
    route_rows = data.x[data.column == 0]
    assert len(route_rows) == len(records)
    for i in random.Random(1).sample(range(1, len(records)), 12):
        store = replay_final(records[:i])
        e = events_pb2.AttemptEvent.FromString(records[i])
        o = e.outcome
        priors = []
        for r in records[:i]:
            prev = events_pb2.AttemptEvent.FromString(r).outcome
            if prev.request_id == o.request_id:
                from model.dataset import prior_of

                priors.append(prior_of(prev))
        at = o.attempted_at.seconds + o.attempted_at.nanos / 1e9
        feats = lookup_features(store, o.attempt, [o.route_id])
        ctx = attempt_context(o.attempt, priors, at=at)
        want = np.array(
            encode_flat(
                ctx, [(o.route_id, _costs(world)[o.route_id], feats.route_rows[0])], feats.attempt_rows
            ),
            dtype=np.float32,
        )
        np.testing.assert_array_equal(route_rows[i], want)


def test_changing_the_future_does_not_change_past_rows(log: tuple[World, list[bytes]]) -> None:
    world, records = log
    cut = len(records) // 2
    flipped = []
    for r in records[cut:]:
        e = events_pb2.AttemptEvent.FromString(r)
        e.outcome.status = 1 if e.outcome.status != 1 else 2
        e.outcome.response_code = "" if e.outcome.status == 1 else "05"
        flipped.append(e.SerializeToString())
    a, _ = build_training_set(records, _costs(world))
    b, _ = build_training_set(records[:cut] + flipped, _costs(world))
    ra, rb = a.x[a.column == 0], b.x[b.column == 0]
    np.testing.assert_array_equal(ra[: cut + 1], rb[: cut + 1])
    assert not np.array_equal(ra[cut + 1 :], rb[cut + 1 :])


def test_retry_rows_use_bucket_delays(log: tuple[World, list[bytes]]) -> None:
    world, records = log
    data, summary = build_training_set(records, _costs(world))
    assert summary.retry_rows > 0 and summary.retry_rows == int((data.column > 0).sum())
    assert set(summary.retry_rows_by_bucket) <= set(range(8))


def test_empty_and_single_class_logs_fail_with_an_explanation(log: tuple[World, list[bytes]]) -> None:
    world, records = log
    empty, _ = build_training_set([], _costs(world))
    with pytest.raises(TrainingDataError, match="no rows"):
        empty.validate(9)
    approved = []
    for r in records:
        e = events_pb2.AttemptEvent.FromString(r)
        if e.outcome.status == 1:
            approved.append(r)
    only, _ = build_training_set(approved, _costs(world))
    with pytest.raises(TrainingDataError, match="approved"):
        only.validate(9)
    assert isinstance(only, TrainingSet)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    train_world(tiny(), out, TrainConfig(seed=5, hours=4, epochs=2, hidden=16, progress=False))
    return out


def test_train_exports_a_model_the_server_accepts(trained: Path) -> None:
    model = load_model_dir(trained)
    assert model.version == "default-s5"
    manifest = model.manifest
    assert manifest.data_summary["world"] == "default" and manifest.data_summary["events"] > 0
    numerics = manifest.data_summary["numerics"]  # the kernels it was trained with (model/numerics.py)
    assert isinstance(numerics, dict) and numerics["torch"] and numerics["cpu_capability"]
    assert 0 <= manifest.metrics["val_ece_route"] < 0.2
    # The selection correction was fitted on plays of the served model (sim/selection.py).
    selection = manifest.data_summary["selection"]
    assert isinstance(selection, dict) and selection["rounds"] == 2 and selection["decisions"] > 0
    assert set(manifest.route_selection) in ({"intercept", "mean_scale", "spread_scale"}, set())
    assert "selection_ece_after" in manifest.metrics
    # Resumable and deterministic: the work directory is reused, a second version is identical.
    train_world(
        tiny(), trained, TrainConfig(seed=5, hours=4, epochs=2, hidden=16, version="again", progress=False)
    )
    x = np.random.default_rng(0).normal(size=(8, len(manifest.input_layout))).astype(np.float32)
    import torch

    a = model.infer(torch.from_numpy(x))
    b = load_model_dir(trained / "again").infer(torch.from_numpy(x))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert load_model_dir(trained / "again").manifest.route_selection == manifest.route_selection
    # The last round pools six days by default (seeds 7-12); `authopt train --selection-days 2`
    # pools seeds 7, 8 on the same nets: fewer decisions, another fit, the same nets.
    cfg = TrainConfig(seed=5, hours=4, epochs=2, hidden=16, selection_seeds=2, version="two", progress=False)
    train_world(tiny(), trained, cfg)
    two = load_model_dir(trained / "two")
    pooled = two.manifest.data_summary["selection"]
    assert isinstance(pooled, dict) and pooled["seeds"] == [7, 8]
    assert selection["seeds"] == [7, 8, 9, 10, 11, 12]
    assert pooled["decisions"] < selection["decisions"]
    torch.testing.assert_close(two.infer(torch.from_numpy(x)), a, atol=0, rtol=0)
    assert manifest.route_selection_issuer == {} and selection["by_issuer"] is False
    # `authopt train --selection-by-issuer`: the same plays' fit with an offset per issuer (cached
    # beside the plain one), exported with it; the same nets.
    cfg = TrainConfig(
        seed=5, hours=4, epochs=2, hidden=16, selection_by_issuer=True, version="iss", progress=False
    )
    train_world(tiny(), trained, cfg)
    iss = load_model_dir(trained / "iss")
    by_issuer = iss.manifest.data_summary["selection"]
    assert isinstance(by_issuer, dict) and by_issuer["by_issuer"] is True
    assert by_issuer["decisions"] == selection["decisions"]
    offsets = iss.manifest.route_selection_issuer
    assert offsets and all(k.count("|") == 1 and math.isfinite(v) for k, v in offsets.items())
    assert set(iss.manifest.route_selection) == {"intercept", "mean_scale", "spread_scale"}
    assert iss.manifest.route_selection != manifest.route_selection
    torch.testing.assert_close(iss.infer(torch.from_numpy(x)), a, atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="already exists"):
        train_world(tiny(), trained, TrainConfig(seed=5, hours=4, epochs=2, hidden=16, progress=False))


def test_the_selection_fit_plays_its_days_in_processes_to_the_same_fit(trained: Path) -> None:
    """`fit_selection(workers=2)` plays the last round's days in two processes: the same decisions,
    so the same correction, as one process playing them in turn."""
    from sim.selection import fit_selection

    one = fit_selection(tiny(hours=2), trained, seeds=[7, 8, 9], hours=2, rounds=2, workers=1)
    seen: list[tuple[str, int, int]] = []
    two = fit_selection(
        tiny(hours=2), trained, seeds=[7, 8, 9], hours=2, rounds=2, workers=2,
        progress=lambda label, done, total: seen.append((label, done, total)),
    )  # fmt: skip
    assert two == one and one.decisions > 0
    assert seen[-1] == ("fitting the selection correction (round 2/2, 3 seeds in 2 processes)", 3, 3)
    with pytest.raises(ValueError, match="workers"):
        fit_selection(tiny(hours=2), trained, seeds=[7], hours=2, workers=0)


def test_evaluate_writes_results_report_and_plots(trained: Path, tmp_path: Path) -> None:
    doc = evaluate_world(tiny(hours=2), trained, [1, 2])
    # seeds in two processes: the same document
    both = evaluate_world(tiny(hours=2), trained, [1, 2], workers=2)
    assert json.dumps(both["runs"], sort_keys=True) == json.dumps(doc["runs"], sort_keys=True)  # NaN too
    assert both["paired"] == doc["paired"]
    paired = doc["paired"]
    assert paired["payments"] == sum(int(doc["runs"]["static"][s]["payments"]) for s in ("1", "2"))
    capture = paired["capture_first_attempt"]
    assert capture["lo"] <= capture["estimate"] <= capture["hi"]
    path = write_results([doc], tmp_path)
    results = json.loads(path.read_text())["worlds"][0]
    assert set(results["runs"]) == {
        "static",
        "cheapest",
        "success-rate",
        "oracle",
        "authopt+ladder",
        "authopt",
    }
    for name in (
        "uplift_capture_first_attempt",
        "beats_success_rate_pp",
        "retry_vs_ladder",
        "calibration",
        "off_policy",
    ):
        assert name in results
    assert results["summary"]["authopt"]["violations"]["mean"] == 0
    oracle = results["summary"]["oracle"]["first_attempt_p_true"]["mean"]
    assert all(
        oracle >= results["summary"][p]["first_attempt_p_true"]["mean"] - 1e-9 for p in results["summary"]
    )
    assert set(results["targets"]) >= {"uplift_capture_first_attempt", "violations", "ece"}
    cal = results["calibration"]
    assert 0 <= cal["ece_truth"] <= 1 and 0 < cal["ece_noise_floor"] < cal["ece_evaluation_traffic"] + 0.05
    report = (tmp_path / "report.md").read_text()
    assert "against the world's own approval probabilities" in report
    assert "| first-attempt approval |" in report
    assert "| capture of the oracle's uplift (ratio of paired means) |" in report
    for png in ("reliability", "approval-over-time", "uplift-by-segment"):
        assert (tmp_path / f"default-{png}.png").stat().st_size > 1000


def test_evaluate_refuses_a_missing_or_mismatched_model(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no model version" in res.output
    make_tiny_artifact(tmp_path / "m", "v1", contract_hash="sha256:not-this-one")
    res = runner.invoke(main, ["evaluate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "contract" in res.output
    with pytest.raises(ModelRejected):
        load_model_dir(tmp_path / "m")


def test_invalid_world_file_is_refused_by_the_commands(tmp_path: Path) -> None:
    bad = tmp_path / "w.toml"
    bad.write_text(
        (Path(__file__).parent.parent / "sim/worlds/default.toml")
        .read_text()
        .replace("cost_bps = 18", "cost_bps = -1")
    )
    res = CliRunner().invoke(main, ["train", "--world", str(bad), "--out", str(tmp_path / "m")])
    assert res.exit_code != 0 and "routes[0].cost_bps" in res.output and "(got -1)" in res.output
