"""The simulated payment world: its population, its ground truth, and how an attempt turns out.

An attempt of payment ``j`` on route ``r`` at time ``t`` passes five checks in order; the first that
fails decides the outcome (and its ISO 8583 code):

1. the route answers (else ERROR: timeout) — ``1 − err_r(t)``, raised by route degradations;
2. the issuer is reachable through the route (else 91/96) — issuer outages and route degradations;
3. the card has the funds (else 51/61) — ``P_f(t) = σ((ln funds(t) − ln amount) / 0.35)`` where the
   funds run down between paydays and refill on them;
4. the card can be approved at all (else a hard or persistent code: 41, 43, 57, 05, 54, ...) —
   a per-payment fact with prior ``1 − persistent_decline`` of the issuer;
5. the issuer's risk engine approves (else 05, 59, ...) — ``σ(logit(base) + route × issuer ×
   card × merchant lifts + time of day)``, drawn afresh on every attempt.

Checks 3 and 4 use one uniform draw per payment (the same on every retry), so a retry after a 51
fails again until a payday lifts ``P_f``, and a card that cannot be approved never is; checks 1, 2
and 5 draw afresh per attempt. Because every draw is a uniform compared with a known probability,
the **true** P(approve) of any attempt given what its payment has seen so far is exact
(:meth:`World.p_approve` with a :class:`Belief`): the oracle uses it, the evaluation scores with it.
Everything is determined by (config, seed).
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from sim.config import Episode, RandomEpisodes, WorldConfig

__all__ = [
    "APPROVED",
    "DECLINED",
    "ERROR",
    "STAGES",
    "Belief",
    "Draws",
    "Incident",
    "Outcome",
    "Payment",
    "World",
]

APPROVED, DECLINED, ERROR = 1, 2, 3  # authopt.v1.OutcomeStatus numbers
STAGES = ("approved", "error", "unavailable", "funds", "persistent", "transient")
_NETWORK = {"visa": 1, "mastercard": 2}  # authopt.v1.CardNetwork numbers
_FUNDING = {"credit": 1, "debit": 2, "prepaid": 3}
_FUNDS_SCALE = 0.35
_TIMEOUT_MS = 8000
_MINUTE = 60
_BIN8_SUFFIXES = ("11", "37", "58", "92")


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))  # type: ignore[no-any-return]


def _weights(d: dict[str, float]) -> tuple[tuple[str, ...], np.ndarray]:
    codes = tuple(d)
    w = np.array([d[c] for c in codes], dtype=np.float64)
    return codes, np.cumsum(w / w.sum())


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))  # type: ignore[no-any-return]


_MASK = 2**64 - 1
_GOLDEN, _ATTEMPT_MUL, _STREAM_MUL = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0xBF58476D1CE4E5B9


def _splitmix1(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _unit1(x: int) -> float:
    return (x >> 11) * (1.0 / 9007199254740992.0)


def _unit(x: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) from the top 53 bits."""
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # type: ignore[no-any-return]


_FP_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEF"  # 32 letters: never a run of digits


def _fingerprint(x: int) -> str:
    """An opaque card fingerprint from 64 bits, in letters only: a fingerprint in hex can hold 12+
    digits in a row that pass Luhn, which the server rightly refuses as a possible card number."""
    return "fp_" + "".join(_FP_ALPHABET[(x >> (5 * i)) & 31] for i in range(13))


