"""The ground truth of a world: the probability that each check of an attempt passes (see sim.world).

`GroundTruth` evaluates them over a `Population` in two ways: on numpy arrays (`p_error`,
`p_available`, `p_funds`, `p_transient`: `World.outcome_arrays`, the emitter) and for one attempt
at a time on Python numbers (`p_error1`, ...: `World.attempt` and `World.p_approve`, the closed
loop; about 10x faster than numpy on size-1 arrays).

Each formula is written once, on arrays, and the scalar path calls it with Python floats —
`error_probability`, `available_probability`, `pay_cycle_funds`, `persist_posterior` — except where
numpy and `math` do not give the same bits. Measured by comparing the numpy and the scalar forms
(as they were in sim/world.py before it was split) on the three built-in worlds, seed 3, each
world's 48,000 payments on a random eligible route at their first attempt or up to an hour or ten
days later:

- **check 3, P(funds)**: ``σ((ln funds − ln amount) / 0.35)`` stays twice, `p_funds` (numpy) and
  `p_funds1` (math). ``np.exp``/``np.log`` and ``math.exp``/``math.log`` differ in the last bit for
  some inputs (``exp`` for 9,260 and ``log`` for 287 of 200,000 test values), and P(funds) differed
  in 154, 74 and 199 of the 48,000 (default, outage-heavy, cross-border), also when the scalar path
  called the numpy form with scalars. The funds themselves (`pay_cycle_funds`) are written once.
- **check 5, P(the risk engine approves)**: the logit and its σ stay twice, `p_transient` and
  `p_transient1`, for the same reason (``ln(amount / median)`` and ``exp``): they differed in 273,
  253 and 375 of the 48,000.
- **check 2** is one formula, `available_probability`, but the two paths evaluate it in different
  precisions, as they always did: the numpy path in float32 (the incident grids' dtype, which numpy
  keeps when a Python float meets a float32 array), the scalar path in float64. Calling `p_available`
  from the scalar path changed it in 970 of the 48,000 of outage-heavy (0 in the other two worlds),
  so the scalar path passes the severities as Python floats.

`error_probability` (check 1) and `persist_posterior` (the belief after a decline) give the same bits
on both paths.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import TypeVar

import numpy as np

from sim.population import Population

__all__ = [
    "GroundTruth",
    "available_probability",
    "error_probability",
    "pay_cycle_funds",
    "persist_posterior",
    "sigmoid",
]

_FUNDS_SCALE = 0.35
_X = TypeVar("_X", float, np.ndarray)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))  # type: ignore[no-any-return]


def error_probability(base: _X, route_severity: _X) -> _X:
    """Check 1 fails (the route errors): its error rate plus half its degradation's severity."""
    return np.minimum(1.0, base + 0.5 * route_severity)  # type: ignore[return-value,no-any-return]


def available_probability(issuer_severity: _X, route_severity: _X) -> _X:
    """Check 2 passes (the issuer is reachable): neither its outage nor the route's degradation hits."""
    return (1.0 - issuer_severity) * (1.0 - 0.5 * route_severity)


def pay_cycle_funds(balance: _X, low: _X, t: _X, last: _X, nxt: _X) -> _X:
    """The funds of a card at `t` (in its own shifted calendar) between paydays `last` and `nxt`:
    its `balance` on payday, run down linearly to `low` x balance by the next."""
    phase = (t - last) / (nxt - last)
    return balance * (1.0 - (1.0 - low) * phase)  # type: ignore[no-any-return]


def persist_posterior(p_persist_ok: _X, pt: _X, q_transient: _X, q_persist: _X) -> _X:
    """P(check 4 passes) after a decline at check 4 or 5 whose code has probability `q_transient`
    among check 5's codes and `q_persist` among check 4's, `pt` being P(check 5 passes) then (Bayes)."""
    like_ok = (1.0 - pt) * q_transient
    den = p_persist_ok * like_ok + (1.0 - p_persist_ok) * q_persist
    return np.where(den > 0, p_persist_ok * like_ok / np.where(den > 0, den, 1.0), 0.0)  # type: ignore[return-value,no-any-return]


