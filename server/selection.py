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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from model.train import expected_calibration_error
from server.policy import SelectionCorrection, shift_logits

__all__ = [
    "ISSUER_RIDGE",
    "MAX_ISSUERS",
    "MIN_DECISIONS",
    "MIN_ISSUER_DECISIONS",
    "Decisions",
    "chosen_ece",
    "fit_correction",
    "fit_correction_by_issuer",
]

MIN_DECISIONS = 500
"""Below this many model decisions (or with one outcome class) the correction stays the identity."""

MIN_ISSUER_DECISIONS = 200
"""An issuer (`streams.contract` ISSUER key) gets an offset of its own from this many decisions on;
the others keep none (0)."""

MAX_ISSUERS = 5000
"""At most this many issuers, the most frequent, get an offset: the manifest stays small."""

ISSUER_RIDGE = 20.0
"""The offsets' L2 penalty (in the log-likelihood's units): about a third of the way back to 0 at
200 decisions, nothing at thousands."""


@dataclass
class Decisions:
    """Model decisions of one play: candidates' uncorrected route probabilities, the chosen index,
    and whether the first attempt was approved."""

    route_p: list[list[float]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    approved: list[bool] = field(default_factory=list)
    weight: list[float] | None = None  # per decision (importance weights); None: all 1
    issuer: list[str] | None = None  # per decision, the card's issuer key (None: not recorded)


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


def fit_correction_by_issuer(
    d: Decisions,
    *,
    min_decisions: int = MIN_ISSUER_DECISIONS,
    max_issuers: int = MAX_ISSUERS,
    ridge: float = ISSUER_RIDGE,
) -> tuple[SelectionCorrection, dict[str, float]]:
    """The correction's three numbers fitted jointly with a logit offset per issuer (`d.issuer`):
    the nets' bias differs by issuer (docs/model.md, "An offset per issuer"), and an offset shifts
    every candidate of a request alike, so it keeps their order. Issuers with fewer than
    `min_decisions` decisions, beyond the `max_issuers` most frequent, or whose decisions were all
    approved or all declined keep no offset; the offsets carry an L2 penalty `ridge`. Newton's
    method on the one-hot structure (the offsets' block of the Hessian is diagonal), float64:
    deterministic. Without issuers or enough data: `fit_correction`'s answer and no offsets."""
    if d.issuer is None or len(d.chosen) < MIN_DECISIONS or all(d.approved) or not any(d.approved):
        return fit_correction(d), {}
    if len(d.issuer) != len(d.chosen):
        raise ValueError(f"{len(d.issuer)} issuer keys for {len(d.chosen)} decisions")
    x, y = _design(d)
    s = np.ones(len(y)) if d.weight is None else np.asarray(d.weight, dtype=np.float64)
    counts: dict[str, list[int]] = {}
    for key, ok in zip(d.issuer, d.approved, strict=True):
        c = counts.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += bool(ok)
    eligible = [k for k, (n, n_ok) in counts.items() if n >= min_decisions and 0 < n_ok < n]
    keys = sorted(sorted(eligible), key=lambda k: -counts[k][0])[:max_issuers]
    if not keys:
        return fit_correction(d), {}
    index = {k: j for j, k in enumerate(keys)}
    g = np.array([index.get(k, -1) for k in d.issuer])
    has = g >= 0
    gk = g[has]
    kk = len(keys)
    a = np.array([0.0, 1.0, 1.0])
    b = np.zeros(kk)
    for _ in range(100):
        eta = x @ a
        eta[has] += b[gk]
        p = 1.0 / (1.0 + np.exp(-eta))
        r, v = s * (y - p), s * p * (1 - p)
        grad_a = x.T @ r
        grad_b = np.bincount(gk, weights=r[has], minlength=kk) - ridge * b
        h_aa = (x * v[:, None]).T @ x + 1e-9 * np.eye(3)
        h_ab = np.stack([np.bincount(gk, weights=(v * x[:, j])[has], minlength=kk) for j in range(3)])
        h_bb = np.bincount(gk, weights=v[has], minlength=kk) + ridge
        # Schur complement of the diagonal block: solve for the three numbers, then the offsets.
        schur = h_aa - (h_ab / h_bb) @ h_ab.T
        step_a = np.linalg.solve(schur, grad_a - h_ab @ (grad_b / h_bb))
        step_b = (grad_b - h_ab.T @ step_a) / h_bb
        a, b = a + step_a, b + step_b
        if max(float(np.abs(step_a).max()), float(np.abs(step_b).max())) < 1e-10:
            break
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or a[1] <= 0 or a[2] <= 0:
        return fit_correction(d), {}  # a fit that would erase or reverse the ranking is not used
    return SelectionCorrection(float(a[0]), float(a[1]), float(a[2])), {
        k: float(b[j]) for k, j in index.items()
    }


def chosen_ece(
    d: Decisions, correction: SelectionCorrection, offsets: Mapping[str, float] | None = None
) -> float:
    """The chosen routes' ECE with `correction` (and each decision's issuer offset) applied."""
    if not d.chosen:
        return math.nan
    p = [correction.apply(rp)[c] for rp, c in zip(d.route_p, d.chosen, strict=True)]
    if offsets and d.issuer is not None:
        p = [shift_logits([q], offsets.get(k, 0.0))[0] for q, k in zip(p, d.issuer, strict=True)]
    return expected_calibration_error(p, [float(a) for a in d.approved])
