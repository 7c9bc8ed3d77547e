"""How close the off-policy estimates on a log come to the simulator's true on-policy values.

For each seed: the default world's exploring logging policy (`sim.emit`, uniform over the eligible
routes half the time) writes its history through the **public import schema** with its candidates
and propensities (`authopt world history`'s path), `authopt log import` reads it, and
`history.ope` estimates from that log alone the first-attempt approval of

- **authopt**: the bundled model through the server's ranking, with the server's 2 % exploration;
- **static**: every payment on its merchant's primary route (a deterministic policy of the context);

- **success-rate**: the simulator's success-rate routing (`sim.policies.SuccessRate`), whose choice
  depends on its own running counts of the outcomes it caused: not a policy of the logged context,
  so it is estimated by rejection-sampling replay (`history.ope.replay_policy`), not IPS/DR;

which are then played on-policy in the same world on the same payments (the truth). Prints each
estimate (DM, IPS, SNIPS, DR with their 95 % intervals; the replay's for success-rate) beside the
truth and counts the cases whose interval (DR, or the replay's) holds it.

    python -m bench.ope_accuracy [--seeds 1,2,3] [--hours 24] [--replays 20]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from authopt.v1 import events_pb2
from history import import_file
from history.ope import LoggedDecisions, collect, evaluate_policy, model_policy, predict, replay_policy
from history.writer import write_history
from model.artifacts import DEFAULT_MODEL_DIR
from server.models import load_model_dir
from server.settings import RouteConfig
from sim import World, load_world
from sim.emit import emit_log, logging_choices
from sim.play import play
from sim.policies import Authopt, Static, SuccessRate
from streams.replay import iter_records


class SuccessRateOnLog:
    """`SuccessRate` walking a log (`history.ope.ReplayPolicy`): each decision's candidates as the
    world's route indices, its card's BIN-6 range as the dimension."""

    def __init__(self, world: World, dims: list[str], seed: int) -> None:  # seed: the replay's number
        self.world, self.dims, self.policy = world, dims, SuccessRate(seed=seed)

    def _routes(self, logged: LoggedDecisions, i: int) -> list[int]:
        return [self.world.route_index[name] for name in logged.candidates[i]]

    def probabilities(self, logged: LoggedDecisions, i: int) -> list[float]:
        return self.policy.probabilities(self._routes(logged, i), self.dims[i])

    def learn(self, logged: LoggedDecisions, i: int, chosen: int) -> None:
        self.policy.learn(self._routes(logged, i)[chosen], self.dims[i], logged.approved[i] == 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--replays", type=int, default=20, help="rejection-sampling replays for success-rate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_world("default")
    config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": args.hours})})
    routes = [
        RouteConfig(id=r.id, cost_bps=r.cost_bps, fixed_fee_minor=r.fixed_fee_minor) for r in config.routes
    ]
    model = load_model_dir(DEFAULT_MODEL_DIR)
    epsilon = Authopt(model).exploration_rate
    held = total = 0
    for seed in (int(s) for s in args.seeds.split(",")):
        started = time.perf_counter()
        world = World(config, seed)
        payments = world.payments()
        buffer = io.BytesIO()
        emit_log(world, buffer, payments=payments, seed=seed)
        events = [events_pb2.AttemptEvent.FromString(r) for r in iter_records(buffer.getvalue())]
        with tempfile.TemporaryDirectory() as tmp:
            history = Path(tmp) / "history.parquet"
            write_history(events, history, logging_choices(world, payments, events))
            imported = import_file(history, Path(tmp) / "log", max_age_days=36_500)
            logged = collect(Path(tmp) / "log", routes)
        q_hat = predict(model, logged)
        by_index = {p.index: p for p in payments}
        static_pi = []
        for names, rid in zip(logged.candidates, logged.request_ids, strict=True):
            p = by_index[int(rid.removeprefix("pay-"))]
            primary = world.route_ids[world.merchant_primary[p.merchant]]
            pi = np.zeros(len(names))
            pi[names.index(primary) if primary in names else 0] = 1.0
            static_pi.append(pi)
        dims = [
            world.card_bin[by_index[int(rid.removeprefix("pay-"))].card][:6] for rid in logged.request_ids
        ]
        replayed = replay_policy(
            logged, partial(SuccessRateOnLog, world, dims), replays=args.replays, seed=seed
        )
        estimates = {
            "authopt": evaluate_policy(logged, model_policy(model, logged, epsilon), q_hat, seed=seed),
            "static": evaluate_policy(logged, static_pi, q_hat, seed=seed),
        }
        truths = {
            "authopt": play(world, Authopt(model, seed=seed), payments=payments),
            "static": play(world, Static(), payments=payments),
            "success-rate": play(world, SuccessRate(seed=seed), payments=payments),
        }
        print(
            f"seed {seed}: {imported.accepted:,} attempts imported, {len(logged):,} logged first-attempt "
            f"decisions, {time.perf_counter() - started:.0f} s"
        )
        for name, value in estimates.items():
            truth = statistics.fmean(truths[name].first_approved)
            est = value.estimates["approval"]
            dr = est["dr"]
            inside = dr.low <= truth <= dr.high
            held += inside
            total += 1
            cells = "  ".join(
                f"{e.upper()} {100 * x.value:.2f} [{100 * x.low:.2f}, {100 * x.high:.2f}]"
                for e, x in est.items()
            )
            print(
                f"  {name:8s} true {100 * truth:.2f} %  {cells}  ESS {value.ess:,.0f}  "
                f"DR interval holds the truth: {'yes' if inside else 'NO'}"
            )
        truth = statistics.fmean(truths["success-rate"].first_approved)
        rep = replayed.estimates["approval"]
        inside = rep.low <= truth <= rep.high
        held += inside
        total += 1
        print(
            f"  {'success-rate':8s} true {100 * truth:.2f} %  REPLAY {100 * rep.value:.2f} "
            f"[{100 * rep.low:.2f}, {100 * rep.high:.2f}]  {replayed.accepted:,.0f} of {replayed.rows:,} "
            f"decisions accepted per replay (M = {replayed.bound:.1f}, {replayed.replays} replays, "
            f"{replayed.over_bound} over M)  interval holds the truth: {'yes' if inside else 'NO'}"
        )
    print(f"the interval (DR; the replay's for success-rate) held the true value in {held} of {total} cases")


if __name__ == "__main__":
    main()
