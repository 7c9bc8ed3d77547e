"""One Recommend decision: features → (batched) model → policy, inside the latency budget.

Every failure on the way degrades to the transparent fallback policy and says why in
`decision_source`; nothing here may leave a payment unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Span

from authopt.v1 import attempt_pb2, optimizer_pb2
from model.features import FeatureLookup, FeatureStore, attempt_context, card_key, lookup_features
from model.layout import DELAY_BUCKETS_S, encode_flat
from server import policy, rules
from server.batcher import BatchStats, DeadlineExceeded, MicroBatcher, QueueFull
from server.health import RouteHealth
from server.issuer_health import IssuerHealth, is_unavailable, issuer_key
from server.models import ModelRegistry
from server.telemetry import tracer
from streams.contract import Entity
from streams.online import OnlineCards

__all__ = [
    "DecisionEngine",
    "EngineConfig",
    "Scores",
    "fallback_scores",
    "model_scores",
    "respond",
    "retry_advice",
    "retry_subject",
]

log = logging.getLogger(__name__)
Source = optimizer_pb2.DecisionSource

_NETWORK_NAMES = {
    attempt_pb2.CARD_NETWORK_VISA: "visa",
    attempt_pb2.CARD_NETWORK_MASTERCARD: "mastercard",
}
_ACTIONS = {
    "retry_now": optimizer_pb2.RETRY_ACTION_RETRY_NOW,
    "retry_at": optimizer_pb2.RETRY_ACTION_RETRY_AT,
    "do_not_retry": optimizer_pb2.RETRY_ACTION_DO_NOT_RETRY,
}
# Time kept back from the budget for the policy and the response once the model has answered.
_POLICY_RESERVE_S = 0.0003


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine needs from the settings."""

    exploration_rate: float
    feature_max_age_s: float
    routes: tuple[policy.Candidate, ...]


@dataclass(slots=True)
class Scores:
    """Approval and retry probabilities per candidate, and where they came from."""

    source: int
    p_approve: list[float]
    p_retry: list[list[float]]
    buckets_s: Sequence[int]
    model_version: str
    batch_rows: int | None = None
    issuer_factor: float = 1.0  # issuer health's, already in p_approve (1: none)


_MAX_EXPECTED = 100_000  # first-attempt decisions whose outcome route health still waits for


