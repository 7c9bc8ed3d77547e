"""`authopt train`: world → logging policy's event log → point-in-time rows → fit → on-policy round → export.

The on-policy round plays the first model through the server's code path (with 10 % exploration)
on more of the world's traffic, as a deployed model would, and refits on both logs: the features a
served model sees (its own routing shapes them: the routes it prefers are busy, the others go
quiet) then appear in its training data, which the uniform logging policy's alone do not show.
The round plays the world at its own incident rate (the logging traffic sees `incident_boost` x
more incidents, so the model learns what one looks like), and the last 30 % of its log is held out
to refit the calibration on: the traffic the model will serve.

Every stage leaves its result in a work directory (``<out>/.work/<world>-s<seed>/``): the log, the
rows (``rows.npz``) and the training checkpoint, each written atomically, so an interrupted run
resumes where it stopped and a finished stage is not redone. The artifact is exported as
``<out>/<version>/`` (TorchScript + manifest with metrics and a data summary), what the server loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from model.dataset import build_training_set
from model.export import export_model
from model.layout import DELAY_BUCKETS_S, INPUT_LAYOUT
from model.net import layout_categorical_groups
from model.numerics import numerics
from model.train import FitResult, TrainingSet, calibrate, fit_ensemble
from sim.config import RandomEpisodes, WorldConfig
from sim.emit import emit_log
from sim.world import World
from streams.replay import read_log

__all__ = ["TrainConfig", "train_world"]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1000  # the world seed of the training traffic (evaluation uses other seeds)
    hours: float | None = None  # None: 4x the world's own span
    epochs: int = 12
    hidden: int = 128
    members: int = 3  # nets averaged into the served model (model.net.EnsembleNet); 1: a single net
    onpolicy_hours: float | None = None  # None: the world's own span; 0: no on-policy round
    onpolicy_exploration: float = 0.1
    selection_rounds: int = 2  # rounds of play to fit the route column's selection correction; 0: none
    selection_seeds: int = 6  # world seeds (days) the last round plays (seed + 2, seed + 3, ...)
    selection_by_issuer: bool = False  # fit (and export) an offset per issuer with the correction
    workers: int | None = None  # processes the last selection round plays its days in; None: the CPUs
    incident_boost: float = 3.0  # random incidents per day x this in the training traffic
    version: str | None = None
    progress: bool = True


@contextmanager
def _bar(enabled: bool, console: Console) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )
    with progress:
        yield progress


def _atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def train_world(config: WorldConfig, out: Path, cfg: TrainConfig = TrainConfig()) -> Path:
    """Train on `config`'s world and export under `out`; returns the version directory."""
    console = Console(stderr=True, quiet=not cfg.progress)
    hours = cfg.hours if cfg.hours is not None else 4 * config.traffic.hours
    real_config = config
    config = boost_incidents(config, cfg.incident_boost)
    world_cfg = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
    version = cfg.version or f"{config.name}-s{cfg.seed}"
    if (out / version).exists():
        raise FileExistsError(f"model version {version!r} already exists under {out}; pass another --version")
    work = out / ".work" / f"{config.name}-s{cfg.seed}-h{hours:g}-b{cfg.incident_boost:g}"
    work.mkdir(parents=True, exist_ok=True)
    world = World(world_cfg, cfg.seed)

    log_path = work / "attempts.log"
    if not log_path.exists():
        payments = world.payments()
        tmp = _atomic(log_path)
        with _bar(cfg.progress, console) as bar, tmp.open("wb") as f:
            task = bar.add_task("simulating the logging policy", total=None)
            stats = emit_log(
                world, f, payments=payments, seed=cfg.seed, progress=lambda n: bar.update(task, completed=n)
            )
            bar.update(task, total=stats.attempts, completed=stats.attempts)
        os.replace(tmp, log_path)
    console.print(f"event log: {log_path} ({log_path.stat().st_size / 1e6:.1f} MB)")

    rows_path = work / "rows.npz"
    summary_path = work / "rows.json"
    if not rows_path.exists():
        records = list(read_log(log_path))
        costs = {rid: int(bps) for rid, bps in zip(world.route_ids, world.route_cost_bps, strict=True)}
        with _bar(cfg.progress, console) as bar:
            task = bar.add_task("replaying events through the feature code", total=len(records))
            data, summary = build_training_set(
                records, costs, progress=lambda n: bar.update(task, completed=n)
            )
        tmp = _atomic(rows_path).with_suffix(".npz")
        np.savez(tmp, x=data.x, column=data.column, y=data.y)
        os.replace(tmp, rows_path)
        summary_path.write_text(json.dumps(summary.as_dict(), indent=2))
    loaded = np.load(rows_path)
    data = TrainingSet(x=loaded["x"], column=loaded["column"], y=loaded["y"])
    data_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    console.print(f"training rows: {len(data.y):,} ({int((data.column == 0).sum()):,} route, "
                  f"{int((data.column > 0).sum()):,} retry)")  # fmt: skip

    result = _fit(data, cfg, work / "checkpoint")
    onpolicy_hours = config.traffic.hours if cfg.onpolicy_hours is None else cfg.onpolicy_hours
    if onpolicy_hours > 0:
        first = work / "first-model"
        if not (first / "v1").exists():
            export_model(result.net, first, "v1", metrics=result.metrics)
        extra = _onpolicy_rows(real_config, onpolicy_hours, first / "v1", cfg, work, console)
        # The on-policy log's last 30 % (by time) is held out to calibrate on: the traffic the
        # model will serve, at the world's own incident rate.
        cut = int(len(extra.y) * 0.7)
        held = TrainingSet(x=extra.x[cut:], column=extra.column[cut:], y=extra.y[cut:])
        data = TrainingSet(
            x=np.concatenate([data.x, extra.x[:cut]]),
            column=np.concatenate([data.column, extra.column[:cut]]),
            y=np.concatenate([data.y, extra.y[:cut]]),
        )
        data_summary["onpolicy_rows"] = len(extra.y)
        data_summary["onpolicy_hours"] = onpolicy_hours
        result = _fit(data, cfg, work / "checkpoint-onpolicy")
        recal = calibrate(result.net, held)
        result.metrics.update({k.replace("val_", "onpolicy_"): v for k, v in recal.items()})
    selection: dict[str, float] = {}
    offsets: dict[str, float] = {}
    if cfg.selection_rounds > 0:
        served = work / "served-model"
        if not (served / "v1").exists():
            export_model(result.net, served, "v1", metrics=result.metrics)
        fit = _selection(real_config, served / "v1", cfg, work, console)
        result.metrics["selection_ece_before"] = fit["ece_before"]
        if cfg.selection_by_issuer:
            selection = {k: float(v) for k, v in fit["by_issuer"].items()}
            offsets = {k: float(v) for k, v in fit["issuer_offsets"].items()}
            result.metrics["selection_ece_after"] = fit["ece_after_by_issuer"]
        else:
            selection = {k: float(v) for k, v in fit["correction"].items()}
            result.metrics["selection_ece_after"] = fit["ece_after"]
        data_summary["selection"] = {k: fit[k] for k in ("seeds", "hours", "rounds", "decisions")}
        data_summary["selection"]["by_issuer"] = cfg.selection_by_issuer
    info: dict[str, object] = {
        "world": config.name,
        "world_seed": cfg.seed,
        "hours": hours,
        "rows": len(data.y),
        **data_summary,
        "numerics": numerics(),
    }
    path = export_model(
        result.net,
        out,
        version,
        metrics=result.metrics,
        data_summary=info,
        route_selection=selection,
        route_selection_issuer=offsets,
    )
    console.print(
        f"exported {path} — " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
    )
    return path


