"""Where authopt's chosen-route probability is miscalibrated: by incident state, issuer and hour.

    python -m bench.calibration [--world default] [--seed 1] [--hours H] [--model DIR]

authopt (as `authopt serve` runs it by default) plays one world seed. Every first attempt the model
decided is put in one of four groups by the world's own incident schedule: its issuer in an outage,
its issuer within 30 minutes after one, its chosen route in a degradation, or quiet (none of these).
Per group, and per issuer and per hour for the quiet ones, it prints the mean served probability,
the observed approval and the truth (the world's approval probability of the payment on the chosen
route, which has no outcome noise), with the ECE of the whole play and of the play without each
group. `authopt evaluate` gives the ECE; this says where it comes from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from model.artifacts import DEFAULT_MODEL_DIR
from model.train import expected_calibration_error
from server.models import load_model_dir
from sim import World, load_world
from sim.play import play
from sim.policies import Authopt

_AFTER_S = 1800.0  # "after an outage": its 30 minutes, as sim.react's after-window


def _line(
    name: str, p: npt.NDArray[np.float64], y: npt.NDArray[np.float64], t: npt.NDArray[np.float64]
) -> str:
    if not len(p):
        return f"{name:26s} {0:6d}"
    return (
        f"{name:26s} {len(p):6d}  {p.mean():.3f}  {y.mean():.3f}  {t.mean():.3f}  {p.mean() - t.mean():+.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="default", help="a built-in world or a world TOML file")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hours", type=float, default=None, help="default: the world's own")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_world(args.world)
    if args.hours is not None:
        config = config.model_copy(
            update={"traffic": config.traffic.model_copy(update={"hours": args.hours})}
        )
    world = World(config, args.seed)
    model = load_model_dir(Path(args.model))
    pays = world.payments()
    res = play(world, Authopt(model, seed=args.seed), payments=pays)

    decided = np.array(res.first_p_model) >= 0
    p = np.array(res.first_p_model)[decided]
    y = np.array(res.first_approved, dtype=np.float64)[decided]
    t = np.array(res.first_p_true)[decided]
    at = np.array(res.at)[decided]
    route = np.array(res.first_route)[decided]
    issuer = np.array([int(world.card_issuer[q.card]) for q in pays])[decided]
    in_outage = np.zeros(len(p), dtype=bool)
    after_outage = np.zeros(len(p), dtype=bool)
    in_degradation = np.zeros(len(p), dtype=bool)
    for inc in world.incidents(float(at.min()) - 86400, float(at.max()) + 1):
        if inc.kind == "issuer":
            mine = issuer == world.issuer_ids.index(inc.id)
            in_outage |= mine & (at >= inc.start) & (at < inc.end)
            after_outage |= mine & (at >= inc.end) & (at < inc.end + _AFTER_S)
        else:
            in_degradation |= (route == world.route_ids.index(inc.id)) & (at >= inc.start) & (at < inc.end)
    quiet = ~(in_outage | after_outage | in_degradation)

    print(
        f"{config.name} seed {args.seed}, {config.traffic.hours:g} h: {len(p)} first attempts the model "
        f"decided; ECE {expected_calibration_error(p, y):.4f} (against the truth "
        f"{expected_calibration_error(p, t):.4f})"
    )
    print(f"{'group':26s} {'n':>6s}  {'p':>5s}  {'obs':>5s}  {'truth':>5s}  p-truth   ECE without the group")
    for name, m in (
        ("issuer in an outage", in_outage),
        ("issuer 30 min after one", after_outage),
        ("chosen route degraded", in_degradation),
        ("quiet", quiet),
    ):
        rest = f"{expected_calibration_error(p[~m], y[~m]):.4f}" if (~m).any() else "-"
        print(f"{_line(name, p[m], y[m], t[m])}   {rest}")
    print("quiet, per issuer:")
    for k, issuer_id in enumerate(world.issuer_ids):
        m = quiet & (issuer == k)
        if m.any():
            print(_line(f"  {issuer_id}", p[m], y[m], t[m]))
    print("quiet, per hour:")
    hour = (at - at.min()) // 3600
    for h in range(int(hour.max()) + 1):
        m = quiet & (hour == h)
        if m.any():
            print(_line(f"  hour {h}", p[m], y[m], t[m]))
    outages = [i for i in world.incidents(float(at.min()), float(at.max()) + 1) if i.kind == "issuer"]
    print(
        "issuer outages:",
        ", ".join(
            f"{i.id} at {(i.start - at.min()) / 3600:.2f} h, {(i.end - i.start) / 60:.0f} min, "
            f"severity {i.severity:.2f}"
            for i in outages
        )
        or "none",
    )


if __name__ == "__main__":
    main()