class DecisionEngine:
    """Turns a validated RecommendRequest into a RecommendResponse."""

    def __init__(
        self,
        config: EngineConfig,
        store: FeatureStore,
        registry: ModelRegistry,
        batcher: MicroBatcher,
        *,
        rng: random.Random | None = None,
        cards: OnlineCards | None = None,
        health: RouteHealth | None = None,
        issuer_health: IssuerHealth | None = None,
    ) -> None:
        self._config = config
        self.health = health
        self.issuer_health = issuer_health
        # what each recent first-attempt decision expected of its routes, for route health
        self._expected: OrderedDict[str, dict[str, float]] = OrderedDict()
        # and of its chosen route before issuer health's factor, for issuer health
        self._issuer_expected: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._store = store
        self._cards = cards
        self._registry = registry
        self._batcher = batcher
        self._rng = rng or random.Random()
        self._clock: Callable[[], float] | None = None

    def candidates(self, req: optimizer_pb2.RecommendRequest) -> list[policy.Candidate]:
        """The request's candidates, or the configured routes when it names none."""
        if req.candidates:
            return [policy.Candidate(c.id, c.cost_bps, c.fixed_fee_minor) for c in req.candidates]
        return list(self._config.routes)

    async def decide(
        self, req: optimizer_pb2.RecommendRequest, deadline: float, started: float
    ) -> optimizer_pb2.RecommendResponse:
        """Decide for `req`; `deadline` and `started` are event-loop times (seconds)."""
        now = time.time()
        cands = self.candidates(req)
        # Stage spans are recorded with explicit times rather than entered as the current span
        # (nothing below them needs a context), and only under a recording RPC span: children of an
        # unsampled one would be dropped anyway, and even a non-recording span costs per request.
        rpc_span = trace.get_current_span()
        traced = rpc_span.is_recording()
        t0 = time.time_ns() if traced else 0
        card_rows = None
        if self._cards is not None:  # card state in the online store: one shared round trip
            budget = deadline - self.loop_time() - _POLICY_RESERVE_S
            card_rows = await self._cards.lookup(card_key(req.attempt), budget)
        feats = lookup_features(self._store, req.attempt, [c.route_id for c in cands], card_rows)
        if traced:
            tracer.start_span("features", start_time=t0).end()
        scores = await self._score(req, cands, feats, deadline, now, traced)
        t0 = time.time_ns() if traced else 0
        try:
            resp = self._apply_policy(req, cands, feats, scores, now)
        except Exception:
            if scores.source != Source.DECISION_SOURCE_MODEL:
                raise
            # E.g. a non-finite model output from a corrupt feature value: never the payment's problem.
            log.exception("policy over model scores failed; answering from the fallback policy")
            scores = self._fallback(Source.DECISION_SOURCE_FALLBACK_ERROR, req, cands, feats)
            resp = self._apply_policy(req, cands, feats, scores, now)
        if traced:
            tracer.start_span(
                "policy",
                start_time=t0,
                attributes={"authopt.route": resp.routes[0].route_id if resp.routes else ""},
            ).end()
            if scores.batch_rows is not None:
                rpc_span.set_attribute("authopt.batch_size", scores.batch_rows)
        resp.server_time_us = int((self.loop_time() - started) * 1e6)
        return resp

    def shed(self, req: optimizer_pb2.RecommendRequest, started: float) -> optimizer_pb2.RecommendResponse:
        """An answer at once from the fallback policy (`DECISION_SOURCE_FALLBACK_OVERLOAD`), for a
        request admission control does not let near the model: no queue, no inference."""
        now = time.time()
        cands = self.candidates(req)
        card_rows = None if self._cards is None else self._cards.peek(card_key(req.attempt))
        feats = lookup_features(self._store, req.attempt, [c.route_id for c in cands], card_rows)
        scores = self._fallback(Source.DECISION_SOURCE_FALLBACK_OVERLOAD, req, cands, feats)
        resp = self._apply_policy(req, cands, feats, scores, now)
        resp.server_time_us = int((self.loop_time() - started) * 1e6)
        return resp

    def loop_time(self) -> float:
        """The event loop's clock (deadlines are on it), its bound method kept after the first call."""
        clock = self._clock
        if clock is None:
            clock = self._clock = asyncio.get_running_loop().time
        return clock()

    async def _score(
        self,
        req: optimizer_pb2.RecommendRequest,
        cands: list[policy.Candidate],
        feats: FeatureLookup,
        deadline: float,
        now: float,
        traced: bool = False,
    ) -> Scores:
        model = self._registry.current
        if model is None:
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_NO_MODEL, req, cands, feats)
        if not feats.card_state_known:
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_CARD_STATE, req, cands, feats)
        if feats.routes_known == 0 or (
            feats.routes_as_of is not None and now - feats.routes_as_of > self._config.feature_max_age_s
        ):
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_FEATURES, req, cands, feats)
        # Everything the model must answer by: the batcher fails the request when this passes,
        # queued or mid-forward, so the policy always has its reserve left.
        until = deadline - _POLICY_RESERVE_S
        if until - self.loop_time() < model.latency.estimate(len(cands)):
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_BUDGET, req, cands, feats)
        ctx = attempt_context(req.attempt, req.prior_attempts)
        routes = [(c.route_id, c.cost_bps, rows) for c, rows in zip(cands, feats.route_rows, strict=True)]
        stats = BatchStats(time.time_ns()) if traced else None
        try:
            out = await self._batcher.submit_flat(
                encode_flat(ctx, routes, feats.attempt_rows), len(routes), until, stats
            )
        except DeadlineExceeded:
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_BUDGET, req, cands, feats)
        except QueueFull:
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_OVERLOAD, req, cands, feats)
        except Exception:
            log.exception("inference failed; answering from the fallback policy")
            return self._fallback(Source.DECISION_SOURCE_FALLBACK_ERROR, req, cands, feats)
        card = req.attempt.card
        factor = 1.0
        if self.issuer_health is not None:
            factor = self.issuer_health.factor(issuer_key(card.issuer_country, card.bin), now)
        scores = model_scores(
            out,
            model.version,
            model.manifest.delay_buckets_s,
            model.selection,
            model.issuer_offset(card.issuer_country, card.bin),
            factor,
        )
        if stats is not None:
            # The batched work happened on the batcher's thread; record it as this request's children.
            tracer.start_span("queue_wait", start_time=stats.queued_ns).end(end_time=stats.started_ns)
            inference = tracer.start_span(
                "inference",
                start_time=stats.started_ns,
                attributes={
                    "authopt.model_version": model.version,
                    "authopt.batch_size": stats.batch_rows,
                    "authopt.batch_requests": stats.batch_requests,
                    "authopt.device": str(model.device),
                },
            )
            inference.end(end_time=stats.finished_ns)
            scores.batch_rows = stats.batch_rows
        return scores

    def _fallback(
        self,
        source: int,
        req: optimizer_pb2.RecommendRequest,
        cands: list[policy.Candidate],
        feats: FeatureLookup,
    ) -> Scores:
        model = self._registry.current
        return fallback_scores(source, req, cands, feats, model.version if model else "")

    def _apply_policy(
        self,
        req: optimizer_pb2.RecommendRequest,
        cands: list[policy.Candidate],
        feats: FeatureLookup,
        scores: Scores,
        now: float,
    ) -> optimizer_pb2.RecommendResponse:
        resp = respond(req, cands, feats, scores, now, self._config.exploration_rate, self._rng, self.health)
        if self.health is not None and not req.prior_attempts and req.request_id:
            # a first attempt's expected approval per route, kept until its outcome comes (bounded)
            self._expected[req.request_id] = {r.route_id: r.approval_probability for r in resp.routes}
            if len(self._expected) > _MAX_EXPECTED:
                self._expected.popitem(last=False)
        if (
            self.issuer_health is not None
            and scores.source == Source.DECISION_SOURCE_MODEL
            and not req.prior_attempts
            and req.request_id
        ):
            top = resp.routes[0]
            self._issuer_expected[req.request_id] = (
                top.route_id,
                top.approval_probability / scores.issuer_factor,
            )
            if len(self._issuer_expected) > _MAX_EXPECTED:
                self._issuer_expected.popitem(last=False)
        return resp

    def observe(self, outcome: attempt_pb2.AttemptOutcome) -> None:
        """An outcome the server has just published: route health sees it at once (O(1)), with what
        the decision expected of its route: as this replica remembers it when it made the decision,
        else as the caller echoed it (`expected_approval`, when another replica made it). Issuer
        health sees it too, with this replica's own expectation only (before its factor)."""
        if outcome.attempt.attempt_number > 1:
            return  # retries are another population: first attempts only
        if self.issuer_health is not None:
            chosen = self._issuer_expected.pop(outcome.request_id, None)
            card = outcome.attempt.card
            self.issuer_health.observe(
                issuer_key(card.issuer_country, card.bin),
                outcome.attempted_at.ToMicroseconds() / 1e6,
                outcome.status == attempt_pb2.OUTCOME_STATUS_APPROVED,
                is_unavailable(outcome.response_code),
                chosen[1] if chosen is not None and chosen[0] == outcome.route_id else None,
            )
        if self.health is None:
            return
        expected = self._expected.pop(outcome.request_id, {}).get(outcome.route_id)
        if expected is None and outcome.HasField("expected_approval"):
            expected = outcome.expected_approval
        self.health.observe(
            outcome.route_id,
            outcome.attempt.card.issuer_country,
            outcome.attempted_at.ToMicroseconds() / 1e6,
            outcome.status == attempt_pb2.OUTCOME_STATUS_APPROVED,
            expected,
        )