def _fit(data: TrainingSet, cfg: TrainConfig, checkpoint: Path) -> FitResult:
    return fit_ensemble(
        data,
        members=cfg.members,
        n_buckets=len(DELAY_BUCKETS_S),
        seed=cfg.seed,
        epochs=cfg.epochs,
        hidden=cfg.hidden,
        checkpoint_dir=checkpoint,
        progress=cfg.progress,
        categorical_groups=layout_categorical_groups(INPUT_LAYOUT),
    )


def _onpolicy_rows(
    config: WorldConfig, hours: float, model_dir: Path, cfg: TrainConfig, work: Path, console: Console
) -> TrainingSet:
    """Rows from the first model's own closed-loop log (seed + 1, so other payments than the first log)."""
    import torch

    from server.models import load_model_dir
    from sim.play import play
    from sim.policies import Authopt

    rows_path = work / "onpolicy-rows.npz"
    if not rows_path.exists():
        log_path = work / "onpolicy.log"
        world_cfg = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
        world = World(world_cfg, cfg.seed + 1)
        if not log_path.exists():
            torch.set_num_threads(1)
            payments = world.payments()
            policy = Authopt(
                load_model_dir(model_dir), exploration_rate=cfg.onpolicy_exploration, seed=cfg.seed
            )
            tmp = _atomic(log_path)
            with _bar(cfg.progress, console) as bar, tmp.open("wb") as f:
                task = bar.add_task("playing the first model on-policy", total=len(payments))
                play(
                    world, policy, payments=payments, log=f, progress=lambda n: bar.update(task, completed=n)
                )
            os.replace(tmp, log_path)
        records = list(read_log(log_path))
        costs = {rid: int(bps) for rid, bps in zip(world.route_ids, world.route_cost_bps, strict=True)}
        with _bar(cfg.progress, console) as bar:
            task = bar.add_task("replaying the on-policy log", total=len(records))
            data, _ = build_training_set(records, costs, progress=lambda n: bar.update(task, completed=n))
        tmp = _atomic(rows_path).with_suffix(".npz")
        np.savez(tmp, x=data.x, column=data.column, y=data.y)
        os.replace(tmp, rows_path)
    loaded = np.load(rows_path)
    return TrainingSet(x=loaded["x"], column=loaded["column"], y=loaded["y"])


