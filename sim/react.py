"""How fast each policy reacts to a route incident: time-to-react, time-to-return, approval lost.

Each policy is played twice on the same payments with the same draws: in the world, and in the same
world without its route incidents (`without_route_incidents`: issuer outages, payments and every draw
unchanged). For every route degradation in the world's span (`World.incidents`, kind "route"), the
payments that matter are those the policy sent to the affected route in the world without incidents:
what it would have done. In time order, on a centered window of `window` of them (a centered window
puts a step change where it happened; a trailing one would report it late, a leading one early):

- **share before**: the share of them it did send to the route in the world, in the `lookback_s`
  before the incident (1 unless an earlier incident still weighs on the policy);
- **time-to-react**: world seconds from the start until that share falls below half the share
  before; None when it never did before the incident ended;
- **time-to-return**: world seconds from the end until the share is back to at least half the share
  before; None when the policy had not reacted, or had not returned within `lookback_s`;
- **approval lost vs the oracle**: the oracle's first-attempt approval minus the policy's over the
  incident's payments that could go to the route (pp), on the same payments with the same draws;
- **approval lost before and after**: the same over the `lookback_s` before the incident starts
  (the policy's usual gap to the oracle) and after it ends: what a slow return costs is the excess
  of after over before (the oracle returns at once);
- **isolated**: no other route incident overlaps the incident or the `lookback_s` before and after
  it. Overlapping incidents blur each other's shares before and after (an earlier incident on the
  same route leaves the policy off it before the next starts; a later one cuts a return short), so
  the summary also gives the medians over the isolated incidents alone.

A policy that would have sent fewer than `min_before` payments to the route in the lookback is not
measured on it. The medians over incidents count an incident the policy never reacted to (or never
returned from) as longer than any other: a median that falls on one is reported as None ("never").
`share_series` gives the share of the route's eligible traffic per minute around an incident (the
report's plot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from sim.config import WorldConfig
from sim.play import PlayResult
from sim.world import Incident, Payment, World

__all__ = [
    "incident_reactions",
    "route_incidents",
    "share_series",
    "summarize_reactions",
    "without_route_incidents",
]

_F = npt.NDArray[np.float64]


def _eligible(world: World, payments: Sequence[Payment], route: int) -> npt.NDArray[np.bool_]:
    return np.array([route in world.eligible_routes(p) for p in payments], dtype=bool)


def _centered(on: _F, window: int) -> _F:
    """The mean of `on` over a window of `window` centered on each position (shorter at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(on)])
    n = len(on)
    idx = np.arange(n)
    lo = np.clip(idx - window // 2, 0, n)
    hi = np.clip(idx + (window - window // 2), 0, n)
    out: _F = (c[hi] - c[lo]) / np.maximum(hi - lo, 1)
    return out


def without_route_incidents(config: WorldConfig) -> WorldConfig:
    """The world with no route degradations, scheduled or random: the same payments, draws and issuer
    outages (a world's random streams are counter-based and independent of each other)."""
    return config.model_copy(
        update={
            "routes": [
                r.model_copy(
                    update={
                        "degradations": [],
                        "random_degradations": r.random_degradations.model_copy(update={"per_day": 0.0}),
                    }
                )
                for r in config.routes
            ]
        }
    )


def route_incidents(world: World, payments: Sequence[Payment]) -> list[Incident]:
    """The route degradations overlapping the payments' span."""
    if not payments:
        return []
    at = [p.at for p in payments]
    return [i for i in world.incidents(min(at), max(at) + 1) if i.kind == "route"]


def incident_reactions(
    world: World,
    payments: Sequence[Payment],
    results: dict[str, PlayResult],
    without: dict[str, PlayResult],
    *,
    window: int = 10,
    lookback_s: float = 1800.0,
    min_before: int = 5,
) -> list[dict[str, Any]]:
    """Per route incident of the payments' span: its facts and, per policy of `results` (played in the
    world) and `without` (the same policy in `without_route_incidents`), its reaction."""
    at_all = np.array([p.at for p in payments], dtype=np.float64)
    if np.any(np.diff(at_all) < 0):
        raise ValueError("payments must be in time order")
    first = float(at_all.min()) if len(at_all) else 0.0
    oracle = results.get("oracle")
    incidents = route_incidents(world, payments)
    out = []
    for inc in incidents:
        r = world.route_index[inc.id]
        ok = _eligible(world, payments, r)
        during = (at_all >= inc.start) & (at_all < inc.end) & ok
        ahead = (at_all >= inc.start - lookback_s) & (at_all < inc.start) & ok
        then = (at_all >= inc.end) & (at_all < inc.end + lookback_s) & ok
        row: dict[str, Any] = {
            "route": inc.id,
            "start_s": inc.start - first,
            "minutes": (inc.end - inc.start) / 60,
            "severity": inc.severity,
            "payments": int(during.sum()),
            "isolated": not any(
                o.start < inc.end + lookback_s and o.end > inc.start - lookback_s
                for o in incidents
                if o is not inc
            ),
            "policies": {},
        }
        for name, result in results.items():
            measured: dict[str, Any] = {"react_s": None, "return_s": None, "measured": False}
            if oracle is not None:
                mine = np.asarray(result.first_approved, dtype=np.float64)
                best = np.asarray(oracle.first_approved, dtype=np.float64)
                for key, where in (
                    ("lost_before_vs_oracle_pp", ahead),
                    ("lost_vs_oracle_pp", during),
                    ("lost_after_vs_oracle_pp", then),
                ):
                    if where.any():
                        measured[key] = float(100 * (best[where].mean() - mine[where].mean()))
            row["policies"][name] = measured
            if name not in without:
                continue
            would = np.asarray(without[name].first_route, dtype=np.int64) == r
            at = at_all[would]
            on = (np.asarray(result.first_route, dtype=np.int64)[would] == r).astype(np.float64)
            before = (at >= inc.start - lookback_s) & (at < inc.start)
            if before.sum() < min_before:
                continue
            share_before = float(on[before].mean())
            measured.update(share_before=share_before, measured=True)
            share = _centered(on, window)
            low = np.flatnonzero((at >= inc.start) & (at < inc.end) & (share < share_before / 2))
            if len(low):
                measured["react_s"] = float(at[low[0]] - inc.start)
                after = (at >= inc.end) & (at < inc.end + lookback_s)
                high = np.flatnonzero(after & (share >= share_before / 2))
                measured["return_s"] = float(at[high[0]] - inc.end) if len(high) else None
        out.append(row)
    return out


def share_series(
    world: World,
    payments: Sequence[Payment],
    results: dict[str, PlayResult],
    route: str,
    start_s: float,
    end_s: float,
    *,
    bin_s: float = 60.0,
    margin_s: float = 1800.0,
) -> dict[str, Any]:
    """The share of the route's eligible payments that each policy sent to `route`, per `bin_s` from
    `margin_s` before the incident [start_s, end_s) (seconds after the first payment) to as long after."""
    r = world.route_index[route]
    at_all = np.array([p.at for p in payments], dtype=np.float64)
    ok = _eligible(world, payments, r)
    t = at_all[ok] - at_all.min()
    edges = np.arange(start_s - margin_s, end_s + margin_s + bin_s, bin_s)
    which = np.digitize(t, edges) - 1
    inside = (which >= 0) & (which < len(edges) - 1)
    counts = np.bincount(which[inside], minlength=len(edges) - 1).astype(np.float64)
    series: dict[str, list[float | None]] = {}
    for name, result in results.items():
        on = (np.asarray(result.first_route, dtype=np.int64)[ok] == r).astype(np.float64)
        hits = np.bincount(which[inside], weights=on[inside], minlength=len(edges) - 1)
        series[name] = [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)]
    return {"minutes": [float((e - start_s) / 60) for e in edges[:-1]], "share": series}


def summarize_reactions(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per policy over every measured incident: median time-to-react and time-to-return, how many
    incidents it reacted to, the mean approval lost vs the oracle before, during and after them; and the
    medians over the isolated incidents alone."""
    names = sorted({n for row in rows for n in row["policies"]})
    out: dict[str, dict[str, float | int | None]] = {}
    for name in names:
        pairs = [(row, row["policies"][name]) for row in rows if name in row["policies"]]
        got = [g for _, g in pairs]
        measured = [g for g in got if g["measured"]]
        alone = [g for row, g in pairs if row.get("isolated") and g["measured"]]
        lost = [g["lost_vs_oracle_pp"] for g in got if "lost_vs_oracle_pp" in g]
        lost_before = [g["lost_before_vs_oracle_pp"] for g in got if "lost_before_vs_oracle_pp" in g]
        lost_after = [g["lost_after_vs_oracle_pp"] for g in got if "lost_after_vs_oracle_pp" in g]
        out[name] = {
            "incidents": len(got),
            "measured": len(measured),
            "reacted": sum(g["react_s"] is not None for g in measured),
            "median_react_s": _median([g["react_s"] for g in measured]),
            "returned": sum(g["return_s"] is not None for g in measured),
            "median_return_s": _median([g["return_s"] for g in measured]),
            "mean_lost_vs_oracle_pp": float(np.mean(lost)) if lost else None,
            "mean_lost_before_vs_oracle_pp": float(np.mean(lost_before)) if lost_before else None,
            "mean_lost_after_vs_oracle_pp": float(np.mean(lost_after)) if lost_after else None,
            "isolated_measured": len(alone),
            "isolated_median_react_s": _median([g["react_s"] for g in alone]),
            "isolated_median_return_s": _median([g["return_s"] for g in alone]),
        }
    return out


def _median(values: Sequence[float | None]) -> float | None:
    """The median with None as longer than any value; None when there are none or it falls on None."""
    if not values:
        return None
    m = float(np.median([math.inf if v is None else v for v in values]))
    return m if math.isfinite(m) else None
