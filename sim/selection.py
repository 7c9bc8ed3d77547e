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
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server.models import LoadedModel, load_model_dir
from server.policy import SelectionCorrection
from server.selection import Decisions, chosen_ece, fit_correction, fit_correction_by_issuer
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
    # the same decisions fitted with an offset per issuer (`fit_correction_by_issuer`)
    by_issuer: SelectionCorrection = field(default_factory=SelectionCorrection)
    issuer_offsets: dict[str, float] = field(default_factory=dict)
    ece_after_by_issuer: float = math.nan

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
    """Play `payments` with the model as served (its exploration rate, `selection` applied, no
    issuer offsets) and keep its decisions with each card's issuer key."""
    policy = Authopt(model, selection=selection, issuer_offsets=None, seed=seed)
    out = Decisions(issuer=[])
    assert out.issuer is not None
    issuers = out.issuer
    index: list[int] = []

    def keep(view: AttemptView, decision: Decision) -> None:
        if decision.source == "MODEL" and policy.last_route_p is not None:
            out.route_p.append(policy.last_route_p)
            out.chosen.append(view.routes.index(decision.route))
            issuers.append(policy.last_issuer)
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
    workers: int = 1,
) -> SelectionFit:
    """Fit the correction for the model in `model_dir` in `rounds` rounds, each playing `hours`:
    the first rounds on `seeds[0]` alone (to move the decisions toward those the correction
    makes), the last on every seed (a day's incidents move the chosen routes' calibration, so
    the fit pools several days). With `workers` > 1 the last round plays its seeds in that many
    processes at once (each with one torch thread, as one process plays them: the same decisions,
    so the same fit); `progress` then hears of each seed when it is done."""
    if not seeds or rounds < 1:
        raise ValueError("fit_selection needs at least one seed and one round")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    world_cfg = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
    model = load_model_dir(model_dir)
    correction: SelectionCorrection | None = None
    d = Decisions(issuer=[])
    for r in range(rounds):
        label = f"fitting the selection correction (round {r + 1}/{rounds}"
        last = r == rounds - 1
        if last and workers > 1 and len(seeds) > 1:
            d = _play_in_processes(world_cfg, model_dir, seeds, correction, workers, label, progress)
        else:
            d = Decisions(issuer=[])
            for s in seeds if last else seeds[:1]:
                _extend(d, _play_seed(world_cfg, model, s, correction, f"{label}, seed {s})", progress))
        correction = fit_correction(d)
    assert correction is not None
    by_issuer, offsets = fit_correction_by_issuer(d)
    return SelectionFit(
        correction,
        len(d.chosen),
        chosen_ece(d, SelectionCorrection()),
        chosen_ece(d, correction),
        by_issuer,
        offsets,
        chosen_ece(d, by_issuer, offsets),
    )


def _extend(d: Decisions, one: Decisions) -> None:
    d.route_p += one.route_p
    d.chosen += one.chosen
    d.approved += one.approved
    if d.issuer is not None:
        d.issuer += one.issuer or []


def _play_seed(
    world_cfg: WorldConfig,
    model: LoadedModel,
    seed: int,
    correction: SelectionCorrection | None,
    label: str,
    progress: Callable[[str, int, int], None] | None,
) -> Decisions:
    world = World(world_cfg, seed)
    payments = world.payments()
    n = len(payments)

    def step(k: int) -> None:
        if progress is not None:
            progress(label, k, n)

    return record_decisions(world, payments, model, selection=correction, seed=seed, progress=step)


def _play_seed_in_process(
    world_cfg: WorldConfig, model_dir: Path, seed: int, correction: SelectionCorrection | None
) -> Decisions:
    import torch

    torch.set_num_threads(1)  # as the pipeline plays them: the same decisions
    return _play_seed(world_cfg, load_model_dir(model_dir), seed, correction, "", None)


def _play_in_processes(
    world_cfg: WorldConfig,
    model_dir: Path,
    seeds: Sequence[int],
    correction: SelectionCorrection | None,
    workers: int,
    label: str,
    progress: Callable[[str, int, int], None] | None,
) -> Decisions:
    """The last round's seeds, each played in its own process; the decisions pooled in seed order."""
    context = multiprocessing.get_context("spawn")  # no forked torch state
    d = Decisions(issuer=[])
    with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=context) as pool:
        futures = [pool.submit(_play_seed_in_process, world_cfg, model_dir, s, correction) for s in seeds]
        if progress is not None:
            progress(f"{label}, {len(seeds)} seeds in {min(workers, len(seeds))} processes)", 0, len(seeds))
        for done, future in enumerate(futures, start=1):
            _extend(d, future.result())
            if progress is not None:
                progress(
                    f"{label}, {len(seeds)} seeds in {min(workers, len(seeds))} processes)", done, len(seeds)
                )
    return d


def default_workers(seeds: int) -> int:
    """Processes for a round of `seeds` plays: the CPUs this process may use, at most one per seed."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, seeds))