class GroundTruth:
    """The pass probabilities of checks 1, 2, 3 and 5 of an attempt in `pop` (check 4's is the
    issuer's `issuer_persist_ok`)."""

    def __init__(self, pop: Population) -> None:
        self.pop = pop
        # Plain-Python copies of the arrays the scalar path reads.
        self._route_error = pop.route_error.tolist()
        self._paydays = pop.payday_ts.tolist()
        self._balance = pop.card_balance.tolist()
        self._low = pop.card_low.tolist()
        self._pay_shift = pop.card_pay_shift.tolist()
        self._issuer = pop.card_issuer.tolist()
        self._token = pop.card_token.tolist()
        self._funding = pop.card_funding.tolist()
        self._issuer_logit = pop.issuer_logit.tolist()
        self._issuer_amp = pop.issuer_amp.tolist()
        self._lift = pop.route_issuer_lift.tolist()
        self._route_token = pop.route_token.tolist()
        self._route_debit = pop.route_debit.tolist()
        self._merchant_risk = pop.merchant_risk.tolist()
        self._merchant_median = pop.merchant_median.tolist()

    # --- on arrays ---------------------------------------------------------------------------------

    def p_error(self, routes: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        return error_probability(self.pop.route_error[routes], self.pop.route_grid.at(routes, t))

    def p_available(self, routes: np.ndarray, issuer: np.ndarray | int, t: float | np.ndarray) -> np.ndarray:
        return available_probability(self.pop.issuer_grid.at(issuer, t), self.pop.route_grid.at(routes, t))

    def p_funds(
        self, card: np.ndarray | int, amount: np.ndarray | float, t: np.ndarray | float
    ) -> np.ndarray:
        p = self.pop
        t = np.asarray(t, dtype=np.float64) - p.card_pay_shift[card]
        k = np.searchsorted(p.payday_ts, t, side="right")
        funds = pay_cycle_funds(p.card_balance[card], p.card_low[card], t, p.payday_ts[k - 1], p.payday_ts[k])
        return sigmoid((np.log(funds) - np.log(np.asarray(amount, dtype=np.float64))) / _FUNDS_SCALE)

    def p_transient(
        self,
        routes: np.ndarray,
        card: np.ndarray | int,
        merchant: np.ndarray | int,
        amount: np.ndarray | float,
        recurring: np.ndarray | bool,
        t: np.ndarray | float,
    ) -> np.ndarray:
        p = self.pop
        issuer = p.card_issuer[card]
        hour = ((np.asarray(t) - 0.0) % 86400) / 3600
        night = np.maximum(0.0, np.cos(2 * np.pi * (hour - 3) / 24))
        mc_median = p.merchant_median[merchant]
        x = (
            p.issuer_logit[issuer]
            - p.issuer_amp[issuer] * night
            + p.route_issuer_lift[routes, issuer]
            + p.route_token[routes] * p.card_token[card]
            + p.route_debit[routes] * (p.card_funding[card] == 2)
            + p.merchant_risk[merchant]
            - 0.2 * np.log(np.asarray(amount, dtype=np.float64) / mc_median)
            - 0.25 * np.asarray(recurring, dtype=np.float64)
        )
        return sigmoid(x)

    # --- one attempt, on Python numbers --------------------------------------------------------------

    def p_error1(self, route: int, t: float) -> float:
        return float(error_probability(self._route_error[route], self.pop.route_grid.at1(route, t)))

    def p_available1(self, route: int, issuer: int, t: float) -> float:
        return available_probability(self.pop.issuer_grid.at1(issuer, t), self.pop.route_grid.at1(route, t))

    def p_funds1(self, card: int, amount: float, t: float) -> float:
        """`p_funds` in math (see the module docstring)."""
        t -= self._pay_shift[card]
        days = self._paydays
        k = bisect_right(days, t)
        funds = pay_cycle_funds(self._balance[card], self._low[card], t, days[k - 1], days[k])
        return 1.0 / (1.0 + math.exp(-(math.log(funds) - math.log(amount)) / _FUNDS_SCALE))

    def p_transient1(
        self, route: int, card: int, merchant: int, amount: float, recurring: bool, t: float
    ) -> float:
        """`p_transient` in math (see the module docstring)."""
        issuer = self._issuer[card]
        hour = (t % 86400) / 3600
        night = max(0.0, math.cos(2 * math.pi * (hour - 3) / 24))
        x = (
            self._issuer_logit[issuer]
            - self._issuer_amp[issuer] * night
            + self._lift[route][issuer]
            + (self._route_token[route] if self._token[card] else 0.0)
            + (self._route_debit[route] if self._funding[card] == 2 else 0.0)
            + self._merchant_risk[merchant]
            - 0.2 * math.log(amount / self._merchant_median[merchant])
            - (0.25 if recurring else 0.0)
        )
        return 1.0 / (1.0 + math.exp(-x))
