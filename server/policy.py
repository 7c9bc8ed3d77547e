"""Pure decision policy: turns approval probabilities into money, inside the network rules.

- Routing: expected value ``amount × P(approve) − route cost``, best first (:func:`rank_by_value`),
  then epsilon-greedy exploration over the first position with a logged propensity (:func:`explore`).
- Retry: every (route, delay bucket) the network rules permit is valued the same way and the best one
  is advised, or no retry when nothing is worth its cost (:func:`advise_retry`).
- Selection: the route ranked first is the one with the highest of several noisy estimates, so its
  estimate is biased upward (the optimizer's curse); :class:`SelectionCorrection` shrinks each
  candidate's logit toward the candidates' mean by a factor fitted on the model's own served
  decisions (``sim/selection.py``), which keeps their order and removes that bias; a model may also
  carry a logit offset per issuer (:func:`shift_logits`, the same for every candidate of a request).
- Fallback when the model is unavailable: smoothed success rates per route
  (:func:`success_rate_scores`) and a transparent retry heuristic (:func:`heuristic_retry_probabilities`).

This module is pure Python (no protobuf, grpc or torch) so that the simulator can import it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from server import rules

__all__ = [
    "DAILY_DISCOUNT",
    "DELAY_BUCKETS_S",
    "Candidate",
    "Exploration",
    "RankedRoute",
    "RetryDecision",
    "RetryOption",
    "SelectionCorrection",
    "advise_retry",
    "explore",
    "explore_with_health",
    "first_position_propensities",
    "heuristic_retry_probabilities",
    "rank_by_value",
    "retry_options",
    "route_cost_minor",
    "shift_logits",
    "success_rate_scores",
]

DELAY_BUCKETS_S: tuple[int, ...] = (0, 3600, 86400, 2 * 86400, 4 * 86400, 6 * 86400, 8 * 86400, 10 * 86400)
"""Default retry delay buckets in seconds (they line up with the Mastercard MAC 24-30 waits).
A model's manifest may declare its own; the functions here take the buckets as an argument."""

RETRY_NOW = "retry_now"
RETRY_AT = "retry_at"
DO_NOT_RETRY = "do_not_retry"


class Candidate(NamedTuple):
    """A route the caller allows for this attempt, with its price."""

    route_id: str
    cost_bps: int
    """Variable cost in basis points of the amount."""
    fixed_fee_minor: int
    """Fixed fee per attempt in minor currency units."""


class RankedRoute(NamedTuple):
    """A candidate with its predicted approval probability and value (minor units)."""

    route_id: str
    p_approve: float
    expected_value_minor: float
    cost_minor: float


class Exploration(NamedTuple):
    """The routes in the order to use them, and how the first one was chosen."""

    routes: list[RankedRoute]
    explored: bool
    """True iff the first route differs from the greedy (highest-value) one."""
    propensity: float
    """Probability with which this first route was chosen (for off-policy evaluation)."""
    first_position: tuple[float, ...] = ()
    """For each route in `routes`' order, the probability with which it would have been first
    (`explore_with_health` fills it; empty from `explore`)."""


class SelectionCorrection(NamedTuple):
    """Route probabilities corrected for the ranking's selection, per request.

    With ``z`` the candidates' logits and ``m`` their mean, each becomes
    ``intercept + mean_scale × m + spread_scale × (z − m)``: the candidates' differences shrink
    (``spread_scale < 1``) and so does the upward bias of the highest one, while their order is
    kept. The identity (the defaults) changes nothing.
    """

    intercept: float = 0.0
    mean_scale: float = 1.0
    spread_scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.intercept == 0.0 and self.mean_scale == 1.0 and self.spread_scale == 1.0

    def apply(self, p_approve: Sequence[float]) -> list[float]:
        """The corrected probabilities of one request's candidates (same order)."""
        if self.is_identity or not p_approve:
            return list(p_approve)
        z = [_logit(p) for p in p_approve]
        mean = math.fsum(z) / len(z)
        base = self.intercept + self.mean_scale * mean
        return [_sigmoid(base + self.spread_scale * (zi - mean)) for zi in z]


