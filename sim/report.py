"""The evaluation report: Markdown tables and PNG plots (matplotlib, headless) from `evaluate_world`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sim.play import PlayResult

__all__ = ["write_report"]

_ROWS = (
    ("first_attempt_approval", "first-attempt approval", "pct"),
    ("final_approval", "final approval", "pct"),
    ("net_revenue", "net revenue (major units)", "money"),
    ("retries", "retries", "int"),
    ("recovered_revenue", "recovered revenue (major units)", "money"),
    ("retries_per_recovered", "retries per recovered payment", "f2"),
    ("violations", "network-rule violations", "int"),
)


def _fmt(v: float | None, kind: str) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "money":
        return f"{v / 100:,.0f}"
    if kind == "int":
        return f"{v:,.0f}"
    return f"{v:.2f}"


def _cell(stat: dict[str, float], kind: str) -> str:
    mean, ci = stat["mean"], stat["ci95"]
    if ci is None or not math.isfinite(ci):
        return _fmt(mean, kind)
    return f"{_fmt(mean, kind)} ± {_fmt(ci, kind)}"


def _plots(doc: dict[str, Any], out: Path) -> list[str]:
    name = doc["world"]
    files: list[str] = []
    series: dict[str, dict[int, PlayResult]] = doc.get("_series", {})
    if "calibration" in doc:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        bins = doc["calibration"]["reliability"]
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
        ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", label="authopt (first attempts)")
        ax.set_xlabel("predicted P(approve)")
        ax.set_ylabel("observed approval rate")
        ax.set_title(f"Reliability — {name}\nECE {doc['calibration']['ece_evaluation_traffic']:.4f}")
        ax.legend(loc="upper left")
        fig.tight_layout()
        files.append(f"{name}-reliability.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    if series:
        seed = doc["seeds"][0]
        fig, ax = plt.subplots(figsize=(8, 4))
        for policy, by_seed in series.items():
            r = by_seed[seed]
            t0 = min(r.at)
            hours: dict[int, list[bool]] = {}
            for at, ok in zip(r.at, r.first_approved, strict=True):
                hours.setdefault(int((at - t0) // 3600), []).append(ok)
            xs = sorted(hours)
            ax.plot(xs, [sum(hours[h]) / len(hours[h]) for h in xs], label=policy, lw=1.2)
        ax.set_xlabel("hour of the world")
        ax.set_ylabel("first-attempt approval")
        ax.set_title(f"Approval by policy over time — {name}, seed {seed}")
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        files.append(f"{name}-approval-over-time.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
        segments: dict[str, Callable[[PlayResult, int], bool]] = {
            "domestic": lambda r, j: not r.cross_border[j],
            "cross-border": lambda r, j: r.cross_border[j],
            "visa": lambda r, j: r.network[j] == 1,
            "mastercard": lambda r, j: r.network[j] == 2,
            "customer-initiated": lambda r, j: not r.recurring[j],
            "recurring": lambda r, j: r.recurring[j],
        }
        if "static" in series:
            fig, ax = plt.subplots(figsize=(8, 4))
            others = [p for p in series if p != "static"]
            width = 0.8 / max(len(others), 1)
            for k, policy in enumerate(others):
                ups = []
                for seg in segments.values():
                    diffs = []
                    for s in doc["seeds"]:
                        a, b = series[policy][s], series["static"][s]
                        idx = [j for j in range(a.payments) if seg(a, j)]
                        if idx:
                            diffs.append(
                                sum(a.first_approved[j] - b.first_approved[j] for j in idx) / len(idx)
                            )
                    ups.append(100 * sum(diffs) / len(diffs) if diffs else 0.0)
                ax.bar([i + k * width for i in range(len(segments))], ups, width, label=policy)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(segments))], list(segments), fontsize=8)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylabel("first-attempt approval vs static (pp)")
            ax.set_title(f"Uplift by segment — {name}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            files.append(f"{name}-uplift-by-segment.png")
            fig.savefig(out / files[-1], dpi=110)
            plt.close(fig)
    shares: list[dict[str, Any]] = doc.get("_react_series", [])
    if shares:
        first = [x for x in shares if x["seed"] == doc["seeds"][0]] or shares
        pick = max(first, key=lambda x: x["duration_min"])
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.axvspan(0, pick["duration_min"], color="red", alpha=0.12, label="incident")
        for policy, ys in pick["share"].items():
            ax.plot(_x(pick), [math.nan if y is None else y for y in ys], label=policy, lw=1.2)
        ax.set_xlabel("minutes from the incident's start")
        ax.set_ylabel(f"share of eligible first attempts on {pick['route']}")
        ax.set_title(f"Traffic on {pick['route']} around its incident — {name}, seed {pick['seed']}")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        files.append(f"{name}-incident-share.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    return files


def _x(series: dict[str, Any]) -> list[float]:
    return [float(m) for m in series["minutes"]]


def _seconds(v: float | None) -> str:
    return "never" if v is None else f"{v:,.0f}"


def _reactions(reactions: dict[str, Any]) -> list[str]:
    summary = reactions["summary"]
    names = [n for n in ("authopt", "success-rate", "oracle", "static") if n in summary]
    lines = [
        "Reactions to route incidents (world time). Time-to-react: seconds from the start until the "
        "policy sends fewer than half as many of the payments it would have sent to the route without "
        "incidents (same payments, same draws); time-to-return: seconds from the end until it sends at "
        "least half again; lost: the oracle's first-attempt approval minus the policy's on the "
        "incident's payments that could use the route (pp), and on those of the 30 minutes before it "
        "(the policy's usual gap) and after it (after minus before: what a slow return costs); "
        "isolated: incidents no other route incident overlaps, 30 minutes either side included. "
        "`sim/react.py`.",
        "",
        "| policy | incidents measured | reacted | median time-to-react (s) | median time-to-return (s) "
        "| isolated: measured, median react / return (s) "
        "| mean approval lost vs oracle, before / during / after (pp) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for n in names:
        v = summary[n]
        lost, before, after = (
            v["mean_lost_vs_oracle_pp"],
            v.get("mean_lost_before_vs_oracle_pp"),
            v.get("mean_lost_after_vs_oracle_pp"),
        )
        lines.append(
            f"| {n} | {v['measured']} of {v['incidents']} | {v['reacted']} | {_seconds(v['median_react_s'])} "
            f"| {_seconds(v['median_return_s'])} | {_isolated(v)} "
            f"| {_pp(before)} / {_pp(lost)} / {_pp(after)} |"
        )
    lines += [
        "",
        "| seed | route | start (h) | minutes | severity | payments | isolated | "
        + " | ".join(f"{n}: react / return (s), lost before / during / after (pp)" for n in names)
        + " |",
        "|---|---|---:|---:|---:|---:|---|" + "---|" * len(names),
    ]
    for row in reactions["incidents"]:
        cells = []
        for n in names:
            v = row["policies"].get(n, {})
            lost_s = " / ".join(_pp(v.get(f"lost_{k}vs_oracle_pp")) for k in ("before_", "", "after_"))
            if not v.get("measured"):
                cells.append(f"not on the route, {lost_s}")
            else:
                cells.append(f"{_seconds(v['react_s'])} / {_seconds(v['return_s'])}, {lost_s}")
        lines.append(
            f"| {row['seed']} | {row['route']} | {row['start_s'] / 3600:.2f} | {row['minutes']:.0f} "
            f"| {row['severity']:.2f} | {row['payments']:,} | {'yes' if row.get('isolated') else 'no'} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _isolated(v: dict[str, Any]) -> str:
    n = v.get("isolated_measured", 0)
    if not n:
        return "none"
    return f"{n}: {_seconds(v['isolated_median_react_s'])} / {_seconds(v['isolated_median_return_s'])}"


def _pp(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


_PAIRED_ROWS = (
    ("authopt_minus_static_pp", "authopt − static, first-attempt approval (pp)"),
    ("authopt_minus_success-rate_pp", "authopt − success-rate (pp)"),
    ("oracle_minus_static_pp", "oracle − static (pp)"),
    ("capture_first_attempt", "capture of the oracle's uplift (ratio of paired means)"),
)


def _paired(paired: dict[str, Any]) -> list[str]:
    lines = [
        f"Paired on the same payments ({paired['payments']:,}), 95 % percentile bootstrap over "
        f"{paired['blocks']} blocks of {paired['block_s'] / 3600:g} h of world time per seed "
        f"({paired['draws']} draws):",
        "",
        "| estimate | value | 95 % interval | half-width |",
        "|---|---:|---:|---:|",
    ]
    for key, label in _PAIRED_ROWS:
        if key in paired:
            e = paired[key]
            lines.append(
                f"| {label} | {e['estimate']:.3f} | [{e['lo']:.3f}, {e['hi']:.3f}] | {e['half_width']:.3f} |"
            )
    return [*lines, ""]


def write_report(docs: list[dict[str, Any]], out: Path) -> Path:
    lines = ["# authopt evaluation", ""]
    for doc in docs:
        seeds = ", ".join(str(s) for s in doc["seeds"])
        lines += [f"## World `{doc['world']}` — model `{doc['model_version']}`, seeds {seeds}", ""]
        names = list(doc["summary"])
        lines.append("| metric | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        for key, label, kind in _ROWS:
            lines.append(
                f"| {label} | " + " | ".join(_cell(doc["summary"][p][key], kind) for p in names) + " |"
            )
        lines += ["", "Mean over seeds ± 95 % t-interval half-width. Money sums minor units of the world's "
                  "currencies at par, shown in major units.", ""]  # fmt: skip
        if doc.get("targets"):
            lines += ["| target | required | measured | met |", "|---|---|---:|---|"]
            for name, t in doc["targets"].items():
                lines.append(
                    f"| {name} | {t['target']} | {t['measured']:.4f} | {'yes' if t['met'] else '**no**'} |"
                )
            lines.append("")
        cal = doc.get("calibration", {})
        if "ece_truth" in cal:
            lines += [
                f"Calibration of authopt's chosen-route probability on {cal['rows']:,} first attempts: ECE "
                f"against the outcomes {cal['ece_evaluation_traffic']:.4f}, against the world's own "
                f"approval probabilities {cal['ece_truth']:.4f}; a perfectly calibrated model would show "
                f"{cal['ece_noise_floor']:.4f} against the outcomes of these payments (outcome noise alone).",
                "",
            ]
        if doc.get("paired"):
            lines += _paired(doc["paired"])
        if doc.get("reactions"):
            lines += _reactions(doc["reactions"])
        if "off_policy" in doc:
            lines += [
                "Off-policy estimates of authopt's first-attempt value per payment (minor units) from the "
                "logging policy's log, against the value authopt got on-policy:",
                "",
                "| seed | IPS | DR | on-policy | logging policy |",
                "|---|---:|---:|---:|---:|",
            ]
            for s, v in doc["off_policy"].items():
                ips = f"{v['ips']:.1f} ± {1.96 * v['ips_se']:.1f}"
                dr = f"{v['dr']:.1f} ± {1.96 * v['dr_se']:.1f}"
                lines.append(f"| {s} | {ips} | {dr} | {v['on_policy']:.1f} | {v['logging_value']:.1f} |")
            lines.append("")
        for f in _plots(doc, out):
            lines += [f"![{f}]({f})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
