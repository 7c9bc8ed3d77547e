"""The route column's selection correction, fitted on the model's own served decisions.

The policy routes on the highest estimate of several candidates. Each estimate carries noise, so
the highest is, on average, higher than that route's true probability (the optimizer's curse):
on the default world the bundled model's chosen routes were over-estimated by 1.8 points while
its candidates as a whole were not (measured against the simulator's true probabilities; see
docs/model.md). Platt scaling on logged rows cannot see this: it calibrates every row, not the
row the policy picks.

`fit_selection` plays the trained model through the server's decision code on traffic of its own
(a seed neither training nor evaluation uses), keeps every model decision's candidate
probabilities, which route was chosen and whether it was approved, and fits by maximum
likelihood the three numbers of `server.policy.SelectionCorrection`:
``logit p' = intercept + mean_scale × m + spread_scale × (z − m)`` for the chosen route's logit
``z`` and the candidates' mean logit ``m``. Applied to every candidate, it keeps their order and
shrinks their differences. It changes which route wins only through the costs, so the
distribution it was fitted on moves a little; the play is therefore repeated with the first fit
applied and the correction refitted on that second round's decisions, which pool several days
(seeds): one day's incidents move the chosen routes' calibration by about a point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.train import expected_calibration_error
from server.models import LoadedModel, load_model_dir
from server.policy import SelectionCorrection
from sim.config import WorldConfig
from sim.play import AttemptView, Decision, play
from sim.policies import Authopt
from sim.world import Payment, World

__all__ = ["SelectionFit", "fit_correction", "fit_selection", "record_decisions"]

MIN_DECISIONS = 500
"""Below this many model decisions (or with one outcome class) the correction stays the identity."""


@dataclass
class Decisions:
    """Model decisions of one play: candidates' uncorrected route probabilities, the chosen index,
    and whether the first attempt was approved."""

    route_p: list[list[float]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    approved: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class SelectionFit:
    correction: SelectionCorrection
    decisions: int
    ece_before: float  # the chosen route's ECE in the last play, uncorrected
    ece_after: float  # ... with the fitted correction (in sample)

    def as_dict(self) -> dict[str, float]:
        return dict(self.correction._asdict())


def record_decisions(
    world: World,
    payments: list[Payment],
    model: LoadedModel,
    *,
    selection: SelectionCorrection | None,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> Decisions:
    """Play `payments` with the model as served (its exploration rate, `selection` applied) and
    keep its decisions."""
    policy = Authopt(model, selection=selection, seed=seed)
    out = Decisions()
    index: list[int] = []

    def keep(view: AttemptView, decision: Decision) -> None:
        if decision.source == "MODEL" and policy.last_route_p is not None:
            out.route_p.append(policy.last_route_p)
            out.chosen.append(view.routes.index(decision.route))
            index.append(view.payment.index)

    result = play(world, policy, payments=payments, on_decision=keep, progress=progress)
    position = {p.index: j for j, p in enumerate(payments)}
    out.approved = [result.first_approved[position[i]] for i in index]
    return out


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
    """Maximum-likelihood logistic fit of the chosen routes' outcomes (Newton's method, float64:
    deterministic). The identity when the data cannot support a fit."""
    if len(d.chosen) < MIN_DECISIONS or all(d.approved) or not any(d.approved):
        return SelectionCorrection()
    x, y = _design(d)
    w = np.array([0.0, 1.0, 1.0])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (y - p)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(3)
        step = np.linalg.solve(hess, grad)
        w = w + step
        if float(np.abs(step).max()) < 1e-10:
            break
    if not np.all(np.isfinite(w)) or w[1] <= 0 or w[2] <= 0:
        return SelectionCorrection()  # a fit that would erase or reverse the ranking is not used
    return SelectionCorrection(float(w[0]), float(w[1]), float(w[2]))


def _chosen_ece(d: Decisions, correction: SelectionCorrection) -> float:
    if not d.chosen:
        return math.nan
    p = [correction.apply(rp)[c] for rp, c in zip(d.route_p, d.chosen, strict=True)]
    return expected_calibration_error(p, [float(a) for a in d.approved])


def fit_selection(
    config: WorldConfig,
    model_dir: Path,
    *,
    seeds: Sequence[int],
    hours: float,
    rounds: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
) -> SelectionFit:
    """Fit the correction for the model in `model_dir` in `rounds` rounds, each playing `hours`:
    the first rounds on `seeds[0]` alone (to move the decisions toward those the correction
    makes), the last on every seed (a day's incidents move the chosen routes' calibration, so
    the fit pools several days)."""
    if not seeds or rounds < 1:
        raise ValueError("fit_selection needs at least one seed and one round")
    world_cfg = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
    worlds = {s: World(world_cfg, s) for s in seeds}
    traffic = {s: w.payments() for s, w in worlds.items()}
    model = load_model_dir(model_dir)
    correction: SelectionCorrection | None = None
    d = Decisions()
    for r in range(rounds):
        d = Decisions()
        for s in seeds if r == rounds - 1 else seeds[:1]:
            label = f"fitting the selection correction (round {r + 1}/{rounds}, seed {s})"
            n = len(traffic[s])

            def step(k: int, label: str = label, n: int = n) -> None:
                if progress is not None:
                    progress(label, k, n)

            one = record_decisions(worlds[s], traffic[s], model, selection=correction, seed=s, progress=step)
            d.route_p += one.route_p
            d.chosen += one.chosen
            d.approved += one.approved
        correction = fit_correction(d)
    assert correction is not None
    return SelectionFit(
        correction, len(d.chosen), _chosen_ece(d, SelectionCorrection()), _chosen_ece(d, correction)
    )
