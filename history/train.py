"""`authopt train --log`: a model from a platform's own log alone, with no access to a simulator.

The same pipeline as `authopt train --world` from the event log on: point-in-time replay through
the streams' feature code (`model.dataset.build_training_set`), the ensemble, calibration, export
and manifest. What differs is where the log comes from (`authopt log import` / `log export`, day-
partitioned Parquet) and what cannot be done without a world:

- the hold-out is by time: the newest whole UTC days (at least `holdout_fraction` of the attempts,
  at most half), else the newest `holdout_fraction` of the attempts by time when no day boundary
  gives such a split; its metrics are the manifest's;
- the ranking's selection correction is fitted off-policy on the hold-out days' logged decisions
  (authopt's decision log, or a platform's routing imported with its propensities): those whose
  logged route is the one the new net would have put first, weighted by 1 / their propensity; it
  is applied only when the decisions are a served model's own (another policy's traffic cannot
  show the shift the model's own routing causes: measured, docs/history.md);
- there is no separate on-policy round: when the log's decisions are a served model's, its attempts
  are that model's own routing, trained on and (the newest days) calibrated on;
- without decisions, both are skipped and the manifest says why.

A log that cannot train a sound model is refused with what is wrong (`LogTrainingRefused`), never
trained into NaNs: an empty log, one class only, a route with too few attempts to learn, a span
shorter than the longest shared feature window, routes the server's configuration does not know.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from history.backfill import Engine, backfill, read_rows
from history.errors import HistoryError
from history.ope import collect, predict
from history.store import LogRecords, log_files, read_decisions, read_records
from model.export import export_model
from model.layout import DELAY_BUCKETS_S, INPUT_LAYOUT
from model.net import layout_categorical_groups
from model.numerics import numerics
from model.train import fit_ensemble
from server.models import load_model_dir
from server.policy import SelectionCorrection
from server.selection import MIN_DECISIONS, Decisions, chosen_ece, fit_correction
from server.settings import RouteConfig
from streams.contract import FEATURES, Entity

__all__ = ["LogTrainConfig", "LogTrainingRefused", "holdout_start", "min_span_s", "train_log"]

_APPROVED = attempt_pb2.OUTCOME_STATUS_APPROVED
_DAY_US = 86_400_000_000


class LogTrainingRefused(HistoryError):
    """The log cannot train a sound model; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class LogTrainConfig:
    seed: int = 1000  # the nets' seeds (seed, seed + 1, ...)
    epochs: int = 12
    hidden: int = 128
    members: int = 3
    holdout_fraction: float = 0.15  # the least share of attempts the newest days must hold
    min_route_attempts: int = 200  # fewer attempts on a route: refused (too few to learn it)
    version: str | None = None
    progress: bool = True
    engine: Engine = "local"  # where the training rows are computed (history.backfill)
    master: str = "local[2]"  # the Spark master, with engine "spark"


def min_span_s() -> int:
    """The longest window of the features shared across cards (route, issuer, BIN, merchant): a log
    shorter than it never shows them at the values a served model sees. (The per-card 30-day
    counters are not counted: a log shorter than 30 days undercounts them for its first days, as
    a server that has just started does; the manifest warns.)"""
    card = (Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT)
    return max(f.window_s or f.half_life_s or 0 for f in FEATURES if f.entity not in card)


def _card_window_s() -> int:
    return max(f.window_s or 0 for f in FEATURES)