def shift_logits(p_approve: Sequence[float], offset: float) -> list[float]:
    """Each probability with `offset` added to its logit: an issuer's offset of the selection
    correction (``server/selection.py``), the same for every candidate of a request, so their
    order is kept. An offset of 0 changes nothing."""
    if offset == 0.0:
        return list(p_approve)
    return [_sigmoid(_logit(p) + offset) for p in p_approve]


@dataclass(frozen=True, slots=True)
class RetryOption:
    """One permitted retry: a route after a delay, valued in minor units."""

    route_id: str
    delay_s: int
    p_recover: float
    expected_value_minor: float
    cost_minor: float


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Advice on retrying the last declined attempt."""

    action: str
    """``"retry_now"`` | ``"retry_at"`` | ``"do_not_retry"``."""
    route_id: str
    retry_at: float
    """Epoch seconds; the decision time for retry_now and do_not_retry."""
    p_recover: float
    expected_value_minor: float
    rule_id: str
    """The network rule that constrained the advice (empty if none)."""
    reason: str


def route_cost_minor(amount_minor: int, cost_bps: int, fixed_fee_minor: int) -> float:
    """Cost of one attempt on a route in minor units: ``amount × bps / 10 000 + fixed fee``."""
    return amount_minor * cost_bps / 10_000 + fixed_fee_minor


def rank_by_value(
    amount_minor: int, candidates: Sequence[Candidate], p_approve: Sequence[float]
) -> list[RankedRoute]:
    """Rank candidates by expected value ``amount × p − cost``, best first.

    Ties go to the higher probability, then to the lower ``route_id``.
    """
    if len(candidates) != len(p_approve):
        raise ValueError(f"{len(candidates)} candidates but {len(p_approve)} probabilities")
    ranked = []
    for (route_id, cost_bps, fixed_fee), p in zip(candidates, p_approve, strict=True):
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            _check_probability(p)
        cost = amount_minor * cost_bps / 10_000 + fixed_fee  # route_cost_minor, inlined: per candidate
        ranked.append(RankedRoute(route_id, p, amount_minor * p - cost, cost))
    ranked.sort(key=_rank_key)
    return ranked


def _rank_key(r: RankedRoute) -> tuple[float, float, str]:
    return (-r.expected_value_minor, -r.p_approve, r.route_id)


def explore(ranked: list[RankedRoute], epsilon: float, rng: random.Random) -> Exploration:
    """Epsilon-greedy over the first position.

    With probability ``1 − ε`` the greedy top stays; with probability ``ε`` the top is drawn uniformly
    among all K routes (possibly the greedy one). The chosen route moves to the front and the others
    keep their order. Propensity of the chosen top: greedy ``(1 − ε) + ε/K``, any other ``ε/K``; K = 1
    gives 1.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    k = len(ranked)
    if k == 0:
        raise ValueError("cannot explore an empty ranking")
    if k == 1:
        return Exploration(list(ranked), explored=False, propensity=1.0)
    index = rng.randrange(k) if rng.random() < epsilon else 0
    greedy, other = _first_position(k, epsilon)
    if index == 0:
        return Exploration(list(ranked), explored=False, propensity=greedy)
    routes = [ranked[index], *ranked[:index], *ranked[index + 1 :]]
    return Exploration(routes, explored=True, propensity=other)


def _first_position(k: int, epsilon: float) -> tuple[float, float]:
    """The probabilities with which `explore` puts first the greedy route and each other route."""
    return (1.0 - epsilon) + epsilon / k, epsilon / k


def first_position_propensities(k: int, epsilon: float, explored: bool) -> list[float]:
    """For each of the `k` routes in the order `explore` returned them, the probability with which
    it would have been put first. The greedy route is first, or second when `explored` (the chosen
    route moved in front of it)."""
    if k <= 1:
        return [1.0] * k
    greedy, other = _first_position(k, epsilon)
    out = [other] * k
    out[1 if explored else 0] = greedy
    return out