def model_scores(
    rows: list[list[float]],
    model_version: str,
    buckets_s: Sequence[int],
    selection: policy.SelectionCorrection | None = None,
    issuer_offset: float = 0.0,
    issuer_factor: float = 1.0,
) -> Scores:
    """Scores from a model's output rows for one request (column 0 route, 1.. retry per delay
    bucket); `selection` (the model's, from its manifest) corrects the route column for the
    ranking's selection, `issuer_offset` (the model's for the card's issuer) shifts it, and
    `issuer_factor` (issuer health's, below 1 while the card's issuer is down) scales it."""
    p = [r[0] for r in rows]
    if selection is not None:
        p = selection.apply(p)
    if issuer_offset:
        p = policy.shift_logits(p, issuer_offset)
    if issuer_factor != 1.0:
        p = [v * issuer_factor for v in p]
    retry = [r[1:] for r in rows]
    return Scores(
        Source.DECISION_SOURCE_MODEL, p, retry, buckets_s, model_version, issuer_factor=issuer_factor
    )


def fallback_scores(
    source: int,
    req: optimizer_pb2.RecommendRequest,
    cands: list[policy.Candidate],
    feats: FeatureLookup,
    model_version: str = "",
) -> Scores:
    """The transparent fallback: smoothed route success rates and the heuristic retry model."""
    rates: list[tuple[float, float] | None] = []
    for rows in feats.route_rows:
        row = rows.get(Entity.ROUTE)
        rate = None if row is None else (row.get("approval_rate_1h", 0.0), row.get("attempts_1h", 0.0))
        # A corrupt (non-finite) value counts as no data rather than poisoning the ranking.
        rates.append(rate if rate is not None and all(map(math.isfinite, rate)) else None)
    p = policy.success_rate_scores(cands, rates)
    p_retry: list[list[float]] = []
    if req.prior_attempts:
        last = req.prior_attempts[-1]
        ids = [c.route_id for c in cands]
        last_idx = ids.index(last.route_id) if last.route_id in ids else None
        p_retry = policy.heuristic_retry_probabilities(
            last.response_code, len(cands), last_idx, DELAY_BUCKETS_S
        )
    return Scores(source, p, p_retry, DELAY_BUCKETS_S, model_version)


