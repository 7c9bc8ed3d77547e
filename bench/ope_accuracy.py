"""How close the off-policy estimates on a log come to the simulator's true on-policy values.

For each seed: the default world's exploring logging policy (`sim.emit`, uniform over the eligible
routes half the time) writes its history through the **public import schema** with its candidates
and propensities (`authopt world history`'s path), `authopt log import` reads it, and
`history.ope` estimates from that log alone the first-attempt approval of

- **authopt**: the bundled model through the server's ranking, with the server's 2 % exploration;
- **static**: every payment on its merchant's primary route (a deterministic policy of the context);

which are then played on-policy in the same world on the same payments (the truth). Prints each
estimate (DM, IPS, SNIPS, DR with their 95 % intervals) beside the truth and counts the cases whose
DR interval holds it. Success-rate routing is not estimated: its choice depends on its own running
counts of the outcomes it caused, which a log of another policy does not hold.

    python -m bench.ope_accuracy [--seeds 1,2,3] [--hours 24]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from authopt.v1 import events_pb2
from history import import_file
from history.ope import collect, evaluate_policy, model_policy, predict
from history.writer import write_history
from model.artifacts import DEFAULT_MODEL_DIR
from server.models import load_model_dir
from server.settings import RouteConfig
from sim import World, load_world
from sim.emit import emit_log, logging_choices
from sim.play import play
from sim.policies import Authopt, Static
from streams.replay import iter_records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--hours", type=float, default=24.0)
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
        estimates = {
            "authopt": evaluate_policy(logged, model_policy(model, logged, epsilon), q_hat, seed=seed),
            "static": evaluate_policy(logged, static_pi, q_hat, seed=seed),
        }
        truths = {
            "authopt": play(world, Authopt(model, seed=seed), payments=payments),
            "static": play(world, Static(), payments=payments),
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
    print(f"DR interval held the true on-policy value in {held} of {total} cases")


if __name__ == "__main__":
    main()
