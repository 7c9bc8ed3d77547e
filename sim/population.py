"""Who is in a world, built from its config and seed: issuers, routes, merchants, cards, incidents,
the pay calendar, and the traffic (the payments the merchants want approved).

`Population` holds everything as arrays indexed by position (issuer, route, merchant, card), which
`sim.truth` turns into probabilities and `sim.world.World` (a `Population`) into outcomes. Building
it draws from one generator seeded by (world, name, seed), in a fixed order; the traffic draws from
its own (traffic, name, seed), and each subscription's amount from (sub, card, merchant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from sim.config import Episode, RandomEpisodes, WorldConfig
from sim.rng import seed_int

__all__ = ["Population", "SeverityGrid", "TrafficRow"]

_NETWORK = {"visa": 1, "mastercard": 2}  # authopt.v1.CardNetwork numbers
_MINUTE = 60
_BIN8_SUFFIXES = ("11", "37", "58", "92")
_FP_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEF"  # 32 letters: never a run of digits

# One payment of the traffic, the fields of `sim.world.Payment` after its index: first attempt
# (epoch s), merchant, card, amount_minor, recurring, channel, u_funds, u_persist.
TrafficRow = tuple[float, int, int, int, bool, int, float, float]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _fingerprint(x: int) -> str:
    """An opaque card fingerprint from 64 bits, in letters only: a fingerprint in hex can hold 12+
    digits in a row that pass Luhn, which the server rightly refuses as a possible card number."""
    return "fp_" + "".join(_FP_ALPHABET[(x >> (5 * i)) & 31] for i in range(13))


@dataclass
class SeverityGrid:
    """Per-minute severity of incidents for each entity over the world's span."""

    t0: float
    minutes: int
    sev: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.sev = np.zeros((0, self.minutes), dtype=np.float32)

    def build(self, episodes: list[list[tuple[float, float, float]]]) -> None:
        self.sev = np.zeros((len(episodes), self.minutes), dtype=np.float32)
        for i, eps in enumerate(episodes):
            for start, end, sev in eps:
                a = max(0, int((start - self.t0) // _MINUTE))
                b = min(self.minutes, math.ceil((end - self.t0) / _MINUTE))
                if b > a:
                    self.sev[i, a:b] = np.maximum(self.sev[i, a:b], sev)

    def at(self, idx: np.ndarray | int, t: np.ndarray | float) -> np.ndarray:
        """Severity of entities `idx` at times `t` (float32, as stored)."""
        m = np.clip(((np.asarray(t) - self.t0) // _MINUTE).astype(np.int64), 0, self.minutes - 1)
        return self.sev[idx, m]  # type: ignore[no-any-return]

    def at1(self, idx: int, t: float) -> float:
        """`at` of one entity and time, as a Python float (the closed loop's lookup: no arithmetic
        but the minute index, so both give the same value)."""
        m = min(max(int((t - self.t0) // _MINUTE), 0), self.minutes - 1)
        return float(self.sev[idx, m])


class Population:
    """The issuers, routes, merchants, cards, incidents and paydays of (config, seed)."""

    def __init__(self, config: WorldConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.t0 = config.start.timestamp()
        traffic = config.traffic
        self.horizon_s = traffic.hours * 3600 + traffic.mit_patience_days * 86400 + 2 * 86400
        rng = np.random.default_rng(seed_int("world", config.name, seed))
        self._issuers(config)
        self._routes(config)
        self._merchants(config)
        self._cards(config, rng)
        self._incidents(config, rng)
        self._paydays(config)

    def _issuers(self, c: WorldConfig) -> None:
        self.issuer_ids = [i.id for i in c.issuers]
        self.issuer_country = [i.country for i in c.issuers]
        self.issuer_network = np.array([_NETWORK[i.network] for i in c.issuers])
        self.issuer_logit = np.array([_logit(i.base_approval) for i in c.issuers])
        self.issuer_amp = np.array([i.hour_amplitude for i in c.issuers])
        self.issuer_persist_ok = np.array([1.0 - i.persistent_decline for i in c.issuers])
        share = np.array([i.share for i in c.issuers])
        self.issuer_share = share / share.sum()

    def _routes(self, c: WorldConfig) -> None:
        self.route_ids = [r.id for r in c.routes]
        self.route_index = {r: k for k, r in enumerate(self.route_ids)}
        self.route_cost_bps = np.array([r.cost_bps for r in c.routes])
        self.route_fixed = np.array([r.fixed_fee_minor for r in c.routes])
        self.route_error = np.array([r.error_rate for r in c.routes])
        self.route_lat_median = np.array([r.latency_ms_median for r in c.routes])
        self.route_lat_sigma = np.array([r.latency_sigma for r in c.routes])
        self.route_token = np.array([r.token_lift for r in c.routes])
        self.route_debit = np.array([r.debit_lift for r in c.routes])
        self.route_networks = [{_NETWORK[n] for n in r.networks} for r in c.routes]
        n_i, n_r = len(c.issuers), len(c.routes)
        # Route x issuer logit lift: domestic/cross-border affinity plus any explicit issuer lift.
        lift = np.zeros((n_r, n_i))
        for k, r in enumerate(c.routes):
            for i, iss in enumerate(c.issuers):
                lift[k, i] = r.domestic_lift if iss.country == r.country else r.cross_border_lift
                lift[k, i] += r.issuer_lift.get(iss.id, 0.0)
        self.route_issuer_lift = lift

    def _merchants(self, c: WorldConfig) -> None:
        self.merchant_ids = [m.id for m in c.merchants]
        self.merchant_country = [m.country for m in c.merchants]
        self.merchant_risk = np.array([m.risk_lift for m in c.merchants])
        self.merchant_median = np.array([m.amount_median_minor for m in c.merchants], dtype=np.float64)
        share = np.array([m.share for m in c.merchants])
        self.merchant_share = share / share.sum()
        self.merchant_routes = [[self.route_index[r] for r in m.routes] for m in c.merchants]
        self.merchant_primary = [self.route_index[m.primary_route] for m in c.merchants]

    def _cards(self, c: WorldConfig, rng: np.random.Generator) -> None:
        cc = c.cards
        n = cc.count
        self.card_issuer = rng.choice(len(c.issuers), size=n, p=self.issuer_share)
        bins6 = [iss.bins for iss in c.issuers]
        pick = rng.random(n)
        sub = rng.integers(0, len(_BIN8_SUFFIXES), size=n)
        self.card_bin: list[str] = [
            (bins6[i][int(p * len(bins6[i]))] + _BIN8_SUFFIXES[s])[:8]
            for i, p, s in zip(self.card_issuer.tolist(), pick.tolist(), sub.tolist(), strict=True)
        ]
        self.card_network = self.issuer_network[self.card_issuer]
        self.card_funding = rng.choice(np.array([1, 2, 3]), size=n, p=[cc.credit, cc.debit, cc.prepaid])
        self.card_token = rng.random(n) < cc.token_share
        self.card_balance = cc.balance_median_minor * np.exp(cc.balance_sigma * rng.standard_normal(n))
        self.card_low = np.where(self.card_funding == 1, cc.low_fraction_credit, cc.low_fraction_debit)
        # People are paid on different days: each card's pay cycle is the calendar's, shifted.
        self.card_pay_shift = rng.random(n) * 14 * 86400.0
        self.card_last4 = [f"{x:04d}" for x in rng.integers(0, 10000, size=n).tolist()]
        salt = seed_int("fp", c.name, self.seed)
        mask = 2**64 - 1
        self.card_fingerprint = [_fingerprint((salt ^ (k * 0x9E3779B97F4A7C15)) & mask) for k in range(n)]
        # Popularity over a random order (see CardsConfig.card_skew), so some cards pay often.
        self._card_order = rng.permutation(n)

    def _episodes(
        self, rng: np.random.Generator, fixed: list[Episode], drawn: RandomEpisodes
    ) -> list[tuple[float, float, float]]:
        out = [(self.t0 + e.start_hour * 3600, self.t0 + e.start_hour * 3600 + e.minutes * 60, e.severity)
               for e in fixed]  # fmt: skip
        days = self.config.traffic.hours / 24
        for _ in range(int(rng.poisson(drawn.per_day * days))):
            start = self.t0 + rng.random() * self.config.traffic.hours * 3600
            out.append((start, start + rng.exponential(drawn.mean_minutes) * 60, drawn.severity))
        return out

    def _incidents(self, c: WorldConfig, rng: np.random.Generator) -> None:
        minutes = int(self.horizon_s // _MINUTE) + 1
        self.issuer_outages = [self._episodes(rng, i.outages, i.random_outages) for i in c.issuers]
        self.route_degradations = [
            self._episodes(rng, r.degradations, r.random_degradations) for r in c.routes
        ]
        self.issuer_grid = SeverityGrid(self.t0, minutes)
        self.issuer_grid.build(self.issuer_outages)
        self.route_grid = SeverityGrid(self.t0, minutes)
        self.route_grid.build(self.route_degradations)

    def _paydays(self, c: WorldConfig) -> None:
        start = c.start - timedelta(days=40)
        end = c.start + timedelta(seconds=self.horizon_s + 40 * 86400)
        days = []
        y, m = start.year, start.month
        while datetime(y, m, 1, tzinfo=UTC) <= end:
            days += [datetime(y, m, d, tzinfo=UTC).timestamp() for d in sorted(set(c.cards.paydays))]
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        self.payday_ts = np.array(days)

    def traffic(self) -> list[TrafficRow]:
        """Every payment of the world's span, in time order (deterministic by seed)."""
        tc = self.config.traffic
        rng = np.random.default_rng(seed_int("traffic", self.config.name, self.seed))
        n = max(1, round(tc.payments_per_hour * tc.hours))
        # Day/night volume: accept-reject on a cosine profile peaking mid-afternoon UTC.
        times: list[np.ndarray] = []
        got = 0
        while got < n:
            t = rng.random(2 * n) * tc.hours * 3600
            hour = ((self.t0 + t) % 86400) / 3600
            low = 1.0 / tc.day_night_ratio
            intensity = low + (1 - low) * (0.5 - 0.5 * np.cos(2 * np.pi * (hour - 3) / 24))
            keep = t[rng.random(t.size) < intensity]
            times.append(keep)
            got += keep.size
        at = np.sort(np.concatenate(times)[:n]) + self.t0
        merchant = rng.choice(len(self.merchant_ids), size=n, p=self.merchant_share)
        n_cards = self.config.cards.count
        rank = np.minimum(
            (n_cards * rng.random(n) ** self.config.cards.card_skew).astype(np.int64), n_cards - 1
        )
        card = self._card_order[rank]
        recurring = np.array(
            [rng.random() < self.config.merchants[m].recurring_share for m in merchant.tolist()], dtype=bool
        )
        z = rng.standard_normal(n)
        u_f, u_p = rng.random(n), rng.random(n)
        moto = rng.random(n) < 0.08
        out: list[TrafficRow] = []
        for j in range(n):
            m = int(merchant[j])
            mc = self.config.merchants[m]
            if recurring[j]:  # a subscription: the same amount every time for this card here
                zz = np.random.default_rng(seed_int("sub", int(card[j]), m)).standard_normal()
                amount = mc.amount_median_minor * math.exp(mc.amount_sigma * 0.5 * zz)
                channel = 2
            else:
                amount = mc.amount_median_minor * math.exp(mc.amount_sigma * float(z[j]))
                channel = 3 if moto[j] else 1
            out.append(
                (float(at[j]), m, int(card[j]), max(50, int(round(amount, -1))), bool(recurring[j]), channel,
                 float(u_f[j]), float(u_p[j]))
            )  # fmt: skip
        return out
