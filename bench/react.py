"""Time-to-react to route incidents on one world seed: every routing policy played with and without
the world's route incidents (`sim.react`), the table printed.

    python -m bench.react [--world default] [--seed 1] [--hours 12] [--policies oracle,authopt,...]
        [--payments-per-hour 20000] [--incident acq-eu,1.0,40,0.5] [--replicas 1,3]

authopt plays as `authopt serve` does by default and, as `authopt-health`, with the server's route
health (server/health.py, `route_health`) on: the difference is what route health buys. With
`--replicas 1,3` route health also plays as N server replicas behind the platform's round-robin
(`authopt-health-x3`), each keeping its own health from the share of outcomes reported to it, and
(`authopt-health-x3-echo`) with the platform echoing each decision's expected approval in the outcome
it reports (`AttemptOutcome.expected_approval`), so that a replica that did not decide can judge it.

`authopt evaluate` reports the same table per world over all its seeds; this is the quick look.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from model.artifacts import DEFAULT_MODEL_DIR
from server.health import HealthSettings
from server.models import LoadedModel, load_model_dir
from sim import World, load_world
from sim.config import Episode, WorldConfig
from sim.play import Policy, play
from sim.policies import Authopt, Oracle, Static, SuccessRate
from sim.react import incident_reactions, summarize_reactions, without_route_incidents


def _makers(model: LoadedModel, seed: int, replicas: list[int]) -> dict[str, Callable[[], Policy]]:
    """Each policy by name: the baselines, authopt as served by default, and authopt with route
    health as 1 or N replicas (with and without the platform's echo of the expectation)."""
    makers: dict[str, Callable[[], Policy]] = {
        "static": Static,
        "success-rate": lambda: SuccessRate(seed=seed),
        "oracle": Oracle,
        "authopt": lambda: Authopt(model, seed=seed),
    }
    for n in replicas:
        name = "authopt-health" if n == 1 else f"authopt-health-x{n}"
        makers[name] = lambda n=n: Authopt(model, seed=seed, health=HealthSettings(), replicas=n)
        if n > 1:
            makers[f"{name}-echo"] = lambda n=n: Authopt(
                model, seed=seed, health=HealthSettings(), replicas=n, echo=True
            )
    return makers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="default")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--payments-per-hour", type=float, help="traffic (default: the world's)")
    parser.add_argument(
        "--incident",
        metavar="ROUTE,START_H,MINUTES,SEVERITY",
        help="replace the world's route incidents with this one degradation",
    )
    parser.add_argument(
        "--policies", default="", help="comma-separated subset to play (default: all; 'lost' needs oracle)"
    )
    parser.add_argument(
        "--replicas",
        default="1",
        help="comma-separated server replica counts to play route health with (default 1)",
    )
    args = parser.parse_args(argv)
    try:
        replicas = [int(n) for n in args.replicas.split(",")]
    except ValueError:
        parser.error(f"--replicas {args.replicas!r}: expected comma-separated counts such as 1,3")
    if any(n < 1 for n in replicas):
        parser.error(f"--replicas {args.replicas!r}: counts must be >= 1")
    torch.set_num_threads(1)
    config = load_world(args.world)
    traffic = {"hours": args.hours} | (
        {"payments_per_hour": args.payments_per_hour} if args.payments_per_hour else {}
    )
    config = config.model_copy(update={"traffic": config.traffic.model_copy(update=traffic)})
    if args.incident:
        config = _one_incident(parser, without_route_incidents(config), args.incident)
    world, calm = World(config, args.seed), World(without_route_incidents(config), args.seed)
    payments = world.payments()
    model = load_model_dir(args.model)
    makers = _makers(model, args.seed, replicas)
    if args.policies:
        wanted = args.policies.split(",")
        if unknown := set(wanted) - set(makers):
            parser.error(f"unknown policies {sorted(unknown)}; choose from {sorted(makers)}")
        makers = {name: make for name, make in makers.items() if name in wanted}
    results, without = {}, {}
    for name, make in makers.items():
        started = time.perf_counter()
        results[name] = play(world, make(), payments=payments)
        without[name] = play(calm, make(), payments=payments)
        print(f"{name}: played twice in {time.perf_counter() - started:.0f} s", flush=True)
    rows = incident_reactions(world, payments, results, without)
    for row in rows:
        print(
            f"{row['route']} at {row['start_s'] / 3600:.2f} h, {row['minutes']:.0f} min, severity "
            f"{row['severity']:.2f}, {row['payments']:,} payments{'' if row['isolated'] else ', overlapping'}"
        )
        for name, v in row["policies"].items():
            lost = (v.get(f"lost_{k}vs_oracle_pp") for k in ("before_", "", "after_"))
            print(
                f"  {name:13s} measured {v['measured']!s:5s} react {_s(v['react_s'])}  "
                f"return {_s(v['return_s'])}  lost vs oracle before / during / after "
                + " / ".join(map(_pp, lost))
            )
    for name, v in summarize_reactions(rows).items():
        print(name, v)
    for name, result in results.items():  # the whole run, incidents and calm hours
        share = sum(result.first_approved) / len(result.first_approved)
        print(f"{name:18s} first-attempt approval {100 * share:.2f} %")


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s"


def _pp(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} pp"


def _one_incident(parser: argparse.ArgumentParser, config: WorldConfig, spec: str) -> WorldConfig:
    try:
        route, start_h, minutes, severity = spec.split(",")
        episode = Episode(start_hour=float(start_h), minutes=float(minutes), severity=float(severity))
    except ValueError as err:
        parser.error(f"--incident {spec!r}: expected ROUTE,START_H,MINUTES,SEVERITY ({err})")
    if route not in {r.id for r in config.routes}:
        parser.error(f"--incident: no route {route!r}; the world has {[r.id for r in config.routes]}")
    routes = [r.model_copy(update={"degradations": [episode]}) if r.id == route else r for r in config.routes]
    return config.model_copy(update={"routes": routes})


if __name__ == "__main__":
    main()