def _seed_int(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@dataclass(slots=True)
class Payment:
    """One payment a merchant wants approved (the traffic), with its card and its fixed draws."""

    index: int
    at: float  # first attempt, epoch seconds
    merchant: int
    card: int
    amount_minor: int
    recurring: bool  # merchant-initiated recurring (MIT); otherwise customer-initiated (CIT)
    channel: int  # authopt.v1.Channel number
    u_funds: float  # per-payment draw of check 3
    u_persist: float  # per-payment draw of check 4


@dataclass(frozen=True, slots=True)
class Incident:
    """An issuer outage or a route degradation: `severity` of its attempts fail while it lasts."""

    kind: str  # "issuer" | "route"
    id: str
    start: float  # epoch seconds, world time
    end: float
    severity: float


@dataclass(slots=True)
class Draws:
    """The fresh uniforms of one attempt (common random numbers: attempt k of payment j is the same
    draw under every policy)."""

    u_error: float
    u_avail: float
    u_transient: float
    u_code: float
    u_mac: float
    z_latency: float


@dataclass(slots=True)
class Belief:
    """What a payment's earlier outcomes imply about its per-payment draws (for the exact truth)."""

    funds_lo: float = 0.0  # u_funds is known to lie in [funds_lo, funds_hi)
    funds_hi: float = 1.0
    p_persist_ok: float = 1.0  # P(check 4 passes | history); set from the issuer's prior at start


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    response_code: str
    mastercard_mac: str
    latency_ms: int
    stage: str  # "approved" | "error" | "unavailable" | "funds" | "persistent" | "transient"


@dataclass
class _Grid:
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
        m = np.clip(((np.asarray(t) - self.t0) // _MINUTE).astype(np.int64), 0, self.minutes - 1)
        return self.sev[idx, m]  # type: ignore[no-any-return]


class World:
    """A world built from a config and a seed: population, incidents, ground truth, outcomes."""

    def __init__(self, config: WorldConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.t0 = config.start.timestamp()
        traffic = config.traffic
        self.horizon_s = traffic.hours * 3600 + traffic.mit_patience_days * 86400 + 2 * 86400
        rng = np.random.default_rng(_seed_int("world", config.name, seed))
        self._draw_salt = _seed_int("attempt", config.name, seed)
        self._issuers(config)
        self._routes(config)
        self._merchants(config)
        self._cards(config, rng)
        self._incidents(config, rng)
        self._paydays(config)
        d = config.declines
        self.codes = {
            "persistent": _weights(d.persistent_codes),
            "transient": _weights(d.transient_codes),
            "funds": _weights(d.funds_codes),
            "unavailable": _weights(d.unavailable_codes),
        }
        q_persist = {c: w / sum(d.persistent_codes.values()) for c, w in d.persistent_codes.items()}
        q_transient = {c: w / sum(d.transient_codes.values()) for c, w in d.transient_codes.items()}
        self.codes_all: tuple[str, ...] = tuple(
            sorted({c for codes, _ in self.codes.values() for c in codes})
        )
        position = {c: k for k, c in enumerate(self.codes_all)}
        self._code_index = {
            kind: np.array([position[c] for c in codes]) for kind, (codes, _) in self.codes.items()
        }
        self._q_persist_arr = np.array([q_persist.get(c, 0.0) for c in self.codes_all])
        self._q_transient_arr = np.array([q_transient.get(c, 0.0) for c in self.codes_all])
        self._python_views()

    # --- population -------------------------------------------------------------------------------

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
        salt = _seed_int("fp", c.name, self.seed)
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
        self._issuer_grid = _Grid(self.t0, minutes)
        self._issuer_grid.build(self.issuer_outages)
        self._route_grid = _Grid(self.t0, minutes)
        self._route_grid.build(self.route_degradations)

    def _paydays(self, c: WorldConfig) -> None:
        start = c.start - timedelta(days=40)
        end = c.start + timedelta(seconds=self.horizon_s + 40 * 86400)
        days = []
        y, m = start.year, start.month
        while datetime(y, m, 1, tzinfo=UTC) <= end:
            days += [datetime(y, m, d, tzinfo=UTC).timestamp() for d in sorted(set(c.cards.paydays))]
            y, m = (y + 1, 1) if m == 12 else (y, m + 1)
        self._payday_ts = np.array(days)

    # --- traffic ----------------------------------------------------------------------------------

    def payments(self) -> list[Payment]:
        """The traffic: every payment of the world's span, in time order (deterministic by seed)."""
        tc = self.config.traffic
        rng = np.random.default_rng(_seed_int("traffic", self.config.name, self.seed))
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
        out = []
        for j in range(n):
            m = int(merchant[j])
            mc = self.config.merchants[m]
            if recurring[j]:  # a subscription: the same amount every time for this card here
                zz = np.random.default_rng(_seed_int("sub", int(card[j]), m)).standard_normal()
                amount = mc.amount_median_minor * math.exp(mc.amount_sigma * 0.5 * zz)
                channel = 2
            else:
                amount = mc.amount_median_minor * math.exp(mc.amount_sigma * float(z[j]))
                channel = 3 if moto[j] else 1
            out.append(
                Payment(j, float(at[j]), m, int(card[j]), max(50, int(round(amount, -1))), bool(recurring[j]),
                        channel, float(u_f[j]), float(u_p[j]))
            )  # fmt: skip
        return out

    def draws(self, payment: Payment, attempt: int) -> Draws:
        """The fresh uniforms of attempt number `attempt` (1-based) of `payment`."""
        base = self._draw_salt ^ ((payment.index * _GOLDEN) & _MASK) ^ ((attempt * _ATTEMPT_MUL) & _MASK)
        u = [_unit1(_splitmix1((base + k * _STREAM_MUL) & _MASK)) for k in range(7)]
        z = math.sqrt(-2.0 * math.log(max(u[5], 1e-12))) * math.cos(2.0 * math.pi * u[6])
        return Draws(u[0], u[1], u[2], u[3], u[4], z)

    def draw_arrays(self, payment: np.ndarray, attempt: np.ndarray) -> tuple[np.ndarray, ...]:
        """Vectorized :meth:`draws`: (u_error, u_avail, u_transient, u_code, u_mac, z_latency) arrays.

        A counter-based generator (SplitMix64 of seed, payment, attempt, stream), so attempt k of
        payment j draws the same numbers under every policy and in any order.
        """
        with np.errstate(over="ignore"):
            base = (
                np.uint64(self._draw_salt)
                ^ (payment.astype(np.uint64) * np.uint64(_GOLDEN))
                ^ (attempt.astype(np.uint64) * np.uint64(_ATTEMPT_MUL))
            )
            out = [_unit(_splitmix(base + np.uint64(k) * np.uint64(_STREAM_MUL))) for k in range(7)]
        z = np.sqrt(-2.0 * np.log(np.maximum(out[5], 1e-12))) * np.cos(2.0 * np.pi * out[6])
        return out[0], out[1], out[2], out[3], out[4], z

    def prior_belief(self, payment: Payment) -> Belief:
        return Belief(p_persist_ok=float(self.issuer_persist_ok[self.card_issuer[payment.card]]))

    def eligible_routes(self, payment: Payment) -> list[int]:
        """Routes the merchant may use that accept this card's network (merchant's order)."""
        net = int(self.card_network[payment.card])
        return [r for r in self.merchant_routes[payment.merchant] if net in self.route_networks[r]]

    def cost_minor(self, route: int, amount_minor: int) -> float:
        return float(amount_minor * self.route_cost_bps[route] / 10_000 + self.route_fixed[route])

    # --- ground truth -----------------------------------------------------------------------------

    def p_error(self, routes: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        return np.minimum(1.0, self.route_error[routes] + 0.5 * self._route_grid.at(routes, t))  # type: ignore[no-any-return]

    def p_available(self, routes: np.ndarray, issuer: np.ndarray | int, t: float | np.ndarray) -> np.ndarray:
        return (1.0 - self._issuer_grid.at(issuer, t)) * (1.0 - 0.5 * self._route_grid.at(routes, t))

    def p_funds(
        self, card: np.ndarray | int, amount: np.ndarray | float, t: np.ndarray | float
    ) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64) - self.card_pay_shift[card]
        k = np.searchsorted(self._payday_ts, t, side="right")
        last, nxt = self._payday_ts[k - 1], self._payday_ts[k]
        phase = (t - last) / (nxt - last)
        low = self.card_low[card]
        funds = self.card_balance[card] * (1.0 - (1.0 - low) * phase)
        return _sigmoid((np.log(funds) - np.log(np.asarray(amount, dtype=np.float64))) / _FUNDS_SCALE)

    def p_transient(
        self,
        routes: np.ndarray,
        card: np.ndarray | int,
        merchant: np.ndarray | int,
        amount: np.ndarray | float,
        recurring: np.ndarray | bool,
        t: np.ndarray | float,
    ) -> np.ndarray:
        issuer = self.card_issuer[card]
        hour = ((np.asarray(t) - 0.0) % 86400) / 3600
        night = np.maximum(0.0, np.cos(2 * np.pi * (hour - 3) / 24))
        mc_median = self.merchant_median[merchant]
        x = (
            self.issuer_logit[issuer]
            - self.issuer_amp[issuer] * night
            + self.route_issuer_lift[routes, issuer]
            + self.route_token[routes] * self.card_token[card]
            + self.route_debit[routes] * (self.card_funding[card] == 2)
            + self.merchant_risk[merchant]
            - 0.2 * np.log(np.asarray(amount, dtype=np.float64) / mc_median)
            - 0.25 * np.asarray(recurring, dtype=np.float64)
        )
        return _sigmoid(x)

    # --- outcomes ---------------------------------------------------------------------------------

    def outcome_arrays(
        self,
        card: np.ndarray,
        merchant: np.ndarray,
        amount: np.ndarray,
        recurring: np.ndarray,
        u_funds: np.ndarray,
        u_persist: np.ndarray,
        route: np.ndarray,
        t: np.ndarray,
        draws: tuple[np.ndarray, ...],
        funds_lo: np.ndarray,
        funds_hi: np.ndarray,
        p_persist_ok: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Play many attempts at once (the one implementation of the checks; `attempt` wraps it).

        Returns arrays: ``status`` (OutcomeStatus number), ``stage`` (index into `STAGES`), ``code``
        (index into `codes_all`, -1 = none), ``mac`` (0 none, 3 = MAC 03, 25 = MAC 25), ``latency_ms``,
        and the updated belief ``funds_lo``, ``funds_hi``, ``p_persist_ok``.
        """
        u_err, u_av, u_tr, u_code, u_mac, z = draws
        issuer = self.card_issuer[card]
        mastercard = self.card_network[card] == 2
        latency = np.minimum(
            _TIMEOUT_MS, self.route_lat_median[route] * np.exp(self.route_lat_sigma[route] * z)
        ).astype(np.int64)
        err = u_err < self.p_error(route, t)
        unavailable = ~err & (u_av >= self.p_available(route, issuer, t))
        pf = self.p_funds(card, amount, t)
        reached = ~err & ~unavailable
        funds = reached & (u_funds >= pf)
        past_funds = reached & ~funds
        persist_fail = past_funds & (u_persist >= self.issuer_persist_ok[issuer])
        pt = self.p_transient(route, card, merchant, amount, recurring, t)
        transient = past_funds & ~persist_fail & (u_tr >= pt)
        approved = past_funds & ~persist_fail & ~transient
        stage = np.select([err, unavailable, funds, persist_fail, transient], [1, 2, 3, 4, 5], 0)
        code = np.full(card.shape, -1, dtype=np.int64)
        for kind, mask in (("unavailable", unavailable), ("funds", funds), ("persistent", persist_fail),
                           ("transient", transient)):  # fmt: skip
            idx, cum = self._code_index[kind], self.codes[kind][1]
            pick = np.minimum(np.searchsorted(cum, u_code, side="right"), len(idx) - 1)
            code = np.where(mask, idx[pick], code)
        mac = np.zeros(card.shape, dtype=np.int64)
        d = self.config.declines
        mac = np.where(mastercard & persist_fail & (u_mac < d.mastercard_mac_hard), 3, mac)
        mac = np.where(mastercard & funds & (u_mac < d.mastercard_mac_funds), 25, mac)
        new_lo = np.where(funds, np.maximum(funds_lo, pf), funds_lo)
        new_hi = np.where(past_funds, np.minimum(funds_hi, pf), funds_hi)
        safe = np.maximum(code, 0)
        like_ok = (1.0 - pt) * self._q_transient_arr[safe]
        like_fail = self._q_persist_arr[safe]
        den = p_persist_ok * like_ok + (1.0 - p_persist_ok) * like_fail
        post = np.where(den > 0, p_persist_ok * like_ok / np.where(den > 0, den, 1.0), 0.0)
        declined_at_issuer = persist_fail | transient
        return {
            "status": np.where(err, ERROR, np.where(approved, APPROVED, DECLINED)),
            "stage": stage,
            "code": code,
            "mac": mac,
            "latency_ms": np.where(err, _TIMEOUT_MS, latency),
            "funds_lo": new_lo,
            "funds_hi": new_hi,
            "p_persist_ok": np.where(declined_at_issuer, post, p_persist_ok),
        }

    # Scalar twins of the functions above, for the closed loop (one attempt at a time, ~20x faster
    # than size-1 arrays). tests/test_sim.py checks that both give identical outcomes and truths.

    def _sev(self, grid: _Grid, idx: int, t: float) -> float:
        m = min(max(int((t - grid.t0) // _MINUTE), 0), grid.minutes - 1)
        return float(grid.sev[idx, m])

    def _p_error1(self, route: int, t: float) -> float:
        return min(1.0, float(self._l_route_error[route]) + 0.5 * self._sev(self._route_grid, route, t))

    def _p_available1(self, route: int, issuer: int, t: float) -> float:
        return (1.0 - self._sev(self._issuer_grid, issuer, t)) * (
            1.0 - 0.5 * self._sev(self._route_grid, route, t)
        )

    def _p_funds1(self, card: int, amount: float, t: float) -> float:
        t -= self._l_pay_shift[card]
        k = bisect_right(self._l_paydays, t)
        last, nxt = self._l_paydays[k - 1], self._l_paydays[k]
        phase = (t - last) / (nxt - last)
        funds = self._l_balance[card] * (1.0 - (1.0 - self._l_low[card]) * phase)
        return 1.0 / (1.0 + math.exp(-(math.log(funds) - math.log(amount)) / _FUNDS_SCALE))

    def _p_transient1(
        self, route: int, card: int, merchant: int, amount: float, recurring: bool, t: float
    ) -> float:
        issuer = self._l_issuer[card]
        hour = (t % 86400) / 3600
        night = max(0.0, math.cos(2 * math.pi * (hour - 3) / 24))
        x = (
            self._l_issuer_logit[issuer]
            - self._l_issuer_amp[issuer] * night
            + self._l_lift[route][issuer]
            + (self._l_route_token[route] if self._l_token[card] else 0.0)
            + (self._l_route_debit[route] if self._l_funding[card] == 2 else 0.0)
            + self._l_merchant_risk[merchant]
            - 0.2 * math.log(amount / self._l_merchant_median[merchant])
            - (0.25 if recurring else 0.0)
        )
        return 1.0 / (1.0 + math.exp(-x))

    def p_approve(self, payment: Payment, routes: list[int], t: float, belief: Belief) -> list[float]:
        """The true P(approve) of attempting `payment` on each of `routes` at `t`, given `belief`."""
        card, amount = payment.card, float(payment.amount_minor)
        issuer = self._l_issuer[card]
        pf = self._p_funds1(card, amount, t)
        funds = min(1.0, max(0.0, (pf - belief.funds_lo) / max(belief.funds_hi - belief.funds_lo, 1e-12)))
        common = funds * belief.p_persist_ok
        return [
            (1.0 - self._p_error1(r, t))
            * self._p_available1(r, issuer, t)
            * common
            * self._p_transient1(r, card, payment.merchant, amount, payment.recurring, t)
            for r in routes
        ]

    def _pick1(self, kind: str, u: float) -> str:
        codes, cum = self._l_codes[kind]
        return codes[min(bisect_right(cum, u), len(codes) - 1)]

    def attempt(self, payment: Payment, route: int, t: float, draws: Draws, belief: Belief) -> Outcome:
        """Play one attempt and update `belief` with what its outcome reveals."""
        card, amount = payment.card, float(payment.amount_minor)
        issuer = self._l_issuer[card]
        mastercard = self._l_network[card] == 2
        d = self.config.declines
        latency = int(
            min(_TIMEOUT_MS, self._l_lat_median[route] * math.exp(self._l_lat_sigma[route] * draws.z_latency))
        )
        if draws.u_error < self._p_error1(route, t):
            return Outcome(ERROR, "", "", _TIMEOUT_MS, "error")
        if draws.u_avail >= self._p_available1(route, issuer, t):
            return Outcome(DECLINED, self._pick1("unavailable", draws.u_code), "", latency, "unavailable")
        pf = self._p_funds1(card, amount, t)
        if payment.u_funds >= pf:
            belief.funds_lo = max(belief.funds_lo, pf)
            mac = "25" if mastercard and draws.u_mac < d.mastercard_mac_funds else ""
            return Outcome(DECLINED, self._pick1("funds", draws.u_code), mac, latency, "funds")
        belief.funds_hi = min(belief.funds_hi, pf)
        pt = self._p_transient1(route, card, payment.merchant, amount, payment.recurring, t)
        if payment.u_persist >= self._l_persist_ok[issuer]:
            code = self._pick1("persistent", draws.u_code)
            mac = "03" if mastercard and draws.u_mac < d.mastercard_mac_hard else ""
            self._update_persist(belief, code, pt)
            return Outcome(DECLINED, code, mac, latency, "persistent")
        if draws.u_transient >= pt:
            code = self._pick1("transient", draws.u_code)
            self._update_persist(belief, code, pt)
            return Outcome(DECLINED, code, "", latency, "transient")
        return Outcome(APPROVED, "", "", latency, "approved")

    def _update_persist(self, belief: Belief, code: str, pt: float) -> None:
        """Bayes: a decline with `code` at check 4 or 5 (`pt` = P(check 5 passes) then)."""
        w = belief.p_persist_ok
        k = self._code_pos[code]
        like_ok = (1.0 - pt) * float(self._q_transient_arr[k])
        like_fail = float(self._q_persist_arr[k])
        den = w * like_ok + (1.0 - w) * like_fail
        belief.p_persist_ok = 0.0 if den <= 0 else w * like_ok / den

    def _python_views(self) -> None:
        """Plain-Python copies of the arrays the scalar path reads."""
        self._l_route_error = self.route_error.tolist()
        self._l_paydays = self._payday_ts.tolist()
        self._l_balance = self.card_balance.tolist()
        self._l_low = self.card_low.tolist()
        self._l_pay_shift = self.card_pay_shift.tolist()
        self._l_issuer = self.card_issuer.tolist()
        self._l_network = self.card_network.tolist()
        self._l_token = self.card_token.tolist()
        self._l_funding = self.card_funding.tolist()
        self._l_issuer_logit = self.issuer_logit.tolist()
        self._l_issuer_amp = self.issuer_amp.tolist()
        self._l_persist_ok = self.issuer_persist_ok.tolist()
        self._l_lift = self.route_issuer_lift.tolist()
        self._l_route_token = self.route_token.tolist()
        self._l_route_debit = self.route_debit.tolist()
        self._l_merchant_risk = self.merchant_risk.tolist()
        self._l_merchant_median = self.merchant_median.tolist()
        self._l_lat_median = self.route_lat_median.tolist()
        self._l_lat_sigma = self.route_lat_sigma.tolist()
        self._l_codes = {kind: (codes, cum.tolist()) for kind, (codes, cum) in self.codes.items()}
        self._code_pos = {c: k for k, c in enumerate(self.codes_all)}

    # --- description ------------------------------------------------------------------------------

    def incidents(self, start: float, end: float) -> list[Incident]:
        """Issuer outages and route degradations overlapping [start, end), by start time."""
        out = [
            Incident("issuer", self.issuer_ids[i], a, b, sev)
            for i, episodes in enumerate(self.issuer_outages)
            for a, b, sev in episodes
            if a < end and b > start
        ]
        out += [
            Incident("route", self.route_ids[r], a, b, sev)
            for r, episodes in enumerate(self.route_degradations)
            for a, b, sev in episodes
            if a < end and b > start
        ]
        return sorted(out, key=lambda x: (x.start, x.kind, x.id))

    def card_fields(self, card: int) -> dict[str, object]:
        return {
            "bin": self.card_bin[card],
            "last4": self.card_last4[card],
            "network": int(self.card_network[card]),
            "funding": int(self.card_funding[card]),
            "issuer_country": self.issuer_country[int(self.card_issuer[card])],
            "network_token": bool(self.card_token[card]),
            "fingerprint": self.card_fingerprint[card],
        }