def holdout_start(times_us: Sequence[int], fraction: float) -> int:
    """The epoch µs from which attempts are held out: the start of the newest UTC days holding at
    least `fraction` of the attempts and at most half, else the `1 - fraction` quantile of the times."""
    n = len(times_us)
    times = np.asarray(times_us, dtype=np.int64)
    days = np.unique(times // _DAY_US)
    for day in days[::-1][:-1]:  # a boundary that leaves at least one older day
        held = n - int(np.searchsorted(times, day * _DAY_US, side="left"))
        if held >= fraction * n:
            if held <= n / 2:
                return int(day * _DAY_US)
            break
    return int(times[min(n - 1, int(n * (1 - fraction)))])


def _check(
    log: LogRecords, routes: Sequence[RouteConfig], cfg: LogTrainConfig, where: Path
) -> dict[str, Any]:
    """Refuse a log that cannot train a sound model; else its summary for the manifest."""
    if not log.records:
        raise LogTrainingRefused(
            f"{where}: no attempts (expected day-partitioned Parquet under {where / 'attempts'}, "
            "as `authopt log import` or `authopt log export` writes)"
        )
    by_route: Counter[str] = Counter()
    approved = 0
    for raw in log.records:
        o = events_pb2.AttemptEvent.FromString(raw).outcome
        by_route[o.route_id] += 1
        approved += o.status == _APPROVED
    n = len(log.records)
    if approved in (0, n):
        what = "approved" if approved else "declined or failed"
        raise LogTrainingRefused(
            f"{where}: all {n:,} attempts were {what}: one class only, nothing to learn approval from"
        )
    known = {r.id for r in routes}
    if not known:
        raise LogTrainingRefused(
            "no routes configured: pass --routes (the server's AUTHOPT_SERVER_ROUTES JSON) so the model "
            "knows each route's cost"
        )
    unknown = sorted(set(by_route) - known)
    if unknown:
        listed = ", ".join(f"{r} ({by_route[r]:,} attempts)" for r in unknown)
        raise LogTrainingRefused(
            f"{where}: routes the server's configuration does not know: {listed}; add them to the "
            f"routes (known: {', '.join(sorted(known))}) or leave their attempts out of the log"
        )
    thin = sorted(r for r, k in by_route.items() if k < cfg.min_route_attempts)
    if thin:
        listed = ", ".join(f"{r} ({by_route[r]:,} attempts)" for r in thin)
        raise LogTrainingRefused(
            f"{where}: too few attempts to learn a route from: {listed}; need at least "
            f"{cfg.min_route_attempts:,} each (--min-route-attempts)"
        )
    span_s = (log.times_us[-1] - log.times_us[0]) / 1e6
    if span_s < min_span_s():
        raise LogTrainingRefused(
            f"{where}: the log spans {span_s / 3600:.1f} h, shorter than the longest shared feature "
            f"window ({min_span_s() / 3600:g} h): its features never reach what a served model sees"
        )
    warnings = []
    if span_s < _card_window_s():
        warnings.append(
            f"the log spans {span_s / 86400:.1f} days, less than the per-card counters' "
            f"{_card_window_s() // 86400} days: they are undercounted in its first days"
        )
    return {
        "attempts": n,
        "duplicates_dropped": log.duplicates,
        "first_attempt_at": _iso(log.times_us[0]),
        "last_attempt_at": _iso(log.times_us[-1]),
        "span_days": round(span_s / 86400, 3),
        "approved_share": round(approved / n, 6),
        "attempts_by_route": dict(sorted(by_route.items())),
        "warnings": warnings,
    }


def _iso(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _work_dir(out: Path, log_dir: Path, cfg: LogTrainConfig) -> Path:
    """A cache of the rows and checkpoints, keyed by the log's files (name, size, mtime)."""
    h = hashlib.blake2b(digest_size=8)
    for f in log_files(log_dir):
        st = f.stat()
        h.update(f"{f.relative_to(log_dir)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"{cfg.holdout_fraction}".encode())
    return out / ".work" / f"log-{h.hexdigest()}"


def _selection_from_log(
    net: torch.nn.Module,
    metrics: dict[str, float],
    work: Path,
    log_dir: Path,
    routes: Sequence[RouteConfig],
    holdout_us: int,
) -> dict[str, Any]:
    """The selection correction of the trained net, fitted off-policy on the hold-out days' logged
    decisions: those whose logged route is the one this net would have put first (by expected value,
    uncorrected), each weighted by 1 / its logged propensity — an unbiased sample of the net's own
    choices under an exploring logging policy (`server.selection`)."""
    uncorrected = work / "uncorrected"
    if not (uncorrected / "v1").exists():
        export_model(net, uncorrected, "v1", metrics=metrics)
    model = load_model_dir(uncorrected / "v1")
    logged = collect(log_dir, routes, since_us=holdout_us)
    d = Decisions(weight=[])
    assert d.weight is not None
    for p, amount, cost, chosen, mu, ok in zip(
        predict(model, logged, corrected=False),
        logged.amount,
        logged.cost,
        logged.chosen,
        logged.propensity,
        logged.approved,
        strict=True,
    ):
        if math.isnan(mu) or int(np.argmax(amount * p - cost)) != chosen:
            continue
        d.route_p.append([float(v) for v in p])
        d.chosen.append(chosen)
        d.approved.append(bool(ok))
        d.weight.append(1.0 / mu)
    correction = fit_correction(d)
    versions = sorted(
        {dec.response.model_version for dec in read_decisions(log_dir) if dec.response.model_version}
    )
    served = sum(
        1
        for dec in read_decisions(log_dir)
        if dec.response.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL
    )
    return {
        "correction": {} if correction.is_identity else dict(correction._asdict()),
        "decisions": len(d.chosen),
        "logged_decisions": len(logged),
        # None (JSON null) when no decision was the net's own choice: nothing to measure.
        "ece_before": _finite_or_none(chosen_ece(d, SelectionCorrection())),
        "ece_after": _finite_or_none(chosen_ece(d, correction)),
        "served_model_decisions": served,
        "served_versions": versions,
    }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train_log(
    log_dir: Path, out: Path, routes: Sequence[RouteConfig], cfg: LogTrainConfig = LogTrainConfig()
) -> Path:
    """Train on the log under `log_dir` alone and export under `out`; returns the version directory."""
    console = Console(stderr=True, quiet=not cfg.progress)
    version = cfg.version or f"log-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if (out / version).exists():
        raise FileExistsError(f"model version {version!r} already exists under {out}; pass another --version")
    log = read_records(log_dir)
    info = _check(log, routes, cfg, log_dir)
    for warning in info["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    holdout_us = holdout_start(log.times_us, cfg.holdout_fraction)
    console.print(
        f"log: {info['attempts']:,} attempts, {info['first_attempt_at']} .. {info['last_attempt_at']}; "
        f"hold-out from {_iso(holdout_us)}"
    )
    work = _work_dir(out, log_dir, cfg)
    work.mkdir(parents=True, exist_ok=True)
    rows_dir = work / "rows"
    if not (rows_dir / "_summary.json").exists():
        costs = {r.id: r.cost_bps for r in routes}
        console.print(f"point-in-time rows of the log ({cfg.engine} engine)")
        backfill(
            log_dir,
            rows_dir,
            costs,
            engine=cfg.engine,
            master=cfg.master,
            progress=lambda message: console.print(f"  {message}"),
        )
    rows = read_rows(rows_dir)
    data = rows.data
    rows_summary = rows.summary.as_dict()
    split_row = rows.split_row(holdout_us)
    n = len(data.y)
    if not 0 < split_row < n:
        raise LogTrainingRefused(f"{log_dir}: the time split leaves no rows on one side ({split_row} of {n})")
    held = data.y[split_row:]
    if held.min() == held.max():
        raise LogTrainingRefused(f"{log_dir}: the hold-out days hold one class only; a longer log is needed")
    console.print(f"training rows: {split_row:,}, hold-out rows: {n - split_row:,}")
    result = fit_ensemble(
        data,
        members=cfg.members,
        n_buckets=len(DELAY_BUCKETS_S),
        seed=cfg.seed,
        epochs=cfg.epochs,
        hidden=cfg.hidden,
        val_fraction=(n - split_row) / n,
        holdout="newest",
        checkpoint_dir=work / "checkpoint",
        progress=cfg.progress,
        categorical_groups=layout_categorical_groups(INPUT_LAYOUT),
    )
    skipped: dict[str, str] = {}
    selection: dict[str, float] = {}
    steps: dict[str, object] = {}
    if log_files(log_dir, "decisions"):
        fit = _selection_from_log(result.net, result.metrics, work, log_dir, routes, holdout_us)
        steps["selection"] = fit
        served = fit["served_model_decisions"]
        fit["applied"] = bool(fit["correction"]) and served > 0
        if fit["applied"]:
            selection = fit["correction"]
            console.print(
                f"selection correction from {fit['decisions']:,} logged decisions: "
                + ", ".join(f"{k} {v:.4f}" for k, v in selection.items())
                + f" (chosen-route ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f})"
            )
        elif not fit["correction"]:
            skipped["selection_correction"] = (
                f"{fit['decisions']} logged decisions where this model would have chosen the logged route "
                f"(need {MIN_DECISIONS}, both outcomes): too few to fit"
            )
        else:
            # Measured (docs/history.md, proof 1): fitted on a logging policy's decisions, the
            # correction raised approval a little but made the served model's calibration worse
            # (ECE 0.023 -> 0.063): another policy's traffic cannot show the feature shift the model's
            # own routing causes, and that shift sets the level the correction moves.
            skipped["selection_correction"] = (
                "fitted (data_summary.selection) but not applied: the log's decisions are another policy's "
                "routing, not a served model's, and a level fitted there miscalibrates the model's own "
                "traffic (docs/history.md)"
            )
        if served:
            steps["onpolicy"] = (
                f"{served:,} of the log's decisions are a served model's own routing "
                f"({', '.join(fit['served_versions'])}): their attempts are trained on, and the hold-out "
                "(its newest days) calibrates on them; no separate on-policy round"
            )
        else:
            skipped["onpolicy_refit"] = (
                "the log's decisions are not a served authopt model's (a platform's routing, imported): "
                "the refit on a model's own routing needs its decisions"
            )
    else:
        absent = f"no decisions in the log ({log_dir / 'decisions'} absent)"
        skipped = {
            "onpolicy_refit": f"{absent}: the refit on a model's own routing needs its logged decisions",
            "selection_correction": f"{absent}: the chosen route's predicted vs realized approval needs them",
        }
    for step, reason in skipped.items():
        console.print(f"{step} skipped: {reason}")
    manifest_info: dict[str, object] = {
        "source": "log",
        "log": {**info, "dir": str(log_dir), "files": len(log_files(log_dir))},
        "holdout": {"from": _iso(holdout_us), "rows": n - split_row, "train_rows": split_row},
        **rows_summary,
        "rows": n,
        **steps,
        "skipped": skipped,
        "numerics": numerics(),
    }
    path = export_model(
        result.net,
        out,
        version,
        metrics=result.metrics,
        data_summary=manifest_info,
        route_selection=selection,
    )
    console.print(
        f"exported {path} — " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
    )
    return path
