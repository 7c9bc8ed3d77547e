"""Forward time of the served model: one `ApprovalNet` against an ensemble of several, as
`EnsembleNet` (the members one after another) and as `FusedEnsembleNet` (what export serves).

  python -m bench.model_forward [--members 3] [--hidden 128] [--batches 1,8,32]

All are exported and loaded as the server loads them (TorchScript, frozen; one torch thread) with
the real input layout and random weights (the time does not depend on the weights); the unfused
ensemble is exported through the same code with the fusion turned off. For each batch size: the
median over 9 rounds of 300 forwards, in microseconds (the three take turns within each
round), and the ratios to one net. Prints a table; never fails on a timing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import torch

from model import DELAY_BUCKETS_S, INPUT_LAYOUT, ApprovalNet, export_model
from model.net import EnsembleNet, FusedEnsembleNet, layout_categorical_groups
from server.models import load_model_dir


def _net(hidden: int, seed: int) -> ApprovalNet:
    torch.manual_seed(seed)
    groups = layout_categorical_groups(INPUT_LAYOUT)
    return ApprovalNet(len(INPUT_LAYOUT), len(DELAY_BUCKETS_S), hidden, categorical_groups=groups).eval()


def _time(models: list[object], x: torch.Tensor, rounds: int = 9) -> list[float]:
    """Median µs per forward of each model; the models take turns within every round, so drift of
    a shared machine falls on all of them alike."""
    infers = [m.infer for m in models]  # type: ignore[attr-defined]
    for infer in infers:
        for _ in range(50):
            infer(x)
    times: list[list[float]] = [[] for _ in infers]
    for _ in range(rounds):
        for k, infer in enumerate(infers):
            t0 = time.perf_counter()
            for _ in range(300):
                infer(x)
            times[k].append((time.perf_counter() - t0) / 300 * 1e6)
    return [statistics.median(t) for t in times]


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
        ensemble = EnsembleNet(members).eval()
        fused = export_model(ensemble, Path(tmp) / "fused", "fused")
        with patch.object(FusedEnsembleNet, "can_fuse", staticmethod(lambda _: False)):
            unfused = export_model(ensemble, Path(tmp) / "unfused", "unfused")
        a, b, c = (load_model_dir(p.parent) for p in (single, unfused, fused))
        print(f"hidden {args.hidden}, {args.members} members, torch {torch.__version__}, one thread")
        print(
            "| batch | one net µs | ensemble µs | fused ensemble µs | ensemble / one | fused / one |\n"
            "|---:|---:|---:|---:|---:|---:|"
        )
        for n in (int(s) for s in args.batches.split(",")):
            x = torch.rand(n, len(INPUT_LAYOUT))
            ta, tb, tc = _time([a, b, c], x)
            print(f"| {n} | {ta:.1f} | {tb:.1f} | {tc:.1f} | {tb / ta:.2f} | {tc / ta:.2f} |")


if __name__ == "__main__":
    main()
