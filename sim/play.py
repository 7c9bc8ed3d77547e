"""Closed-loop play: a policy routes and retries the world's payments, one attempt at a time.

Every policy plays the same payments with the same draws (common random numbers), so differences
between policies are differences between decisions. Outcomes become `AttemptEvent` records; a policy
that reads features gets them from those records through the streams' own feature code
(`streams.replay.FeatureReplay`), so its decisions change its features. The platform side is played
here too: it allows at most `traffic.max_attempts` tries per payment, retries a customer-initiated
payment only within `cit_patience_s`, a merchant-initiated one within `mit_patience_days`, and counts
(but does not stop) any retry the network rules forbid.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO, Protocol

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from server import rules
from sim.world import APPROVED, ERROR, Belief, Outcome, Payment, World
from streams.replay import FeatureReplay, append_record
from streams.store import InMemoryFeatureStore

__all__ = [
    "NETWORK_NAME",
    "AttemptView",
    "Decision",
    "PlayResult",
    "Policy",
    "RetryPlan",
    "RuleCounters",
    "add_prior_attempt",
    "attempt_message",
    "outcome_message",
    "play",
]

_DAY = 86_400
NETWORK_NAME = {1: "visa", 2: "mastercard"}  # CardNetwork number -> server.rules network


@dataclass(frozen=True, slots=True)
class Decision:
    route: int
    propensity: float = 1.0
    explored: bool = False
    source: str = ""
    p_approve: float = -1.0  # the policy's own estimate for the chosen route (-1: none)


@dataclass(frozen=True, slots=True)
class RetryPlan:
    route: int
    at: float


@dataclass(slots=True)
class Tried:
    """One attempt a payment has made."""

    route: int
    at: float
    outcome: Outcome


@dataclass(slots=True)
class AttemptView:
    """What a policy may look at for one decision. `belief` is the simulator's truth: only the
    oracle reads it."""

    world: World
    payment: Payment
    number: int  # 1-based attempt number being decided (or, for retry(), the one that failed)
    now: float
    routes: list[int]  # eligible routes, merchant's order
    history: list[Tried]
    belief: Belief
    store: InMemoryFeatureStore | None
    counters: Callable[[float], rules.RetryCounters]
    retry_window_s: float


class Policy(Protocol):
    name: str
    uses_features: bool

    def route(self, view: AttemptView) -> Decision: ...

    def retry(self, view: AttemptView) -> RetryPlan | None: ...

    def observe(self, view: AttemptView, route: int, outcome: Outcome) -> None: ...


@dataclass
class PlayResult:
    """Per-payment and per-attempt facts of one play (metrics are computed from them)."""

    policy: str
    world: str
    seed: int
    payments: int = 0
    amount: list[int] = field(default_factory=list)
    first_approved: list[bool] = field(default_factory=list)
    final_approved: list[bool] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)  # route costs of all attempts
    fees: list[float] = field(default_factory=list)  # reattempt fees
    first_route: list[int] = field(default_factory=list)
    first_propensity: list[float] = field(default_factory=list)
    first_p_true: list[float] = field(default_factory=list)  # true P(approve) of the chosen route
    first_best_p_true: list[float] = field(default_factory=list)
    first_p_model: list[float] = field(default_factory=list)  # the policy's estimate, -1 when none
    first_value: list[float] = field(default_factory=list)  # approved amount - cost, first attempt
    cross_border: list[bool] = field(default_factory=list)
    recurring: list[bool] = field(default_factory=list)
    network: list[int] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    violations: int = 0
    violation_examples: list[str] = field(default_factory=list)
    explored: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    events: int = 0


def attempt_message(world: World, payment: Payment, number: int) -> attempt_pb2.Attempt:
    """The `authopt.v1.Attempt` of attempt `number` of `payment` (what a platform would send)."""
    m = world.config.merchants[payment.merchant]
    return attempt_pb2.Attempt(
        merchant=attempt_pb2.Merchant(id=m.id, mcc=m.mcc, country=m.country),
        amount_minor=payment.amount_minor,
        currency=m.currency,
        card=attempt_pb2.Card(**world.card_fields(payment.card)),  # type: ignore[arg-type]
        channel=payment.channel,  # type: ignore[arg-type]
        initiator=attempt_pb2.INITIATOR_MERCHANT if payment.recurring else attempt_pb2.INITIATOR_CUSTOMER,
        recurring=payment.recurring,
        attempt_number=number,
    )


def add_prior_attempt(
    req: optimizer_pb2.RecommendRequest, world: World, route: int, o: Outcome, at: float
) -> None:
    """Append an attempt made on `route` at `at` with outcome `o` to `req.prior_attempts`."""
    prior = req.prior_attempts.add(
        route_id=world.route_ids[route],
        response_code=o.response_code,
        mastercard_mac=o.mastercard_mac,
        status=o.status,  # type: ignore[arg-type]
    )
    prior.attempted_at.FromNanoseconds(int(at * 1e9))


def outcome_message(
    world: World,
    payment: Payment,
    number: int,
    route: int,
    at: float,
    o: Outcome,
    *,
    event_id: str,
    request_id: str,
) -> attempt_pb2.AttemptOutcome:
    """The `authopt.v1.AttemptOutcome` a platform reports for attempt `number`, made at `at`."""
    outcome = attempt_pb2.AttemptOutcome(
        event_id=event_id,
        request_id=request_id,
        attempt=attempt_message(world, payment, number),
        route_id=world.route_ids[route],
        status=o.status,  # type: ignore[arg-type]
        response_code=o.response_code,
        mastercard_mac=o.mastercard_mac,
        visa_category=rules.visa_category(o.response_code)
        if o.response_code and _is_visa(world, payment)
        else 0,  # type: ignore[arg-type]
        latency_ms=o.latency_ms,
    )
    outcome.attempted_at.FromNanoseconds(int(at * 1e9))
    return outcome


def _event(world: World, payment: Payment, number: int, route: int, at: float, o: Outcome) -> bytes:
    outcome = outcome_message(
        world,
        payment,
        number,
        route,
        at,
        o,
        event_id=f"{world.config.name}-{world.seed}-{payment.index}-{number}",
        request_id=f"pay-{payment.index}",
    )
    event = events_pb2.AttemptEvent(outcome=outcome, producer="sim")
    event.received_at.FromNanoseconds(int((at + o.latency_ms / 1000) * 1e9))
    return event.SerializeToString()


def _is_visa(world: World, payment: Payment) -> bool:
    return int(world.card_network[payment.card]) == 1


class RuleCounters:
    """The per-card counters the network rules refer to, from the attempts actually made."""

    def __init__(self) -> None:
        self.reattempts: dict[tuple[int, int], list[float]] = defaultdict(list)
        self.attempts: dict[tuple[int, int, int], list[float]] = defaultdict(list)

    def add(self, p: Payment, number: int, at: float) -> None:
        self.attempts[(p.card, p.merchant, p.amount_minor)].append(at)
        if number > 1:
            self.reattempts[(p.card, p.merchant)].append(at)

    def at(self, p: Payment, when: float) -> rules.RetryCounters:
        since = when - 30 * _DAY
        re = sum(1 for t in self.reattempts.get((p.card, p.merchant), ()) if since < t <= when)
        at = sum(1 for t in self.attempts.get((p.card, p.merchant, p.amount_minor), ()) if since < t <= when)
        return rules.RetryCounters(card_merchant_reattempts_30d=re, card_merchant_amount_attempts_30d=at)


def play(  # noqa: C901 - the steps of one attempt, in order, in one loop
    world: World,
    policy: Policy,
    *,
    payments: list[Payment] | None = None,
    log: BinaryIO | None = None,
    on_decision: Callable[[AttemptView, Decision], None] | None = None,
    features: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PlayResult:
    """Play every payment under `policy`; returns the facts.

    `log` receives the delimited AttemptEvents; `on_decision` sees each first attempt's decision
    before it is played (with the features as they stood); `features` keeps features even for a
    policy that does not read them (for off-policy evaluation of one that does).
    """
    pays = world.payments() if payments is None else payments
    tc = world.config.traffic
    result = PlayResult(policy.name, world.config.name, world.seed, payments=len(pays))
    live = policy.uses_features or features
    replay = FeatureReplay(lateness_s=float("inf"), max_future_s=float("inf")) if live else None
    counters = RuleCounters()
    heap: list[tuple[float, int, int, int, int]] = [(p.at, k, 0, 1, -1) for k, p in enumerate(pays)]
    heapq.heapify(heap)
    beliefs = [world.prior_belief(p) for p in pays]
    history: list[list[Tried]] = [[] for _ in pays]
    seq = len(pays)
    _fill(result, world, pays)
    done = 0
    while heap:
        now, j, _, number, planned = heapq.heappop(heap)
        p = pays[j]
        window = tc.cit_patience_s if not p.recurring else tc.mit_patience_days * _DAY
        view = AttemptView(
            world, p, number, now, world.eligible_routes(p), history[j], beliefs[j],
            replay.store if replay else None, partial(counters.at, p), window,
        )  # fmt: skip
        if planned < 0:
            decision = policy.route(view)
            route = decision.route
            if decision.explored:
                result.explored += 1
            if decision.source:
                result.sources[decision.source] = result.sources.get(decision.source, 0) + 1
        else:
            route, decision = planned, Decision(planned)
        if number == 1:
            _note_first(result, j, view, decision)
            if on_decision is not None:
                on_decision(view, decision)
        outcome = world.attempt(p, route, now, world.draws(p, number), beliefs[j])
        counters.add(p, number, now)
        history[j].append(Tried(route, now, outcome))
        result.attempts[j] = number
        result.cost[j] += world.cost_minor(route, p.amount_minor)
        if number > 1:
            result.fees[j] += world.config.retry_fee_minor
        record = _event(world, p, number, route, now, outcome) if (replay or log) else b""
        if log is not None:
            append_record(log, record)
        if replay is not None:
            replay.apply(record)
        result.events += 1
        policy.observe(view, route, outcome)
        if number == 1:
            cost = world.cost_minor(route, p.amount_minor)
            result.first_value[j] = (p.amount_minor if outcome.status == APPROVED else 0.0) - cost
        if outcome.status == APPROVED:
            result.final_approved[j] = True
            result.first_approved[j] = number == 1
            plan = None
        else:
            plan = policy.retry(view) if number < tc.max_attempts else None
        if plan is None or plan.at - history[j][0].at > window or plan.at < now:
            done += 1
            if progress is not None:
                progress(done)
            continue
        if outcome.status != ERROR:
            _check_rules(world, p, outcome, now, plan, counters, result)
        seq += 1
        heapq.heappush(heap, (plan.at, j, seq, number + 1, plan.route))
    return result


def _fill(result: PlayResult, world: World, pays: list[Payment]) -> None:
    n = len(pays)
    result.amount = [p.amount_minor for p in pays]
    result.first_approved = [False] * n
    result.final_approved = [False] * n
    result.attempts = [0] * n
    result.cost = [0.0] * n
    result.fees = [0.0] * n
    result.first_route = [-1] * n
    result.first_propensity = [1.0] * n
    result.first_p_true = [0.0] * n
    result.first_best_p_true = [0.0] * n
    result.first_p_model = [-1.0] * n
    result.first_value = [0.0] * n
    result.at = [p.at for p in pays]
    result.recurring = [p.recurring for p in pays]
    result.network = [int(world.card_network[p.card]) for p in pays]
    result.cross_border = [
        world.issuer_country[int(world.card_issuer[p.card])] != world.merchant_country[p.merchant]
        for p in pays
    ]


def _note_first(result: PlayResult, j: int, view: AttemptView, decision: Decision) -> None:
    truth = view.world.p_approve(view.payment, view.routes, view.now, view.belief)
    result.first_route[j] = decision.route
    result.first_propensity[j] = decision.propensity
    result.first_p_true[j] = truth[view.routes.index(decision.route)]
    result.first_best_p_true[j] = max(truth)
    result.first_p_model[j] = decision.p_approve


def _check_rules(
    world: World,
    p: Payment,
    o: Outcome,
    now: float,
    plan: RetryPlan,
    counters: RuleCounters,
    result: PlayResult,
) -> None:
    network = NETWORK_NAME.get(int(world.card_network[p.card]), "other")
    decline = rules.Decline(o.response_code, o.mastercard_mac, 0, now)
    c = rules.evaluate_retry(network, decline, counters.at(p, plan.at), plan.at)
    if not c.allowed or plan.at + 1e-6 < c.earliest_at:
        result.violations += 1
        if len(result.violation_examples) < 5:
            result.violation_examples.append(f"payment {p.index}: {c.reason}")
