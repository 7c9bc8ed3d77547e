"""Forward time of the served model: one `ApprovalNet` against an `EnsembleNet` of several.

  python -m bench.model_forward [--members 3] [--hidden 128] [--batches 1,8,32]

Both are exported and loaded as the server loads them (TorchScript, frozen; one torch thread) with
the real input layout and random weights (the time does not depend on the weights). For each batch
size: the median over 7 rounds of 300 forwards, in microseconds, and the ratio. Prints a table;
never fails on a timing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model import DELAY_BUCKETS_S, INPUT_LAYOUT, ApprovalNet, export_model
from model.net import EnsembleNet, layout_categorical_groups
from model.sim.policies import load_policy_model


def _net(hidden: int, seed: int) -> ApprovalNet:
    torch.manual_seed(seed)
    groups = layout_categorical_groups(INPUT_LAYOUT)
    return ApprovalNet(len(INPUT_LAYOUT), len(DELAY_BUCKETS_S), hidden, categorical_groups=groups).eval()


def _time(model: object, x: torch.Tensor) -> float:
    infer = model.infer  # type: ignore[attr-defined]
    for _ in range(50):
        infer(x)
    rounds = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(300):
            infer(x)
        rounds.append((time.perf_counter() - t0) / 300 * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        single = export_model(_net(args.hidden, 0), Path(tmp) / "single", "single")
        members = [_net(args.hidden, k) for k in range(args.members)]
        ensemble = export_model(EnsembleNet(members).eval(), Path(tmp) / "ensemble", "ensemble")
        a, b = load_policy_model(single.parent), load_policy_model(ensemble.parent)
        print(f"hidden {args.hidden}, {args.members} members, torch {torch.__version__}, one thread")
        print("| batch | single µs | ensemble µs | ratio |\n|---:|---:|---:|---:|")
        for n in (int(s) for s in args.batches.split(",")):
            x = torch.rand(n, len(INPUT_LAYOUT))
            ta, tb = _time(a, x), _time(b, x)
            print(f"| {n} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} |")


if __name__ == "__main__":
    main()