def explore_with_health(
    ranked: list[RankedRoute],
    epsilon: float,
    rng: random.Random,
    demoted: Collection[str],
    probe_share: float,
) -> Exploration:
    """`explore` over the healthy routes, the `demoted` ones behind them, and probes.

    With probability `probe_share` (when some but not all routes are demoted) one demoted route,
    drawn uniformly, goes first — the probe that shows when it has recovered; otherwise the healthy
    routes are explored as `explore` does and the demoted ones follow them in value order. Every
    route's first-position probability is exact: a demoted one `probe_share / D`, a healthy one
    `(1 − probe_share)` × its probability under `explore` over the K − D healthy ones. With nothing
    demoted (or everything) this is `explore`, draw for draw."""
    sick = [r for r in ranked if r.route_id in demoted]
    if not sick or len(sick) == len(ranked):
        chosen = explore(ranked, epsilon, rng)
        first = first_position_propensities(len(ranked), epsilon, chosen.explored)
        return chosen._replace(first_position=tuple(first))
    healthy = [r for r in ranked if r.route_id not in demoted]
    q, d = probe_share, len(sick)
    if rng.random() < q:
        probe = rng.randrange(d)
        routes = [sick[probe], *healthy, *sick[:probe], *sick[probe + 1 :]]
        first = [q / d] + [(1 - q) * p for p in first_position_propensities(len(healthy), epsilon, False)]
        return Exploration(routes, True, q / d, tuple(first + [q / d] * (d - 1)))
    inner = explore(healthy, epsilon, rng)
    first = [(1 - q) * p for p in first_position_propensities(len(healthy), epsilon, inner.explored)]
    return Exploration(
        [*inner.routes, *sick], inner.explored, (1 - q) * inner.propensity, tuple(first + [q / d] * d)
    )


def retry_options(
    amount_minor: int,
    candidates: Sequence[Candidate],
    p_retry: Sequence[Sequence[float]],
    buckets_s: Sequence[int],
    constraint: rules.RetryConstraint,
    now: float,
) -> list[RetryOption]:
    """Every (route, delay bucket) retry the constraint permits, valued at ``amount × p − cost``.

    A bucket is eligible when ``now + delay ≥ earliest_at``. When the earliest permitted time is later
    than every bucket, one option per route is returned for that time, with the last bucket's
    probability (its ``delay_s`` is rounded down; the retry time is ``max(now + delay_s, earliest_at)``).
    Not allowed → no options.
    """
    _check_retry_shapes(candidates, p_retry, buckets_s)
    if not constraint.allowed:
        return []
    eligible = [(b, d) for b, d in enumerate(buckets_s) if now + d >= constraint.earliest_at]
    if not eligible and buckets_s:
        eligible = [(len(buckets_s) - 1, math.floor(constraint.earliest_at - now))]
    options = []
    for cand, row in zip(candidates, p_retry, strict=True):
        cost = route_cost_minor(amount_minor, cand.cost_bps, cand.fixed_fee_minor)
        for b, delay in eligible:
            p = row[b]
            _check_probability(p)
            options.append(RetryOption(cand.route_id, delay, p, amount_minor * p - cost, cost))
    return options


# Value lost per day a retry waits, as a share of its expected value (see advise_retry).
DAILY_DISCOUNT = 0.02


