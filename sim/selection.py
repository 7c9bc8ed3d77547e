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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.models import LoadedModel, load_model_dir
from server.policy import SelectionCorrection
from server.selection import Decisions, chosen_ece, fit_correction
from sim.config import WorldConfig
from sim.play import AttemptView, Decision, play
from sim.policies import Authopt
from sim.world import Payment, World

__all__ = [
    "SelectionFit",
    "fit_correction",
    "fit_selection",
    "record_decisions",
]  # fit_correction: server.selection


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
        correction, len(d.chosen), chosen_ece(d, SelectionCorrection()), chosen_ece(d, correction)
    )
