"""`authopt evaluate --log`: a candidate model (and the champion) scored off-policy on a log.

Composes `history.ope` into one results document — the logged routing's own value, each model's DM /
IPS / SNIPS / DR estimates of first-attempt approval and net revenue with bootstrap intervals and the
effective sample size, the candidate's uplift over the champion (DR, paired), the candidate's
calibration on the logged chosen routes, per-segment tables (network, issuer country, route) — and
writes it as `ope.json` and `report.md` (+ a reliability plot when matplotlib is installed).

The evaluation window defaults to the candidate's own hold-out (from its manifest, when it was trained
on a log: rows it never saw), else the whole log.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from history.errors import HistoryError
from history.ope import (
    ESTIMATORS,
    METRICS,
    LoggedDecisions,
    calibration,
    collect,
    evaluate_policy,
    logging_value,
    model_policy,
    predict,
    rule_violations,
    uplift,
)
from server.models import LoadedModel, load_model_dir
from server.settings import RouteConfig

__all__ = ["OfflineEvaluationError", "evaluate_log", "holdout_since", "write_report"]

SEGMENTS = ("network", "issuer_country", "route")
MIN_SEGMENT_ROWS = 500


class OfflineEvaluationError(HistoryError):
    """The log cannot be evaluated on (no decisions in the window, models that do not load)."""


def holdout_since(model: LoadedModel) -> int | None:
    """The start of the model's hold-out (epoch µs) when it was trained on a log, else None."""
    holdout = model.manifest.data_summary.get("holdout")
    start = holdout.get("from") if isinstance(holdout, dict) else None
    if not start:
        return None
    return int(datetime.fromisoformat(str(start).replace("Z", "+00:00")).timestamp() * 1_000_000)


def _load(path: Path, role: str) -> LoadedModel:
    try:
        return load_model_dir(path)
    except Exception as exc:
        raise OfflineEvaluationError(f"{role} {path}: {exc}") from exc


