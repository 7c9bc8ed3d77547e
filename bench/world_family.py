"""Train and evaluate authopt on worlds of the random family (sim/family.py): the distribution of
its capture of the oracle's uplift, its lead over success-rate routing and its calibration.

    python -m bench.world_family [--worlds 10] [--first-seed 1] [--payments-per-hour 1000]
        [--train-hours 48] [--eval-hours 6] [--eval-seeds 1] [--members 1] [--epochs 8]
        [--onpolicy-hours 6] [--selection-rounds 1] [--selection-days N] [--train-seed N] [--workers N]
        [--selection-by-issuer] [--issuer-health] [--out family]

For each world seed: `authopt world random` writes the world, `authopt train --world` trains on it
with the given budget (the same hyperparameters for every world: never tuned to one), `authopt
evaluate --world` plays it on the evaluation seeds with static, success-rate, the oracle and the
model. Each world's row is printed as it finishes (and kept in OUT/family.json, so an interrupted
run resumes where it stopped: give another budget another OUT); at the end the medians and counts
the issue's targets ask about. A row's ECE is against the outcomes; beside it, the ECE against the
world's own approval probabilities and a perfectly calibrated model's ECE against the same payments'
outcomes (`authopt evaluate`'s `calibration`): how much of the first is the model's and how much the
number of payments'.
`--selection-days N` trains and evaluates a model whose selection correction pools N days
(`authopt train --selection-days`) beside the default one: it is kept apart (version
`random-SEED-dN`, OUT/random-SEED/eval-dN, OUT/family-dN.json), and training's cache under
OUT/random-SEED/models/.work is shared, so on an OUT that has been run before only the correction is
fitted again: the same nets, two corrections, the same evaluation payments.
`--train-seed N` (`authopt train --seed`) trains every world's model again from another seed, kept
apart the same way (`random-SEED-sN`, `eval-sN`, `family-sN.json`): how much one training moves each
world, the noise a method change has to beat.
`--selection-by-issuer` (`authopt train --selection-by-issuer`) exports the same plays' correction
fitted with an offset per issuer, kept apart the same way (suffix `-iss`): on an OUT run before with
the other flags the same, the same nets and plays, only the export and the evaluation are new.
`--issuer-health` evaluates the same model with the server's issuer health on (`authopt evaluate
--issuer-health`), kept apart (OUT/random-SEED/eval...-ih, OUT/family...-ih.json): nothing is trained.
Prints figures; never fails on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

AUTHOPT = [sys.executable, "-m", "cli.main"]


def _run(*args: str) -> None:
    proc = subprocess.run([*AUTHOPT, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"authopt {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def _model_suffix(args: argparse.Namespace) -> str:
    days = "" if args.selection_days is None else f"-d{args.selection_days}"
    seed = "" if args.train_seed is None else f"-s{args.train_seed}"
    return days + seed + ("-iss" if args.selection_by_issuer else "")


def _suffix(args: argparse.Namespace) -> str:
    return _model_suffix(args) + ("-ih" if args.issuer_health else "")


def one_world(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    work = args.out / f"random-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    world = work / "world.toml"
    started = time.perf_counter()
    _run("world", "random", "--seed", str(seed), "--out", str(world),
         "--payments-per-hour", str(args.payments_per_hour), "--hours", str(args.eval_hours))  # fmt: skip
    version, passed = f"random-{seed}{_model_suffix(args)}", []
    if args.selection_days is not None:
        passed = ["--selection-days", str(args.selection_days)]
    if args.train_seed is not None:
        passed += ["--seed", str(args.train_seed)]
    if args.workers is not None:
        passed += ["--workers", str(args.workers)]
    if args.selection_by_issuer:
        passed += ["--selection-by-issuer"]
    if not (work / "models" / version / "manifest.json").exists():
        _run("train", "--world", str(world), "--out", str(work / "models"), "--version", version,
             "--hours", str(args.train_hours), "--members", str(args.members), "--epochs", str(args.epochs),
             "--onpolicy-hours", str(args.onpolicy_hours or args.eval_hours),
             "--selection-rounds", str(args.selection_rounds), *passed, "--quiet")  # fmt: skip
    evaluated = work / f"eval{_suffix(args)}"
    health = ["--issuer-health"] if args.issuer_health else []
    _run("evaluate", "--world", str(world), "--model", str(work / "models" / version),
         "--seeds", args.eval_seeds, "--hours", str(args.eval_hours),
         "--no-ope", "--out", str(evaluated), *health)  # fmt: skip
    (result,) = json.loads((evaluated / "results.json").read_text())["worlds"]
    measured = {k: v["measured"] for k, v in result["targets"].items()}
    summary, calibration = result["summary"], result.get("calibration", {})
    return {
        "seed": seed,
        "capture": measured.get("uplift_capture_first_attempt"),
        "vs_success_rate_pp": measured.get("beats_success_rate_pp"),
        "ece": measured.get("ece"),
        "ece_truth": calibration.get("ece_truth"),  # against the world's probabilities: no outcome noise
        "ece_noise_floor": calibration.get("ece_noise_floor"),
        "static": summary["static"]["first_attempt_approval"]["mean"],
        "oracle": summary["oracle"]["first_attempt_approval"]["mean"],
        "authopt": summary["authopt"]["first_attempt_approval"]["mean"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _truth(row: dict[str, Any]) -> str:
    if row.get("ece_truth") is None:  # a row written before results had it
        return " " * 16
    return f"({row['ece_truth']:.4f}, {row['ece_noise_floor']:.4f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--payments-per-hour", type=float, default=1000.0)
    parser.add_argument("--train-hours", type=float, default=48.0)
    parser.add_argument("--eval-hours", type=float, default=6.0)
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eval-seeds", default="1", help="comma-separated evaluation seeds")
    parser.add_argument(
        "--onpolicy-hours", type=float, help="train's on-policy hours (default: --eval-hours)"
    )
    parser.add_argument("--selection-rounds", type=int, default=1)
    parser.add_argument(
        "--selection-days", type=int, help="train's --selection-days (default: train's own), kept apart"
    )
    parser.add_argument("--train-seed", type=int, help="train's --seed (default: train's own), kept apart")
    parser.add_argument("--workers", type=int, help="train's --workers (default: train's own)")
    parser.add_argument(
        "--selection-by-issuer",
        action="store_true",
        help="train's --selection-by-issuer (an offset per issuer with the correction), kept apart",
    )
    parser.add_argument(
        "--issuer-health",
        action="store_true",
        help="evaluate's --issuer-health (the server's issuer health on), kept apart; trains nothing",
    )
    parser.add_argument("--out", type=Path, default=Path("family"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    done_path = args.out / f"family{_suffix(args)}.json"
    done: dict[str, dict[str, Any]] = json.loads(done_path.read_text()) if done_path.exists() else {}
    print("seed  static  oracle  authopt  capture  vs SR (pp)  ECE     (truth, floor)    seconds", flush=True)
    for seed in range(args.first_seed, args.first_seed + args.worlds):
        row = done.get(str(seed))
        if row is None:
            try:
                row = one_world(seed, args)
            except RuntimeError as exc:
                print(f"{seed:4d}  failed: {exc}", flush=True)
                continue
            done[str(seed)] = row
            done_path.write_text(json.dumps(done, indent=1))
        print(
            f"{seed:4d}  {row['static']:.4f}  {row['oracle']:.4f}  {row['authopt']:.4f}   "
            f"{row['capture']:7.3f}  {row['vs_success_rate_pp']:+10.2f}  {row['ece']:.4f}  "
            f"{_truth(row)}  {row['seconds']:7.1f}",
            flush=True,
        )
    rows = [done[str(s)] for s in range(args.first_seed, args.first_seed + args.worlds) if str(s) in done]
    if rows:
        print(
            f"{len(rows)} worlds: median capture {statistics.median(r['capture'] for r in rows):.3f}; "
            f"ahead of success-rate in {sum(r['vs_success_rate_pp'] > 0 for r in rows)} of {len(rows)} "
            f"(median {statistics.median(r['vs_success_rate_pp'] for r in rows):+.2f} pp); "
            f"ECE <= 0.015 in {sum(r['ece'] <= 0.015 for r in rows)} of {len(rows)} "
            f"(max {max(r['ece'] for r in rows):.4f})"
        )


if __name__ == "__main__":
    main()