def advise_retry(
    amount_minor: int,
    candidates: Sequence[Candidate],
    p_retry: Sequence[Sequence[float]],
    buckets_s: Sequence[int],
    constraint: rules.RetryConstraint,
    now: float,
    *,
    min_value_minor: float = 0.0,
    daily_discount: float = DAILY_DISCOUNT,
) -> RetryDecision:
    """Advise whether, when and where to retry a decline.

    ``p_retry[i][b]`` is P(approve) when retrying on ``candidates[i]`` after ``buckets_s[b]`` seconds.
    Options of :func:`retry_options` are compared by expected value discounted by ``daily_discount``
    per day of waiting (money later is worth less: the customer may churn, the merchant waits), so a
    retry days later must recover clearly more to beat a sooner one; ties: sooner, then higher P,
    then candidate order. If the rules forbid a retry, or the best (undiscounted) value is
    ``≤ min_value_minor``, the advice is not to retry. ``rule_id`` is always the constraint's, so a
    wait shows which rule set it.
    """
    if not constraint.allowed:
        return RetryDecision(DO_NOT_RETRY, "", now, 0.0, 0.0, constraint.rule_id, constraint.reason)
    options = retry_options(amount_minor, candidates, p_retry, buckets_s, constraint, now)
    if not options:
        return RetryDecision(
            DO_NOT_RETRY, "", now, 0.0, 0.0, constraint.rule_id, "no candidate routes to retry on"
        )

    # max() keeps the first of equal keys: options are in candidate order, buckets ascending.
    def discounted(o: RetryOption) -> float:
        return float(o.expected_value_minor * (1.0 - daily_discount) ** (o.delay_s / 86_400))

    best = max(options, key=lambda o: (discounted(o), -o.delay_s, o.p_recover))
    if best.expected_value_minor <= min_value_minor:
        return RetryDecision(
            DO_NOT_RETRY, "", now, 0.0, 0.0, constraint.rule_id, "expected recovery value below cost"
        )
    retry_at = max(now + best.delay_s, constraint.earliest_at)
    if retry_at <= now:
        action, when, retry_at = RETRY_NOW, "now", now
    else:
        action, when = RETRY_AT, f"after {_human_s(retry_at - now)}"
    reason = f"highest expected value: retry on {best.route_id} {when} (P={best.p_recover:.2f})"
    if constraint.rule_id:
        reason += f"; {constraint.reason}"
    return RetryDecision(
        action, best.route_id, retry_at, best.p_recover, best.expected_value_minor, constraint.rule_id, reason
    )


def success_rate_scores(
    candidates: Sequence[Candidate],
    rates: Sequence[tuple[float, float] | None],
    *,
    prior: float = 0.8,
    prior_weight: float = 20.0,
) -> list[float]:
    """Fallback P(approve) per candidate from each route's rolling ``(approval_rate, attempts)``.

    Bayesian smoothing toward ``prior`` with ``prior_weight`` pseudo-attempts:
    ``(rate × n + prior × w) / (n + w)``, so a route with few attempts stays near the prior. A route
    without features (``None``) scores ``prior − 1e-6 × index`` so the configured order decides among
    unknown routes.
    """
    if len(candidates) != len(rates):
        raise ValueError(f"{len(candidates)} candidates but {len(rates)} rates")
    _check_probability(prior)
    if prior_weight <= 0:
        raise ValueError(f"prior_weight must be > 0, got {prior_weight}")
    scores = []
    for index, entry in enumerate(rates):
        if entry is None:
            scores.append(max(0.0, prior - 1e-6 * index))
            continue
        rate, n = entry
        _check_probability(rate)
        if not n >= 0:
            raise ValueError(f"attempts must be >= 0, got {n}")
        scores.append((rate * n + prior * prior_weight) / (n + prior_weight))
    return scores


# Heuristic retry model: (P now on a different route, P now on the same route, P long-run, time constant).
# P(d) = p_long − (p_long − p_now) × exp(−d / tau): recovery approaches its long-run level with delay.
_UNAVAILABLE_CODES = frozenset({"", "19", "68", "91", "92", "96"})
_FUNDS_CODES = frozenset({"51", "61", "65"})
_UNAVAILABLE = (0.55, 0.25, 0.75, 900.0)
_FUNDS = (0.05, 0.05, 0.35, 4 * 86_400.0)
_DO_NOT_HONOR = (0.15, 0.10, 0.25, 86_400.0)
_DATA_QUALITY = (0.02, 0.02, 0.02, 1.0)
_GENERIC = (0.08, 0.06, 0.20, 86_400.0)


