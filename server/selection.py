"""Fitting the route column's selection correction (`server.policy.SelectionCorrection`).

The policy routes on the highest estimate of several candidates, so the chosen route's estimate is,
on average, higher than its true probability (the optimizer's curse). The correction
``logit p' = intercept + mean_scale × m + spread_scale × (z − m)`` (the chosen route's logit ``z``,
the candidates' mean logit ``m``) is fitted by maximum likelihood on a model's own decisions: the
candidates' uncorrected probabilities, which route it chose, and whether it was approved. The
simulator collects them by playing the model (`sim.selection`); a log holds them as decisions
(`history.train`), where each row may carry an importance weight (the decisions of another
policy that chose what this model would have chosen, weighted by 1 / their propensity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from model.train import expected_calibration_error
from server.policy import SelectionCorrection

__all__ = ["MIN_DECISIONS", "Decisions", "chosen_ece", "fit_correction"]

MIN_DECISIONS = 500
"""Below this many model decisions (or with one outcome class) the correction stays the identity."""


@dataclass
class Decisions:
    """Model decisions of one play: candidates' uncorrected route probabilities, the chosen index,
    and whether the first attempt was approved."""

    route_p: list[list[float]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    approved: list[bool] = field(default_factory=list)
    weight: list[float] | None = None  # per decision (importance weights); None: all 1


def _logit(p: np.ndarray) -> np.ndarray:
    q: np.ndarray = np.clip(p, 1e-6, 1 - 1e-6)
    out: np.ndarray = np.log(q / (1 - q))
    return out


def _design(d: Decisions) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[1, m, z_chosen − m]`` and outcomes."""
    x = np.empty((len(d.chosen), 3))
    for k, (p, c) in enumerate(zip(d.route_p, d.chosen, strict=True)):
        z = _logit(np.asarray(p, dtype=np.float64))
        m = z.mean()
        x[k] = (1.0, m, z[c] - m)
    return x, np.asarray(d.approved, dtype=np.float64)


def fit_correction(d: Decisions) -> SelectionCorrection:
    """Maximum-likelihood logistic fit of the chosen routes' outcomes, each weighted by its
    `weight` (Newton's method, float64: deterministic). The identity when the data cannot support
    a fit."""
    if len(d.chosen) < MIN_DECISIONS or all(d.approved) or not any(d.approved):
        return SelectionCorrection()
    x, y = _design(d)
    s = np.ones(len(y)) if d.weight is None else np.asarray(d.weight, dtype=np.float64)
    w = np.array([0.0, 1.0, 1.0])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (s * (y - p))
        hess = (x * (s * p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(3)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if float(np.abs(step).max()) < 1e-10:
            break
    if not np.all(np.isfinite(w)) or w[1] <= 0 or w[2] <= 0:
        return SelectionCorrection()  # a fit that would erase or reverse the ranking is not used
    return SelectionCorrection(float(w[0]), float(w[1]), float(w[2]))


def chosen_ece(d: Decisions, correction: SelectionCorrection) -> float:
    if not d.chosen:
        return math.nan
    p = [correction.apply(rp)[c] for rp, c in zip(d.route_p, d.chosen, strict=True)]
    return expected_calibration_error(p, [float(a) for a in d.approved])
