"""Paired estimates of the evaluation (sim.evaluate.paired_estimates): differences taken payment by
payment on the same payments, bootstrapped over blocks of world time, and the capture ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.evaluate import _ci, calibration_against_truth, paired_estimates
from sim.play import PlayResult

SEEDS = (1, 2, 3)
HOURS, PER_HOUR = 48, 150
UPLIFT = {"static": 0.0, "success-rate": 0.015, "authopt": 0.02, "oracle": 0.04}


def _series(rng_seed: int = 0) -> dict[str, dict[int, PlayResult]]:
    """Policies on the same payments: each hour has its own approval level (shared by every policy,
    as an incident or an issuer's mood is), each policy adds its uplift on the same draws."""
    rng = np.random.default_rng(rng_seed)
    out: dict[str, dict[int, PlayResult]] = {p: {} for p in UPLIFT}
    for s in SEEDS:
        n = HOURS * PER_HOUR
        at = np.sort(rng.uniform(0, HOURS * 3600, n))
        level = rng.uniform(0.55, 0.85, HOURS)[(at // 3600).astype(int)]
        u = rng.random(n)  # the same draw for every policy (common random numbers)
        for p, up in UPLIFT.items():
            out[p][s] = PlayResult(
                p, "synthetic", s, payments=n, at=at.tolist(), first_approved=(u < level + up).tolist()
            )
    return out


def test_paired_differences_and_capture_cover_the_truth() -> None:
    est = paired_estimates(_series(), SEEDS)
    assert est["blocks"] == len(SEEDS) * HOURS and est["payments"] == len(SEEDS) * HOURS * PER_HOUR
    for key, truth in (
        ("authopt_minus_static_pp", 2.0),
        ("authopt_minus_success-rate_pp", 0.5),
        ("oracle_minus_static_pp", 4.0),
        ("capture_first_attempt", 0.5),
    ):
        e = est[key]
        assert e["lo"] <= truth <= e["hi"], (key, e)
        assert e["lo"] <= e["estimate"] <= e["hi"] and e["half_width"] == pytest.approx(
            (e["hi"] - e["lo"]) / 2
        )
    # common draws: authopt approves every payment static approves, so each paired difference is exact
    assert est["authopt_minus_static_pp"]["estimate"] == pytest.approx(2.0, abs=0.3)


def test_pairing_is_far_narrower_than_independent_intervals_over_seeds() -> None:
    series = _series(1)
    paired = paired_estimates(series, SEEDS)["capture_first_attempt"]

    def rate(p: str, s: int) -> float:
        return float(np.mean(series[p][s].first_approved))

    per_seed = [
        (rate("authopt", s) - rate("static", s)) / (rate("oracle", s) - rate("static", s)) for s in SEEDS
    ]
    unpaired_diff = _ci([100 * (rate("authopt", s) - rate("static", s)) for s in SEEDS])
    assert paired["half_width"] < 0.1 and math.isfinite(unpaired_diff["ci95"])
    assert paired["half_width"] < _ci(per_seed)["ci95"]


def test_the_bootstrap_is_repeatable_and_refuses_unpaired_plays() -> None:
    series = _series(2)
    assert paired_estimates(series, SEEDS) == paired_estimates(series, SEEDS)
    short = series["authopt"][1]
    short.first_approved = short.first_approved[:-1]
    with pytest.raises(ValueError, match="seed 1: authopt played"):
        paired_estimates(series, SEEDS)
    assert paired_estimates({"static": {}}, ()) == {}


def test_calibration_against_truth_separates_miscalibration_from_outcome_noise() -> None:
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.4, 0.95, 12_000)
    perfect = calibration_against_truth(truth, truth)
    assert perfect["ece_truth"] == pytest.approx(0.0, abs=1e-12)
    # outcome noise alone: a perfect model's ECE against 12,000 outcomes is well above zero
    assert 0.004 < perfect["ece_noise_floor"] < 0.015
    assert calibration_against_truth(truth, truth, seed=1)["ece_noise_floor"] == pytest.approx(
        perfect["ece_noise_floor"], rel=0.5
    )
    # a model 0.03 too optimistic everywhere: 0.03 against the truth, whatever the outcomes
    biased = calibration_against_truth(np.clip(truth + 0.03, 0, 1), truth)
    assert biased["ece_truth"] == pytest.approx(0.03, abs=0.002)
    # the floor is the same payments' noise, not the model's: it does not move with the model
    assert biased["ece_noise_floor"] == perfect["ece_noise_floor"]
    # more rows, less noise
    more = calibration_against_truth(np.tile(truth, 12), np.tile(truth, 12))
    assert more["ece_noise_floor"] < perfect["ece_noise_floor"] / 2
