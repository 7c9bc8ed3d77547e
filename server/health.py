"""Zero-lag route health: what the last outcomes say about each route, kept in process.

The server receives every outcome (`ReportOutcome(s)`) before the streams worker has turned it into
features (Kafka, then the worker, then the replica's feature cache: seconds at best). `RouteHealth`
keeps, per route (and with `per_issuer` per route × issuer country), the first attempts' approvals
**observed against expected**: each outcome comes with the approval probability the decision gave
its route (the engine remembers it by request id; for a decision another replica made, the
platform may echo it in `AttemptOutcome.expected_approval`; without either, the key's approval over
the last hour stands in), times the key's usual observed/expected over the last hour (a model persistently
optimistic about a route is not an incident on it). Observed against expected, not against the
route's usual rate: which payments a route gets moves with the routing itself, and what the model
expected of those very payments does not. O(1) per outcome, a bounded number of keys (the least
recently updated is forgotten first), no lock: the server's event loop and the simulator each call
it from one thread.

A route is **demoted** for a request when the outcomes are strong evidence that its approval fell to
`(1 − drop)` × expected or below: a CUSUM of the Bernoulli log-likelihood ratio of "fell" against
"as expected", one term per outcome (an approval counts against, a decline for, more so the likelier
an approval was expected), floored at zero and fading with half-life `evidence_half_life_s`; it
demotes at `evidence` (default 5: odds of about 150 to 1) plus ln(outcomes per minute / 5) on a
busier route (a CUSUM's false alarms come per outcome; this keeps them per hour). Evidence, not a
rate over a window: a collapse shows after a handful of outcomes however thin or busy the traffic.
The fall must also be the route's own: over the fast window (half-life `fast_half_life_s`) the other
candidates' median observed/expected is higher by at least `drop / 2` (an issuer outage lowers every
route for that issuer and demotes none). While demoted a key's usual rates are frozen and the
evidence runs the other way; it is **restored** when the outcomes since are evidence of at least
`evidence / 4` that it approves as expected again (a few approved probes: a wrong restore costs
little, the route is demoted again a few declines later) — the probes are the small, logged share
of traffic the policy still sends first to a demoted route (`policy.explore_with_health`,
`probe_share`).

Off by default (`route_health`): on the simulator's worlds, whose features see an outcome at once,
it reacts faster at high traffic but costs more approval than it saves (docs/model.md).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HealthSettings", "RouteHealth"]

_LN2 = math.log(2.0)
_MIN_BASE = 20.0  # outcomes (decayed) before a key's usual observed / expected is trusted


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Route health's thresholds (defaults chosen on the simulator's worlds, not per world)."""

    fast_half_life_s: float = 60.0
    baseline_half_life_s: float = 3600.0
    evidence_half_life_s: float = 1800.0
    drop: float = 0.35
    evidence: float = 5.0
    probe_share: float = 0.1
    max_keys: int = 20_000
    per_issuer: bool = False  # also judge route x issuer country (off: see docs/model.md)

    def __post_init__(self) -> None:
        if not (self.fast_half_life_s > 0 and self.baseline_half_life_s > self.fast_half_life_s):
            raise ValueError("route health needs 0 < fast_half_life_s < baseline_half_life_s")
        if not 0 < self.drop < 1:
            raise ValueError(f"route health drop must be in (0, 1), got {self.drop}")
        if not 0 <= self.probe_share <= 1:
            raise ValueError(f"route health probe_share must be in [0, 1], got {self.probe_share}")
        if self.evidence <= 0 or self.max_keys < 1:
            raise ValueError("route health needs evidence > 0 and max_keys >= 1")
        if self.evidence_half_life_s <= 0:
            raise ValueError("route health needs evidence_half_life_s > 0")


class _Key:
    """One route's (or route × issuer's) decayed sums: over the fast window the outcomes, the
    approvals, the approvals expected and their variance; over the baseline the outcomes and
    approvals (the expectation of an outcome that comes without one); and the evidence (CUSUM) that
    it fell, or while demoted that it recovered."""

    __slots__ = (
        "at",
        "base_exp",
        "base_n",
        "base_ok",
        "demoted",
        "evidence",
        "fast_exp",
        "fast_n",
        "fast_ok",
        "fell_to",
    )

    def __init__(self, at: float) -> None:
        self.at = at
        self.fast_n = self.fast_ok = self.fast_exp = 0.0
        self.base_n = self.base_ok = self.base_exp = 0.0
        self.evidence = 0.0
        self.demoted = False
        self.fell_to = 1.0  # observed / expected when last demoted

    def decay_to(self, at: float, rates: tuple[float, float, float]) -> None:
        dt = at - self.at
        if dt <= 0:
            return
        fast, base, evidence = (math.exp(-r * dt) for r in rates)
        self.fast_n *= fast
        self.fast_ok *= fast
        self.fast_exp *= fast
        self.base_n *= base
        self.base_ok *= base
        self.base_exp *= base
        self.evidence *= evidence
        self.at = at

    def reset_fast(self) -> None:
        self.fast_n = self.fast_ok = self.fast_exp = 0.0


