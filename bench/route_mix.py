"""Which payments each route's route x issuer rate is measured on: authopt's estimate of every
candidate route against the truth, and the payments the rate it reads came from.

    python -m bench.route_mix [--world default] [--seed 1] [--hours 12] [--model DIR] [--country US]
        [--route acq-us]

authopt (as `authopt serve` runs it by default) plays one world seed; on every first attempt of a
card from `--country` decided by the model, each candidate route is recorded, chosen or not:

- the truth (the world's approval probability of this payment on the route), the nets' estimate
  (before the selection correction), and the same with the route x issuer and route x BIN attempt
  counts set to 0 and to a busy pair's (does evidence thin or thick move the estimate?);
- the route x issuer rate the model read (`route_issuer.approval_rate_24h`, smoothed), and what that
  pair had got so far: the share of retries among its attempts and the true approval of its first
  attempts (did it get typical payments of the issuer, or a selection?).

Then, for `--route`, per issuer of the country: the route's truth over all the issuer's payments
against the truth of those the policy sent it, and the merchants those came from. A rate measured on
a selection the policy made reads as the route's rate for all (docs/model.md).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import torch

from model.artifacts import DEFAULT_MODEL_DIR
from model.layout import INPUT_LAYOUT
from server.models import load_model_dir
from sim import World, load_world
from sim.play import AttemptView, Decision, play
from sim.policies import Authopt
from sim.world import Outcome

_PAIR_COUNTS = {  # inputs set to "a busy pair": about what the pairs a route is chosen for have
    "route_issuer.attempts_1h": 60.0,
    "route_issuer.attempts_24h": 1000.0,
    "route_bin.attempts_1h": 30.0,
    "route_bin.attempts_24h": 500.0,
}
_IX = {name: i for i, name in enumerate(INPUT_LAYOUT)}
_APPROVED = 1  # OUTCOME_STATUS_APPROVED


def main(argv: list[str] | None = None) -> None:  # noqa: C901 - one play and its recording hooks
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="default")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--country", default="US", help="issuer country of the cards recorded")
    parser.add_argument("--route", default="acq-us", help="the route whose issuers are listed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_world(args.world)
    config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": args.hours})})
    route_ids = [r.id for r in config.routes]
    if args.route not in route_ids:
        parser.error(f"--route: no route {args.route!r}; the world has {route_ids}")
    world = World(config, args.seed)
    model = load_model_dir(Path(args.model))
    policy = Authopt(model, seed=args.seed)
    inputs: list[torch.Tensor] = []
    infer = model.infer

    def recording_infer(x: torch.Tensor) -> torch.Tensor:
        inputs[:] = [x]
        return infer(x)

    object.__setattr__(model, "infer", recording_infer)  # LoadedModel is frozen; this is a probe

    # (route, issuer) -> [first attempts, their true approval summed, retries]
    pair: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    rows: dict[tuple[str, bool], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    target = route_ids.index(args.route)
    issuers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sent_from: dict[str, Counter[str]] = defaultdict(Counter)

    def issuer_of(view: AttemptView) -> tuple[str, str]:
        fields = world.card_fields(view.payment.card)
        return str(fields["issuer_country"]), str(fields["bin"])[:6]

    observe = policy.observe

    def observe_pair(view: AttemptView, route: int, outcome: Outcome) -> None:
        country, issuer = issuer_of(view)
        if country == args.country:
            p = pair[(route, issuer)]
            if view.number == 1:
                p[0] += 1
                p[1] += world.p_approve(view.payment, [route], view.now, view.belief)[0]
            else:
                p[2] += 1
        observe(view, route, outcome)

    policy.observe = observe_pair  # type: ignore[method-assign]

    def record(view: AttemptView, decision: Decision) -> None:
        country, issuer = issuer_of(view)
        if country != args.country or view.number != 1 or decision.source != "MODEL" or not inputs:
            return
        truth = world.p_approve(view.payment, view.routes, view.now, view.belief)
        x = inputs[0]
        zero, busy = x.clone(), x.clone()
        for name, count in _PAIR_COUNTS.items():
            zero[:, _IX[name]] = 0.0
            busy[:, _IX[name]] = count
        nets = (infer(x)[:, 0].tolist(), infer(zero)[:, 0].tolist(), infer(busy)[:, 0].tolist())
        merchant = config.merchants[view.payment.merchant].id
        for k, route in enumerate(view.routes):
            chosen = route == decision.route
            c = rows[(route_ids[route], chosen)]
            first, first_truth, retries = pair[(route, issuer)]
            c["n"] += 1
            c["truth"] += truth[k]
            c["nets"] += nets[0][k]
            c["nets_counts_0"] += nets[1][k]
            c["nets_counts_busy"] += nets[2][k]
            c["rate_24h"] += x[k, _IX["route_issuer.approval_rate_24h"]].item()
            if first:
                c["pairs_seen"] += 1
                c["pair_first_truth"] += first_truth / first
                c["pair_retry_share"] += retries / (first + retries)
            if route == target:
                issuers[issuer]["payments"] += 1
                issuers[issuer]["truth"] += truth[k]
                if chosen:
                    issuers[issuer]["sent"] += 1
                    issuers[issuer]["sent_truth"] += truth[k]
                    sent_from[issuer][merchant] += 1

    play(world, policy, on_decision=record)
    print(f"{args.world} seed {args.seed}, {args.hours:g} h: {args.country} cards' first attempts (model)")
    print("route, chosen: n, truth, nets, nets with the pair counts 0 / busy, route x issuer rate read,")
    print("  its pair so far: first attempts' truth, retry share")
    for (route_id, chosen), c in sorted(rows.items()):
        n, seen = c["n"], max(c["pairs_seen"], 1)
        print(
            f"{route_id:12s} {'chosen' if chosen else 'not':6s} {n:7.0f}  truth {c['truth'] / n:.3f}  "
            f"nets {c['nets'] / n:.3f}  counts 0 / busy {c['nets_counts_0'] / n:.3f} / "
            f"{c['nets_counts_busy'] / n:.3f}  rate read {c['rate_24h'] / n:.3f}  pair's first attempts' "
            f"truth {c['pair_first_truth'] / seen:.3f}  retries {c['pair_retry_share'] / seen:.3f}"
        )
    print(
        f"{args.route} per {args.country} issuer: truth over all its payments / over those sent, sent, from"
    )
    for issuer, c in sorted(issuers.items(), key=lambda kv: -kv[1]["payments"]):
        sent = c["sent"]
        top = ", ".join(f"{m} {n}" for m, n in sent_from[issuer].most_common(3))
        sent_truth = f"{c['sent_truth'] / sent:.3f}" if sent else "-"
        print(
            f"  {issuer} {c['payments']:6.0f} payments  truth {c['truth'] / c['payments']:.3f} / "
            f"{sent_truth}  sent {sent:5.0f}  ({top})"
        )


if __name__ == "__main__":
    main()
