"""Zero-lag route health: what the last minute of outcomes says about each route, kept in process.

The server receives every outcome (`ReportOutcome(s)`) before Kafka and the streams worker do; the
route features the model reads have an hour's half-life, so on their own they move a route's traffic
away from an acquirer incident in minutes. `RouteHealth` keeps, per route and per route × issuer
country, two exponentially decayed approval rates in event time — a fast one (half-life
`fast_half_life_s`, default 60 s) and a baseline (default 1 h) — updated in O(1) per outcome, with a
bounded number of keys (the least recently updated is forgotten first). No lock: the server's event
loop and the simulator each call it from one thread.

A route is **demoted** for a request when its fast approval, over at least `min_outcomes` (decayed)
recent outcomes, has fallen below `(1 − drop)` × its baseline with a z-score of at least `z` (a
binomial test, so a thin minute does not demote), and the fall is the route's own: the other
candidates' median ratio of fast to baseline approval is higher by at least `drop / 2` (an issuer
outage lowers every route for that issuer and demotes none). The route × issuer key is judged first
when it has enough outcomes, then the route. While demoted a key's baseline is frozen, so a long
incident does not become the new normal; it is **restored** when its fast approval is back within
`drop / 2` of the baseline over at least `min_outcomes / 4` outcomes — the evidence comes from the
small, logged share of traffic the policy still sends to a demoted route (`policy.explore_with_health`,
`probe_share`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HealthSettings", "RouteHealth"]

_LN2 = math.log(2.0)


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Route health's thresholds (defaults chosen on the simulator's worlds, not per world)."""

    fast_half_life_s: float = 60.0
    baseline_half_life_s: float = 3600.0
    min_outcomes: float = 6.0
    drop: float = 0.35
    z: float = 2.0
    probe_share: float = 0.1
    max_keys: int = 20_000

    def __post_init__(self) -> None:
        if not (self.fast_half_life_s > 0 and self.baseline_half_life_s > self.fast_half_life_s):
            raise ValueError("route health needs 0 < fast_half_life_s < baseline_half_life_s")
        if not 0 < self.drop < 1:
            raise ValueError(f"route health drop must be in (0, 1), got {self.drop}")
        if not 0 <= self.probe_share <= 1:
            raise ValueError(f"route health probe_share must be in [0, 1], got {self.probe_share}")
        if self.min_outcomes <= 0 or self.z < 0 or self.max_keys < 1:
            raise ValueError("route health needs min_outcomes > 0, z >= 0 and max_keys >= 1")


class _Key:
    """One route's (or route × issuer's) decayed counts: fast and baseline, approved and all."""

    __slots__ = ("at", "base_n", "base_ok", "demoted", "fast_n", "fast_ok")

    def __init__(self, at: float) -> None:
        self.at = at
        self.fast_n = self.fast_ok = self.base_n = self.base_ok = 0.0
        self.demoted = False

    def decay_to(self, at: float, fast_rate: float, base_rate: float) -> None:
        dt = at - self.at
        if dt <= 0:
            return
        fast, base = math.exp(-fast_rate * dt), math.exp(-base_rate * dt)
        self.fast_n *= fast
        self.fast_ok *= fast
        self.base_n *= base
        self.base_ok *= base
        self.at = at


@dataclass(frozen=True, slots=True)
class _View:
    """A key's rates at some time: fast and baseline approval and the fast window's weight."""

    fast: float
    fast_n: float
    base: float
    base_n: float


def _ratio(view: _View | None) -> float | None:
    return view.fast / view.base if view is not None and view.base > 0 and view.fast_n > 0 else None


class RouteHealth:
    """Per route and route × issuer country decayed approval, and which routes to demote now."""

    def __init__(self, settings: HealthSettings | None = None) -> None:
        self.settings = s = settings or HealthSettings()
        self._fast = _LN2 / s.fast_half_life_s
        self._base = _LN2 / s.baseline_half_life_s
        self._keys: OrderedDict[tuple[str, str], _Key] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def observe(self, route_id: str, issuer_country: str, at: float, approved: bool) -> None:
        """One outcome of an attempt on `route_id` for a card of `issuer_country`, at `at` (epoch s)."""
        for key in ((route_id, ""), (route_id, issuer_country)):
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = _Key(at)
                if len(self._keys) > self.settings.max_keys:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(key)
                state.decay_to(at, self._fast, self._base)
            ok = 1.0 if approved else 0.0
            state.fast_n += 1.0
            state.fast_ok += ok
            if not state.demoted:  # frozen while demoted: an incident is not the new normal
                state.base_n += 1.0
                state.base_ok += ok

    def _view(self, key: tuple[str, str], now: float) -> _View | None:
        state = self._keys.get(key)
        if state is None or state.base_n <= 0:
            return None
        dt = max(0.0, now - state.at)
        fast_n = state.fast_n * math.exp(-self._fast * dt)
        base_n = state.base_n * math.exp(-self._base * dt)
        fast = state.fast_ok / state.fast_n if state.fast_n > 0 else 0.0
        return _View(fast, fast_n, state.base_ok / state.base_n, base_n)

    def demoted(self, route_ids: Sequence[str], issuer_country: str, now: float) -> dict[str, str]:
        """The routes among `route_ids` to demote for a card of `issuer_country` at `now`, each with
        its reason (empty when none is, or when all would be: then health says nothing)."""
        out: dict[str, str] = {}
        for level in (issuer_country, "") if issuer_country else ("",):
            keys = [(r, level) for r in route_ids]
            views = [self._view(k, now) for k in keys]
            ratios = [
                v.fast / v.base if v is not None and v.base > 0 and v.fast_n > 0 else None for v in views
            ]
            for i, (key, view) in enumerate(zip(keys, views, strict=True)):
                if view is None or key[0] in out:
                    continue
                others = sorted(r for j, r in enumerate(ratios) if j != i and r is not None)
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
        ratio = view.fast / view.base if view.base > 0 else 1.0
        if state.demoted:
            back = ratio >= 1.0 - s.drop / 2 and view.fast_n >= s.min_outcomes / 4
            if back:
                state.demoted = False
                return ""
        else:
            if view.fast_n < s.min_outcomes or ratio >= 1.0 - s.drop or peer_ratio - ratio < s.drop / 2:
                return ""
            spread = math.sqrt(max(view.base * (1.0 - view.base), 1e-4) / view.fast_n)
            if (view.base - view.fast) / spread < s.z:
                return ""
            state.demoted = True
        return f"approval {view.fast:.2f} in the last minutes vs {view.base:.2f} usually"