@dataclass(frozen=True, slots=True)
class _View:
    """A key's fast window at some time: approvals observed and expected, and the window's weight
    (decayed to that time)."""

    ok: float
    expected: float
    n: float

    @property
    def ratio(self) -> float:
        return self.ok / self.expected if self.expected > 0 else 1.0


class RouteHealth:
    """Per route and route × issuer country, observed against expected approval over the last
    minute, and which routes to demote now."""

    def __init__(self, settings: HealthSettings | None = None) -> None:
        self.settings = s = settings or HealthSettings()
        self._fast = _LN2 / s.fast_half_life_s
        self._rates = (self._fast, _LN2 / s.baseline_half_life_s, _LN2 / s.evidence_half_life_s)
        self._keys: OrderedDict[tuple[str, str], _Key] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def observe(
        self, route_id: str, issuer_country: str, at: float, approved: bool, expected: float | None = None
    ) -> None:
        """One first attempt's outcome on `route_id` for a card of `issuer_country`, at `at` (epoch
        s), with the approval probability the decision expected of it (None: not known; the key's
        baseline approval stands in)."""
        keys = ((route_id, ""), (route_id, issuer_country)) if self.settings.per_issuer else ((route_id, ""),)
        for key in keys:
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = _Key(at)
                if len(self._keys) > self.settings.max_keys:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(key)
                state.decay_to(at, self._rates)
            ok = 1.0 if approved else 0.0
            known = expected is not None and 0.0 <= expected <= 1.0
            p: float | None = None
            if known:
                assert expected is not None
                p = expected
                if state.base_n >= _MIN_BASE and state.base_exp > 0:
                    # times the key's usual observed / expected over the last hour: a model that is
                    # persistently optimistic about a route is not an incident on it
                    p *= min(max(state.base_ok / state.base_exp, 0.5), 1.5)
            elif state.base_n >= 1.0:
                p = state.base_ok / state.base_n
            if p is not None:
                p = min(max(p, 0.05), 0.9)  # one outcome is never proof
                state.fast_n += 1.0
                state.fast_ok += ok
                state.fast_exp += p
                # log-likelihood ratio of "fell to (1 - drop) x p" against "p"; while demoted, the
                # other way round (recovered)
                q = p * (1.0 - self.settings.drop)
                llr = math.log(q / p) if approved else math.log((1.0 - q) / (1.0 - p))
                state.evidence = max(0.0, state.evidence + (-llr if state.demoted else llr))
            if not state.demoted:  # frozen while demoted: an incident is not the new normal
                state.base_n += 1.0
                state.base_ok += ok
                state.base_exp += expected if known and expected is not None else ok

    def _view(self, key: tuple[str, str], now: float) -> _View | None:
        state = self._keys.get(key)
        if state is None:
            return None
        # the sums share one decay factor: only the weight needs decaying to `now`
        n = state.fast_n * math.exp(-self._fast * max(0.0, now - state.at))
        return _View(state.fast_ok, state.fast_exp, n)

    def demoted(self, route_ids: Sequence[str], issuer_country: str, now: float) -> dict[str, str]:
        """The routes among `route_ids` to demote for a card of `issuer_country` at `now`, each with
        its reason (empty when none is, or when all would be: then health says nothing)."""
        out: dict[str, str] = {}
        for level in (issuer_country, "") if issuer_country and self.settings.per_issuer else ("",):
            keys = [(r, level) for r in route_ids]
            views = [self._view(k, now) for k in keys]
            for i, (key, view) in enumerate(zip(keys, views, strict=True)):
                if view is None or key[0] in out:
                    continue
                others = sorted(v.ratio for j, v in enumerate(views) if j != i and v is not None and v.n > 0)
                peer = others[len(others) // 2] if others else 1.0
                reason = self._judge(key, view, peer)
                if reason:
                    where = f"for issuer {level}" if level else "overall"
                    out[key[0]] = f"{reason} ({where})"
        if len(out) >= len(route_ids):
            return {}
        return out

    def _judge(self, key: tuple[str, str], view: _View, peer_ratio: float) -> str:
        """Why `key` is demoted now ("" if it is not); moves the key in and out of demotion."""
        s = self.settings
        state = self._keys[key]
        if state.demoted:
            if state.evidence >= s.evidence / 4:
                state.demoted = False
                state.evidence = 0.0
                return ""
        else:
            ratio = view.ratio
            # a CUSUM's false alarms come per outcome: a busier route needs more evidence for the
            # same false alarms per hour (the threshold at 5 outcomes a minute, + ln of the excess)
            per_min = state.base_n * self._rates[1] * 60.0
            if (
                state.evidence < s.evidence + max(0.0, math.log(per_min / 5.0))
                or peer_ratio - ratio < s.drop / 2
            ):
                return ""
            state.demoted, state.fell_to = True, ratio
            state.evidence = 0.0  # from now on, evidence of recovery
            state.reset_fast()
        return f"approval fell to {state.fell_to:.2f}x of what its decisions expected"