def evaluate_log(
    log_dir: Path,
    routes: Sequence[RouteConfig],
    candidate_dir: Path,
    *,
    champion_dir: Path | None = None,
    since: datetime | None = None,
    exploration: float = 0.0,
    resamples: int = 300,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The results document (see the module docstring)."""
    candidate = _load(candidate_dir, "candidate")
    champion = _load(champion_dir, "champion") if champion_dir is not None else None
    since_us = int(since.timestamp() * 1e6) if since is not None else holdout_since(candidate)
    logged = collect(log_dir, routes, since_us=since_us, progress=progress)
    if not len(logged):
        reasons = dict(logged.skipped) or {"no decisions in the log": 0}
        raise OfflineEvaluationError(
            f"{log_dir}: no logged first-attempt decisions to evaluate on (skipped: {reasons}; "
            f"join: {logged.join}); a log needs DIR/decisions — authopt's decision log (`authopt log "
            "export`) or a history imported with candidate_routes and logging_propensity"
        )
    warnings = []
    if not logged.has_propensities:
        warnings.append(
            "the logged decisions carry no propensities: only the direct method (DM) is estimated, and "
            "it is biased wherever the reward model is wrong"
        )
    models = {"candidate": candidate, **({"champion": champion} if champion else {})}
    p = {role: predict(m, logged) for role, m in models.items()}
    reward_model = "champion" if champion else "candidate"
    q_hat = p[reward_model]
    pis = {role: model_policy(m, logged, exploration) for role, m in models.items()}
    values = {role: evaluate_policy(logged, pi, q_hat, resamples=resamples) for role, pi in pis.items()}
    doc: dict[str, Any] = {
        "log": str(log_dir),
        "window_from": _iso(since_us) if since_us is not None else None,
        "decisions": len(logged),
        "first_decision_at": _iso(int(logged.at[0] * 1e6)),
        "last_decision_at": _iso(int(logged.at[-1] * 1e6)),
        "skipped": dict(logged.skipped),
        "join": logged.join,
        "exploration": exploration,
        "reward_model": reward_model,
        "warnings": warnings,
        "models": {role: m.version for role, m in models.items()},
        "logging": {k: v.as_dict() for k, v in logging_value(logged, resamples=resamples).items()},
        "policies": {role: v.as_dict() for role, v in values.items()},
        "calibration": {
            role: calibration(logged, predict(m, logged, corrected=False)) for role, m in models.items()
        },
        "segments": _segments(logged, pis, q_hat),
        "rules": {role: rule_violations(m, logged).as_dict() for role, m in models.items()},
    }
    if champion:
        doc["uplift"] = {
            metric: uplift(values["candidate"], values["champion"], metric, resamples=resamples).as_dict()
            for metric in METRICS
        }
    return doc


def _segments(logged: LoggedDecisions, pis: dict[str, list[Any]], q_hat: list[Any]) -> dict[str, Any]:
    """Per segment value with at least MIN_SEGMENT_ROWS decisions: each policy's DR approval, the
    logged approval, and the rows."""
    out: dict[str, Any] = {}
    approved = np.array(logged.approved)
    for name in SEGMENTS:
        labels = np.array(logged.segments[name])
        table = []
        for value, count in Counter(labels.tolist()).most_common():
            if count < MIN_SEGMENT_ROWS:
                continue
            rows = labels == value
            entry: dict[str, Any] = {"value": value, "rows": count, "logged": float(approved[rows].mean())}
            for role, pi in pis.items():
                est = evaluate_policy(logged, pi, q_hat, resamples=100, rows=rows).estimates["approval"]
                best = est.get("dr") or est["dm"]
                entry[role] = best.as_dict()
            table.append(entry)
        out[name] = table
    return out


def _iso(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _pct(v: float, metric: str) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{100 * v:.2f} %" if metric == "approval" else f"{v / 100:,.2f}"


def _cell(est: dict[str, float], metric: str) -> str:
    return f"{_pct(est['value'], metric)} [{_pct(est['low'], metric)}, {_pct(est['high'], metric)}]"


def write_report(doc: dict[str, Any], out: Path) -> Path:
    """Write `ope.json` and `report.md` (+ `reliability.png` with matplotlib) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ope.json").write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
    lines = [
        f"# Off-policy evaluation — candidate `{doc['models']['candidate']}`"
        + (f" vs champion `{doc['models']['champion']}`" if "champion" in doc["models"] else ""),
        "",
        f"Log `{doc['log']}`: {doc['decisions']:,} first-attempt decisions, {doc['first_decision_at']} .. "
        f"{doc['last_decision_at']} (window from {doc['window_from'] or 'the start'}); exploration "
        f"{doc['exploration']:g}; reward model: the {doc['reward_model']}'s P(approve).",
        "",
    ]
    lines += [f"> **Warning:** {w}" for w in doc["warnings"]]
    for metric in METRICS:
        unit = "first-attempt approval" if metric == "approval" else "net revenue per decision (major units)"
        lines += [
            "",
            f"## {unit}",
            "",
            "| policy | " + " | ".join(e.upper() for e in ESTIMATORS) + " | ESS |",
        ]
        lines.append("|---|" + "---:|" * (len(ESTIMATORS) + 1))
        lines.append(
            f"| logged routing (on-policy) | {_cell(doc['logging'][metric], metric)} |"
            + " |" * (len(ESTIMATORS) - 1)
            + " |"
        )
        for role, value in doc["policies"].items():
            cells = [_cell(value[metric][e], metric) if e in value[metric] else "—" for e in ESTIMATORS]
            ess = f"{value['ess']:,.0f}" if math.isfinite(value["ess"]) else "—"
            lines.append(f"| {role} `{doc['models'][role]}` | " + " | ".join(cells) + f" | {ess} |")
        if "uplift" in doc:
            u = doc["uplift"][metric]
            if metric == "approval":
                pp = [f"{100 * u[k]:+.2f}" for k in ("value", "low", "high")]
                text = f"{pp[0]} pp [{pp[1]}, {pp[2]}]"
            else:
                text = _cell(u, metric)
            lines += ["", f"Candidate − champion (DR, paired): **{text}**"]
    lines += ["", "## Calibration on the logged decisions (the net's own P, no selection correction)", ""]
    for role, cal in doc["calibration"].items():
        lines.append(f"- {role}: ECE {cal['ece']:.4f} on {cal['rows']:,} decisions")
    lines += ["", "## Network rules (retry advice replayed on the logged declines)", ""]
    for role, check in doc["rules"].items():
        lines.append(
            f"- {role}: {check['violations']} violations in {check['retries_advised']:,} advised retries "
            f"on {check['declines']:,} declines"
            + (f" (e.g. {check['examples'][0]})" if check["examples"] else "")
        )
    for name, table in doc["segments"].items():
        if not table:
            continue
        roles = [r for r in doc["models"]]
        what = "logged route" if name == "route" else name.replace("_", " ")
        lines += ["", f"## First-attempt approval by {what} (DR)", ""]
        lines.append(f"| {name} | decisions | logged | " + " | ".join(roles) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(roles))
        for row in table:
            cells = [_cell(row[r], "approval") for r in roles]
            lines.append(
                f"| {row['value']} | {row['rows']:,} | {_pct(row['logged'], 'approval')} | "
                + " | ".join(cells)
                + " |"
            )
    plot = _reliability_plot(doc, out)
    if plot:
        lines += ["", f"![reliability]({plot})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _reliability_plot(doc: dict[str, Any], out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
    for role, cal in doc["calibration"].items():
        bins = cal["reliability"]
        ax.plot(
            [b[0] for b in bins], [b[1] for b in bins], marker="o", label=f"{role} (ECE {cal['ece']:.4f})"
        )
    ax.set_xlabel("predicted P(approve), chosen route")
    ax.set_ylabel("observed approval rate")
    ax.set_title("Reliability on the logged decisions")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    return "reliability.png"