def respond(
    req: optimizer_pb2.RecommendRequest,
    cands: list[policy.Candidate],
    feats: FeatureLookup,
    scores: Scores,
    now: float,
    exploration_rate: float,
    rng: random.Random,
    health: RouteHealth | None = None,
) -> optimizer_pb2.RecommendResponse:
    """The policy step: rank by value, demote what route health says is failing now and explore
    (`policy.explore_with_health`), advise on a retry (the simulator calls it too)."""
    amount = req.attempt.amount_minor
    ranked = policy.rank_by_value(amount, cands, scores.p_approve)
    demoted: dict[str, str] = {}
    if health is not None:
        demoted = health.demoted([r.route_id for r in ranked], req.attempt.card.issuer_country, now)
    probe_share = health.settings.probe_share if health is not None else 0.0
    chosen = policy.explore_with_health(ranked, exploration_rate, rng, demoted, probe_share)
    resp = optimizer_pb2.RecommendResponse(
        request_id=req.request_id,
        decision_source=scores.source,  # type: ignore[arg-type]
        model_version=scores.model_version,
        feature_age_ms=feats.age_ms(now),
        route_feature_age_ms=feats.route_age_ms(now),
        explored=chosen.explored,
        propensity=chosen.propensity,
        rules_version=rules.RULES_VERSION,
    )
    for r, first in zip(chosen.routes, chosen.first_position, strict=True):
        resp.routes.add(
            route_id=r.route_id,
            approval_probability=r.p_approve,
            expected_value_minor=r.expected_value_minor,
            cost_minor=r.cost_minor,
            first_position_propensity=first,
            demoted_reason=demoted.get(r.route_id, ""),
        )
    if req.prior_attempts:
        _advise_retry(req, cands, feats, scores, now, resp.retry)
    return resp


