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

The world is put together from modules by role: `sim.population` (who: issuers, routes,
merchants, cards, incidents, the traffic), `sim.truth` (the probability each check passes) and
`sim.rng` (seeds and the counter-based draws); `World` plays attempts with them, one at a time
(`attempt`, the closed loop) or many at once (`outcome_arrays`, the emitter).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from sim.config import WorldConfig
from sim.population import Population
from sim.rng import attempt_uniforms, gaussian, gaussian1, seed_int
from sim.truth import GroundTruth, persist_posterior

__all__ = [
    "APPROVED",
    "DECLINED",
    "ERROR",
    "MACS",
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
MACS = (0, 3, 25)  # `World.outcome_arrays`' `mac` values: none, "03", "25"
_TIMEOUT_MS = 8000


def _weights(d: dict[str, float]) -> tuple[tuple[str, ...], np.ndarray]:
    codes = tuple(d)
    w = np.array([d[c] for c in codes], dtype=np.float64)
    return codes, np.cumsum(w / w.sum())


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


class World(Population):
    """A world built from a config and a seed: its population (it is one), its ground truth
    (`truth`), its draws, and how attempts turn out."""

    def __init__(self, config: WorldConfig, seed: int) -> None:
        super().__init__(config, seed)
        self._draw_salt = seed_int("attempt", config.name, seed)
        self.truth = GroundTruth(self)
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

    def payments(self) -> list[Payment]:
        """The traffic: every payment of the world's span, in time order (deterministic by seed)."""
        return [Payment(j, *row) for j, row in enumerate(self.traffic())]

    def draws(self, payment: Payment, attempt: int) -> Draws:
        """The fresh uniforms of attempt number `attempt` (1-based) of `payment` (`sim.rng`)."""
        u = attempt_uniforms(self._draw_salt, payment.index, attempt)
        return Draws(u[0], u[1], u[2], u[3], u[4], gaussian1(u[5], u[6]))

    def draw_arrays(self, payment: np.ndarray, attempt: np.ndarray) -> tuple[np.ndarray, ...]:
        """Vectorized :meth:`draws`: (u_error, u_avail, u_transient, u_code, u_mac, z_latency) arrays.

        A counter-based generator (SplitMix64 of seed, payment, attempt, stream), so attempt k of
        payment j draws the same numbers under every policy and in any order.
        """
        with np.errstate(over="ignore"):
            u = attempt_uniforms(self._draw_salt, payment.astype(np.uint64), attempt.astype(np.uint64))
        return u[0], u[1], u[2], u[3], u[4], gaussian(u[5], u[6])

    def prior_belief(self, payment: Payment) -> Belief:
        return Belief(p_persist_ok=float(self.issuer_persist_ok[self.card_issuer[payment.card]]))

    def eligible_routes(self, payment: Payment) -> list[int]:
        """Routes the merchant may use that accept this card's network (merchant's order)."""
        net = int(self.card_network[payment.card])
        return [r for r in self.merchant_routes[payment.merchant] if net in self.route_networks[r]]

    def cost_minor(self, route: int, amount_minor: int) -> float:
        return float(amount_minor * self.route_cost_bps[route] / 10_000 + self.route_fixed[route])

    # --- outcomes, many at once (the emitter) --------------------------------------------------------

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
        """Play many attempts at once (the checks on arrays; :meth:`attempt` plays them one at a time,
        and tests/test_sim_emit.py checks the two record for record).

        Returns arrays: ``status`` (OutcomeStatus number), ``stage`` (index into `STAGES`), ``code``
        (index into `codes_all`, -1 = none), ``mac`` (one of `MACS`: 0 none, 3 = MAC 03, 25 = MAC 25),
        ``latency_ms``, and the updated belief ``funds_lo``, ``funds_hi``, ``p_persist_ok``.
        """
        u_err, u_av, u_tr, u_code, u_mac, z = draws
        truth = self.truth
        issuer = self.card_issuer[card]
        mastercard = self.card_network[card] == 2
        latency = np.minimum(
            _TIMEOUT_MS, self.route_lat_median[route] * np.exp(self.route_lat_sigma[route] * z)
        ).astype(np.int64)
        err = u_err < truth.p_error(route, t)
        unavailable = ~err & (u_av >= truth.p_available(route, issuer, t))
        pf = truth.p_funds(card, amount, t)
        reached = ~err & ~unavailable
        funds = reached & (u_funds >= pf)
        past_funds = reached & ~funds
        persist_fail = past_funds & (u_persist >= self.issuer_persist_ok[issuer])
        pt = truth.p_transient(route, card, merchant, amount, recurring, t)
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
        post = persist_posterior(p_persist_ok, pt, self._q_transient_arr[safe], self._q_persist_arr[safe])
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

    # --- one attempt at a time (the closed loop) -----------------------------------------------------
    # The same checks on Python numbers, with the truth's scalar path (sim.truth says which formulas
    # it shares with the arrays and which it keeps in math). The latency is written twice too:
    # math.exp and np.exp differ in the last bit (measured: the latency before truncation differed in
    # 2,024, 2,023 and 1,992 of 48,000 attempts of the built-in worlds, the whole ms in none of them,
    # but a last bit can cross an integer), so the closed loop keeps math.exp.

    def p_approve(self, payment: Payment, routes: list[int], t: float, belief: Belief) -> list[float]:
        """The true P(approve) of attempting `payment` on each of `routes` at `t`, given `belief`."""
        card, amount = payment.card, float(payment.amount_minor)
        issuer = self._l_issuer[card]
        truth = self.truth
        pf = truth.p_funds1(card, amount, t)
        funds = min(1.0, max(0.0, (pf - belief.funds_lo) / max(belief.funds_hi - belief.funds_lo, 1e-12)))
        common = funds * belief.p_persist_ok
        return [
            (1.0 - truth.p_error1(r, t))
            * truth.p_available1(r, issuer, t)
            * common
            * truth.p_transient1(r, card, payment.merchant, amount, payment.recurring, t)
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
        truth = self.truth
        latency = int(
            min(_TIMEOUT_MS, self._l_lat_median[route] * math.exp(self._l_lat_sigma[route] * draws.z_latency))
        )
        if draws.u_error < truth.p_error1(route, t):
            return Outcome(ERROR, "", "", _TIMEOUT_MS, "error")
        if draws.u_avail >= truth.p_available1(route, issuer, t):
            return Outcome(DECLINED, self._pick1("unavailable", draws.u_code), "", latency, "unavailable")
        pf = truth.p_funds1(card, amount, t)
        if payment.u_funds >= pf:
            belief.funds_lo = max(belief.funds_lo, pf)
            mac = "25" if mastercard and draws.u_mac < d.mastercard_mac_funds else ""
            return Outcome(DECLINED, self._pick1("funds", draws.u_code), mac, latency, "funds")
        belief.funds_hi = min(belief.funds_hi, pf)
        pt = truth.p_transient1(route, card, payment.merchant, amount, payment.recurring, t)
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
        k = self._code_pos[code]
        belief.p_persist_ok = float(
            persist_posterior(belief.p_persist_ok, pt, self._l_q_transient[k], self._l_q_persist[k])
        )

    def _python_views(self) -> None:
        """Plain-Python copies of the arrays the scalar path reads."""
        self._l_issuer = self.card_issuer.tolist()
        self._l_network = self.card_network.tolist()
        self._l_persist_ok = self.issuer_persist_ok.tolist()
        self._l_lat_median = self.route_lat_median.tolist()
        self._l_lat_sigma = self.route_lat_sigma.tolist()
        self._l_codes = {kind: (codes, cum.tolist()) for kind, (codes, cum) in self.codes.items()}
        self._code_pos = {c: k for k, c in enumerate(self.codes_all)}
        self._l_q_transient = self._q_transient_arr.tolist()
        self._l_q_persist = self._q_persist_arr.tolist()

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