def _selection(
    config: WorldConfig, model_dir: Path, cfg: TrainConfig, work: Path, console: Console
) -> dict[str, Any]:
    """The selection correction of the served model (`sim.selection`), fitted on plays of the
    world's own span at seeds from seed + 2 (neither training's seeds nor evaluation's); cached
    with the same decisions' fit with an offset per issuer beside it, so either can be exported."""
    import torch

    from sim.selection import default_workers, fit_selection

    path = work / f"selection-r{cfg.selection_rounds}-n{cfg.selection_seeds}.json"
    if path.exists() and "issuer_offsets" not in json.loads(path.read_text()):
        path.unlink()  # fitted before the offsets per issuer: fit again
    if not path.exists():
        torch.set_num_threads(1)
        seeds, hours = [cfg.seed + 2 + k for k in range(cfg.selection_seeds)], config.traffic.hours
        with _bar(cfg.progress, console) as bar:
            tasks: dict[str, TaskID] = {}

            def show(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=total)
                bar.update(tasks[label], completed=done)

            workers = cfg.workers if cfg.workers is not None else default_workers(len(seeds))
            fit = fit_selection(
                config,
                model_dir,
                seeds=seeds,
                hours=hours,
                rounds=cfg.selection_rounds,
                progress=show,
                workers=workers,
            )
        fitted = {
            "correction": fit.as_dict(),
            "ece_before": fit.ece_before,
            "ece_after": fit.ece_after,
            "by_issuer": dict(fit.by_issuer._asdict()),
            "issuer_offsets": fit.issuer_offsets,
            "ece_after_by_issuer": fit.ece_after_by_issuer,
            "seeds": seeds,
            "hours": hours,
            "rounds": cfg.selection_rounds,
            "decisions": fit.decisions,
        }
        tmp = _atomic(path)
        tmp.write_text(json.dumps(fitted, indent=2))
        os.replace(tmp, path)
    doc: dict[str, Any] = json.loads(path.read_text())
    if cfg.selection_by_issuer:
        offsets = doc["issuer_offsets"].values()
        console.print(
            "selection correction with an offset per issuer: "
            + ", ".join(f"{k} {v:.4f}" for k, v in doc["by_issuer"].items())
            + f", {len(offsets)} offsets in [{min(offsets, default=0):.3f}, {max(offsets, default=0):.3f}]"
            + f" (chosen-route ECE {doc['ece_before']:.4f} -> {doc['ece_after_by_issuer']:.4f}"
            + f" on {doc['decisions']:,} decisions)"
        )
    else:
        console.print(
            "selection correction: "
            + ", ".join(f"{k} {v:.4f}" for k, v in doc["correction"].items())
            + f" (chosen-route ECE {doc['ece_before']:.4f} -> {doc['ece_after']:.4f}"
            + f" on {doc['decisions']:,} decisions)"
        )
    return doc


def boost_incidents(config: WorldConfig, factor: float) -> WorldConfig:
    """The world with `factor` x its random incidents per day (issuer outages, route degradations),
    at least one a week per issuer and route: a few days of one world show too few incidents for a
    model to learn what one looks like, and a model that never saw one extrapolates wildly in the
    first it meets."""
    if factor == 1.0:
        return config

    def more(e: RandomEpisodes) -> RandomEpisodes:
        return e.model_copy(update={"per_day": min(24.0, max(e.per_day * factor, 1 / 7))})

    return config.model_copy(
        update={
            "issuers": [
                i.model_copy(update={"random_outages": more(i.random_outages)}) for i in config.issuers
            ],
            "routes": [
                r.model_copy(update={"random_degradations": more(r.random_degradations)})
                for r in config.routes
            ],
        }
    )