def heuristic_retry_probabilities(
    decline_code: str, n_candidates: int, last_route_index: int | None, buckets_s: Sequence[int]
) -> list[list[float]]:
    """Transparent fallback retry model: ``p[i][b]`` = P(approve) retrying on route i after bucket b.

    Reasoning, by what the decline says about the cause:

    - Issuer or route unavailable (91 issuer inoperative, 96 system malfunction, 92 unable to route,
      68 late response, 19 re-enter, or no code at all = timeout/error): a transient outage. Another
      route often gets through at once (0.55) while the failed route is still degraded (0.25); both
      recover within minutes (τ = 15 min) toward 0.75.
    - Insufficient funds / limits (51, 61, 65): retrying now rarely helps (0.05); funds come back over
      days (payday), toward 0.35 with τ = 4 days. The issuer decides, so the route does not matter.
    - Do not honor (05): a soft, partly random issuer decline: 0.15 on another route, 0.10 on the same
      one, rising to 0.25 over a day.
    - Visa category 1 (never approve: lost/stolen, closed account, ...) is 0: a retry cannot succeed
      and the rules forbid it anyway. Category 3 (data quality) is near 0 until the data is fixed.
    - Anything else (generic declines): 0.08 / 0.06 now, toward 0.20 over a day.

    ``last_route_index`` is the route that declined; ``None`` (unknown) treats every route as the
    same route, i.e. pessimistically.
    """
    if n_candidates < 0:
        raise ValueError(f"n_candidates must be >= 0, got {n_candidates}")
    if last_route_index is not None and not 0 <= last_route_index < n_candidates:
        raise ValueError(f"last_route_index {last_route_index} out of range for {n_candidates} candidates")
    if any(d < 0 for d in buckets_s):
        raise ValueError("delay buckets must be >= 0")
    code = decline_code.strip().upper()
    category = rules.visa_category(code)
    if category == 1:
        return [[0.0] * len(buckets_s) for _ in range(n_candidates)]
    if code in _UNAVAILABLE_CODES:
        params = _UNAVAILABLE
    elif code in _FUNDS_CODES:
        params = _FUNDS
    elif code == "05":
        params = _DO_NOT_HONOR
    elif category == 3:
        params = _DATA_QUALITY
    else:
        params = _GENERIC
    p_other, p_same, p_long, tau = params
    table = []
    for i in range(n_candidates):
        p_now = p_other if last_route_index is not None and i != last_route_index else p_same
        table.append([_clip(p_long - (p_long - p_now) * math.exp(-d / tau)) for d in buckets_s])
    return table


def _check_retry_shapes(
    candidates: Sequence[Candidate], p_retry: Sequence[Sequence[float]], buckets_s: Sequence[int]
) -> None:
    if len(p_retry) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates but {len(p_retry)} probability rows")
    for row in p_retry:
        if len(row) != len(buckets_s):
            raise ValueError(f"{len(buckets_s)} delay buckets but a probability row of {len(row)}")
    if any(d < 0 for d in buckets_s) or any(a >= b for a, b in itertools.pairwise(buckets_s)):
        raise ValueError(f"delay buckets must be non-negative and strictly increasing: {list(buckets_s)}")


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"probability must be in [0, 1], got {p}")


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _clip(p: float) -> float:
    return min(1.0, max(0.0, p))


def _human_s(seconds: float) -> str:
    """Format a duration as e.g. ``"1h"``, ``"24h"``, ``"2d"``, ``"90s"``."""
    s = math.ceil(seconds)
    if s % 86_400 == 0 and s >= 2 * 86_400:
        return f"{s // 86_400}d"
    if s % 3_600 == 0:
        return f"{s // 3_600}h"
    if s % 60 == 0:
        return f"{s // 60}min"
    return f"{s}s"