def retry_subject(
    req: optimizer_pb2.RecommendRequest, feats: FeatureLookup
) -> tuple[str, rules.Decline, rules.RetryCounters]:
    """What the network rules judge a retry of the request's last prior attempt by: the card's
    network, the decline, and the card's counters (the features', and the request's own prior
    attempts, which count even before their outcomes reach the features)."""
    prior = req.prior_attempts
    last = prior[-1]
    card_merchant = feats.attempt_rows.get(Entity.CARD_MERCHANT) or {}
    cma = feats.attempt_rows.get(Entity.CARD_MERCHANT_AMOUNT) or {}
    counters = rules.RetryCounters(
        card_merchant_reattempts_30d=max(int(card_merchant.get("reattempts_30d", 0.0)), len(prior) - 1),
        card_merchant_amount_attempts_30d=max(int(cma.get("attempts_30d", 0.0)), len(prior)),
        known=feats.card_state_known,
    )
    decline = rules.Decline(
        response_code=last.response_code,
        mastercard_mac=last.mastercard_mac,
        visa_category=int(last.visa_category),
        attempted_at=last.attempted_at.seconds + last.attempted_at.nanos / 1e9,
    )
    return _NETWORK_NAMES.get(req.attempt.card.network, "other"), decline, counters


def retry_advice(
    req: optimizer_pb2.RecommendRequest,
    cands: Sequence[policy.Candidate],
    feats: FeatureLookup,
    p_retry: Sequence[Sequence[float]],
    buckets_s: Sequence[int],
    now: float,
) -> policy.RetryDecision:
    """The retry advice for the request's last (declined or failed) prior attempt: the network rules'
    constraint from the decline and the card's counters (the features' and the request's own), the
    caller's retry window, and the retry head's probabilities valued by `policy.advise_retry`.
    Pure: the decision engine answers with it, and an offline replay of a model's advice checks it."""
    last = req.prior_attempts[-1]
    network, decline, counters = retry_subject(req, feats)
    if last.status == attempt_pb2.OUTCOME_STATUS_ERROR:
        constraint = rules.RetryConstraint(
            True, now, "", "the last attempt failed before an issuer answered: no decline for the rules"
        )
    else:
        constraint = rules.evaluate_retry(network, decline, counters, now)
    buckets, p_retry = list(buckets_s), list(p_retry)
    if req.retry_window_s:
        # The caller cannot retry after its window closes (a customer leaves the checkout): only
        # the delays that fit in it are valued, and a rule-imposed wait past it means no retry.
        deadline = decline.attempted_at + req.retry_window_s
        keep = [b for b, d in enumerate(buckets) if now + d <= deadline]
        buckets, p_retry = [buckets[b] for b in keep], [[row[b] for b in keep] for row in p_retry]
        if constraint.allowed and (not keep or constraint.earliest_at > deadline):
            constraint = rules.RetryConstraint(
                False,
                now,
                constraint.rule_id,
                f"no permitted retry time within the caller's {req.retry_window_s}s retry window"
                + (f"; {constraint.reason}" if constraint.rule_id else ""),
            )
    return policy.advise_retry(req.attempt.amount_minor, cands, p_retry, buckets, constraint, now)


def _advise_retry(
    req: optimizer_pb2.RecommendRequest,
    cands: list[policy.Candidate],
    feats: FeatureLookup,
    scores: Scores,
    now: float,
    out: optimizer_pb2.RetryAdvice,
) -> None:
    advice = retry_advice(req, cands, feats, scores.p_retry, scores.buckets_s, now)
    out.action = _ACTIONS[advice.action]  # type: ignore[assignment]
    out.route_id = advice.route_id
    if advice.action != "do_not_retry":
        out.retry_at.FromNanoseconds(int(advice.retry_at * 1e9))
    out.recovery_probability = advice.p_recover
    out.expected_value_minor = advice.expected_value_minor
    out.rule_id = advice.rule_id
    out.reason = advice.reason


def annotate(span: Span, resp: optimizer_pb2.RecommendResponse) -> None:
    """Decision attributes on the RPC span."""
    span.set_attribute("authopt.decision_source", optimizer_pb2.DecisionSource.Name(resp.decision_source))
    span.set_attribute("authopt.model_version", resp.model_version)
    if resp.routes:
        span.set_attribute("authopt.route", resp.routes[0].route_id)
