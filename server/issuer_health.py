"""Zero-lag issuer health: how far an issuer's approval fell in the last minutes, kept in process.

The model sees an issuer outage through the streams' hour-long features (`share_91_96_1h`), so in
the first tens of minutes of an outage its probabilities are those of an issuer that answers: on
`outage-heavy` about 0.37 predicted against 0.17 approved, most of the chosen route's calibration
error (docs/model.md). The server receives each outcome first. `IssuerHealth` keeps, per issuer key
(the streams' ISSUER key, ``country|bin6``), decayed sums over a short window (half-life
`half_life_s`) of the first attempts, those declined as unavailable (91, 96, 19: the contract's
``issuer_unavailable`` class), the approvals and what the decisions expected of them (the model's
probability for the route used, before this correction). While the issuer is **down** — at least
`min_unavailable` unavailable outcomes in the window and at least `min_share` of its attempts —
every route's approval probability for that issuer's cards is multiplied by the window's observed /
expected approval, shrunk toward 1 by `prior` outcomes and never above 1: the order of the routes is
kept, the probabilities (and so the trade against each route's cost) are not.

A route's own incident answers 91/96 for every issuer it serves, and for as long as the model has not
seen it in its minute rates, the issuers it serves get a factor below 1 on every route; the model's
route rates see it within a minute or two, its expectation falls with the route, and the observed /
expected ratio returns towards 1. Telling the two apart by the other issuers on the same routes does
not work where it matters: an issuer's outage takes all its BINs (keys) down at once, so the "other
issuers" of one BIN are down too (measured: it kept the factor at 1 for most of an outage).

Outside an outage an issuer answers 91/96 rarely, so the factor is exactly 1: nothing moves on calm
traffic, however thin. O(1) per decision and per outcome, a bounded number of keys (the least
recently updated forgotten first), no lock: the server's event loop and the simulator each call it
from one thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from streams.contract import Entity, decline_class, entity_key

__all__ = ["IssuerHealth", "IssuerHealthSettings", "is_unavailable", "issuer_key"]

_LN2 = math.log(2.0)


def issuer_key(issuer_country: str, bin_: str) -> str:
    """The key issuer health keeps a card's issuer under: the streams' ISSUER key (``country|bin6``)."""
    return entity_key(Entity.ISSUER, issuer_country=issuer_country, bin_=bin_)


def is_unavailable(response_code: str) -> bool:
    """A decline that says the issuer could not be reached (the contract's ``issuer_unavailable``)."""
    return decline_class(response_code) == "issuer_unavailable"


@dataclass(frozen=True, slots=True)
class IssuerHealthSettings:
    """Issuer health's thresholds (defaults chosen on the simulator's worlds, not per world)."""

    half_life_s: float = 90.0
    min_unavailable: float = 3.0
    min_share: float = 0.2
    prior: float = 0.25
    floor: float = 0.02
    max_keys: int = 20_000

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"issuer health half_life_s must be > 0, got {self.half_life_s}")
        if not 0 < self.min_share <= 1 or self.min_unavailable <= 0:
            raise ValueError("issuer health needs 0 < min_share <= 1 and min_unavailable > 0")
        if self.prior < 0 or not 0 < self.floor <= 1 or self.max_keys < 1:
            raise ValueError("issuer health needs prior >= 0, 0 < floor <= 1 and max_keys >= 1")


class _Sums:
    """Decayed sums over the window: attempts, unavailable answers, and (for the outcomes whose
    expectation is known) approvals and approvals expected."""

    __slots__ = ("at", "expected", "n", "ok", "unavailable")

    def __init__(self, at: float) -> None:
        self.at = at
        self.n = self.unavailable = self.ok = self.expected = 0.0

    def decay_to(self, at: float, rate: float) -> None:
        dt = at - self.at
        if dt <= 0:
            return
        f = math.exp(-rate * dt)
        self.n *= f
        self.unavailable *= f
        self.ok *= f
        self.expected *= f
        self.at = at

    def weight_at(self, at: float, rate: float) -> float:
        return math.exp(-rate * max(0.0, at - self.at))


class IssuerHealth:
    """Per issuer key, the factor its cards' approval probabilities get now (1: as the model says)."""

    def __init__(self, settings: IssuerHealthSettings | None = None) -> None:
        self.settings = s = settings or IssuerHealthSettings()
        self._rate = _LN2 / s.half_life_s
        self._issuers: OrderedDict[str, _Sums] = OrderedDict()

    def __len__(self) -> int:
        return len(self._issuers)

    def observe(
        self,
        issuer: str,
        at: float,
        approved: bool,
        unavailable: bool,
        expected: float | None = None,
    ) -> None:
        """One first attempt's outcome for a card of `issuer` at `at` (epoch s): approved, declined
        as unavailable, and what the decision expected of its route before this correction (None:
        not known; it then counts towards the shares only)."""
        state = self._issuers.get(issuer)
        if state is None:
            state = self._issuers[issuer] = _Sums(at)
            if len(self._issuers) > self.settings.max_keys:
                self._issuers.popitem(last=False)
        else:
            self._issuers.move_to_end(issuer)
            state.decay_to(at, self._rate)
        state.n += 1.0
        state.unavailable += 1.0 if unavailable else 0.0
        if expected is not None and 0.0 <= expected <= 1.0:
            state.ok += 1.0 if approved else 0.0
            state.expected += expected

    def factor(self, issuer: str, now: float) -> float:
        """What to multiply every route's approval probability by for a card of `issuer` at `now`:
        1.0 unless the issuer is down (see the module's doc)."""
        s = self.settings
        state = self._issuers.get(issuer)
        if state is None:
            return 1.0
        w = state.weight_at(now, self._rate)
        unavailable = state.unavailable * w
        if unavailable < s.min_unavailable or unavailable < s.min_share * state.n * w:
            return 1.0
        ratio = (state.ok + s.prior) / (state.expected + s.prior)
        return min(1.0, max(s.floor, ratio))
