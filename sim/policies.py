"""The policies the simulator compares: industry baselines, the oracle, a logging policy, and authopt.

- `Static`: the merchant's primary route; `Cheapest`: the lowest-cost route for the amount.
- `SuccessRate`: success-rate routing as in Juspay's decision engine — per route × dimension (here
  the card's BIN-6 issuer range) the outcome of the last N attempts, a route-level window when a
  dimension has too few, ~5 % hedging (uniform exploration), and elimination of routes far below the
  best from the hedge.
- Retries of the baselines: a fixed ladder (`Ladder`): merchant-initiated payments on days 1, 7 and
  21 after the first try (4 tries over 21 days); customer-initiated ones once, at once, on the same
  route; never where the network rules forbid, never before a rule's minimum wait.
- `Oracle`: the true probabilities (the simulator's `Belief`), exact value maximisation through the
  server's own policy functions: the physical limit.
- `Logging`: what produces training data: routes drawn at random (half uniform, half the primary),
  retries at a random permitted delay bucket on a random route, every propensity known.
- `Authopt`: the exported model through the server's code path (feature lookup, layout encoding,
  `server.decision.respond`: ranking, exploration, network rules, retry advice).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Literal

import torch

from authopt.v1 import optimizer_pb2
from model.features import attempt_context, lookup_features
from model.layout import DELAY_BUCKETS_S, encode_flat
from server import policy as server_policy
from server import rules
from server.decision import fallback_scores, model_scores, respond
from server.health import HealthSettings, RouteHealth
from server.issuer_health import IssuerHealth, IssuerHealthSettings, is_unavailable, issuer_key
from server.models import LoadedModel
from server.settings import ServerSettings
from sim.play import (
    NETWORK_NAME,
    AttemptView,
    Decision,
    RetryPlan,
    add_prior_attempt,
    attempt_message,
)
from sim.world import APPROVED, ERROR, Outcome
from streams.contract import Entity, entity_key

__all__ = [
    "Authopt",
    "Cheapest",
    "Ladder",
    "Logging",
    "Oracle",
    "Static",
    "SuccessRate",
    "candidates",
]

_DAY = 86_400
Source = optimizer_pb2.DecisionSource
OnResponse = Callable[[AttemptView, optimizer_pb2.RecommendRequest, optimizer_pb2.RecommendResponse], None]


def _network(view: AttemptView) -> str:
    return NETWORK_NAME.get(int(view.world.card_network[view.payment.card]), "other")


def _constraint(view: AttemptView) -> rules.RetryConstraint | None:
    """What the rules permit after the last attempt (None: it was an error, no decline)."""
    last = view.history[-1]
    if last.outcome.status == ERROR:
        return None
    decline = rules.Decline(last.outcome.response_code, last.outcome.mastercard_mac, 0, last.at)
    return rules.evaluate_retry(_network(view), decline, view.counters(view.now), view.now)


def _deadline(view: AttemptView) -> float:
    return view.history[0].at + view.retry_window_s


class Ladder:
    """Fixed retry ladder (see the module docstring); `offsets_days` after the first try."""

    def __init__(self, offsets_days: tuple[float, ...] = (1, 7, 21)) -> None:
        self.offsets_days = offsets_days

    def retry(self, view: AttemptView) -> RetryPlan | None:
        last = view.history[-1]
        c = _constraint(view)
        if c is not None and not c.allowed:
            return None
        earliest = view.now if c is None else c.earliest_at
        if not view.payment.recurring:
            return RetryPlan(last.route, view.now) if view.number == 1 and earliest <= view.now else None
        k = view.number - 1
        if k >= len(self.offsets_days):
            return None
        at = max(view.history[0].at + self.offsets_days[k] * _DAY, earliest)
        return RetryPlan(last.route, at) if at <= _deadline(view) else None


class _Base:
    name = "base"
    uses_features = False

    def __init__(self) -> None:
        self.ladder = Ladder()

    def retry(self, view: AttemptView) -> RetryPlan | None:
        return self.ladder.retry(view)

    def observe(self, view: AttemptView, route: int, outcome: Outcome) -> None:
        return None


class Static(_Base):
    name = "static"

    def route(self, view: AttemptView) -> Decision:
        primary = view.world.merchant_primary[view.payment.merchant]
        return Decision(primary if primary in view.routes else view.routes[0])


class Cheapest(_Base):
    name = "cheapest"

    def route(self, view: AttemptView) -> Decision:
        w = view.world
        return Decision(min(view.routes, key=lambda r: (w.cost_minor(r, view.payment.amount_minor), r)))


class SuccessRate(_Base):
    """Juspay-style success-rate routing with hedging and elimination (see the module docstring)."""

    name = "success-rate"

    def __init__(
        self,
        *,
        window: int = 200,
        min_samples: int = 20,
        hedging: float = 0.05,
        elimination_gap: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.window, self.min_samples = window, min_samples
        self.hedging, self.elimination_gap = hedging, elimination_gap
        self.rng = random.Random(seed)
        self.by_dim: dict[tuple[int, str], deque[int]] = {}
        self.by_route: dict[int, deque[int]] = {}

    def _dim(self, view: AttemptView) -> str:
        return view.world.card_bin[view.payment.card][:6]

    def _score(self, route: int, dim: str) -> float:
        d = self.by_dim.get((route, dim))
        if d is not None and len(d) >= self.min_samples:
            return sum(d) / len(d)
        r = self.by_route.get(route)
        if r is not None and len(r) >= self.min_samples:
            return sum(r) / len(r)
        return 0.8

    def _active(self, routes: Sequence[int], dim: str) -> tuple[int, list[int]]:
        """The best-scoring route (ties: the earlier one) and the routes not eliminated beside it."""
        scores = {r: self._score(r, dim) for r in routes}
        best = max(routes, key=lambda r: (scores[r], -routes.index(r)))
        return best, [r for r in routes if scores[r] >= scores[best] - self.elimination_gap] or [best]

    def probabilities(self, routes: Sequence[int], dim: str) -> list[float]:
        """π(route) for each of `routes` given what has been observed so far: the best route
        1 − hedging + hedging / k, each other of the k routes not eliminated hedging / k, the rest 0
        (what `history.ope.replay_policy` weighs a logged decision by)."""
        best, active = self._active(routes, dim)
        k = len(active)
        return [(1 - self.hedging) * (r == best) + (self.hedging / k if r in active else 0.0) for r in routes]

    def route(self, view: AttemptView) -> Decision:
        best, active = self._active(view.routes, self._dim(view))
        k = len(active)
        pick = active[self.rng.randrange(k)] if self.rng.random() < self.hedging else best
        p = (1 - self.hedging) * (pick == best) + self.hedging / k
        return Decision(pick, p, pick != best)

    def learn(self, route: int, dim: str, approved: bool) -> None:
        """One outcome of `route` for a card of BIN-6 range `dim` into both windows."""
        self.by_dim.setdefault((route, dim), deque(maxlen=self.window)).append(int(approved))
        self.by_route.setdefault(route, deque(maxlen=self.window)).append(int(approved))

    def observe(self, view: AttemptView, route: int, outcome: Outcome) -> None:
        self.learn(route, self._dim(view), outcome.status == APPROVED)


def candidates(view: AttemptView) -> list[server_policy.Candidate]:
    """The payment's eligible routes with their prices, as the server's policy takes them."""
    w = view.world
    return [
        server_policy.Candidate(w.route_ids[r], int(w.route_cost_bps[r]), int(w.route_fixed[r]))
        for r in view.routes
    ]


def _window_buckets(view: AttemptView) -> list[int]:
    """The delay buckets that fit in the payment's retry window (what the server keeps, too)."""
    return [d for d in DELAY_BUCKETS_S if view.now + d <= _deadline(view)]


class Oracle(_Base):
    """Knows the true conditional probabilities; routes and retries by exact expected value."""

    name = "oracle"

    def route(self, view: AttemptView) -> Decision:
        p = view.world.p_approve(view.payment, view.routes, view.now, view.belief)
        ranked = server_policy.rank_by_value(view.payment.amount_minor, candidates(view), p)
        return Decision(view.world.route_index[ranked[0].route_id])

    def retry(self, view: AttemptView) -> RetryPlan | None:
        c = _constraint(view)
        if c is None:
            c = rules.RetryConstraint(True, view.now, "", "error: retry permitted")
        buckets = _window_buckets(view)
        if not c.allowed or not buckets or c.earliest_at > _deadline(view):
            return None
        w, pay = view.world, view.payment
        p_retry = [[0.0] * len(buckets) for _ in view.routes]
        for b, d in enumerate(buckets):
            when = max(view.now + d, c.earliest_at)
            for i, prob in enumerate(w.p_approve(pay, view.routes, when, replace(view.belief))):
                p_retry[i][b] = prob
        advice = server_policy.advise_retry(pay.amount_minor, candidates(view), p_retry, buckets, c, view.now)
        if advice.action == "do_not_retry":
            return None
        return RetryPlan(w.route_index[advice.route_id], advice.retry_at)


class Logging(_Base):
    """The exploring policy whose logs train the model (see the module docstring)."""

    name = "logging"

    def __init__(self, *, uniform: float = 0.5, retry_share: float = 0.85, seed: int = 0) -> None:
        super().__init__()
        self.uniform, self.retry_share = uniform, retry_share
        self.rng = random.Random(seed)

    def route(self, view: AttemptView) -> Decision:
        primary = view.world.merchant_primary[view.payment.merchant]
        if primary not in view.routes:
            primary = view.routes[0]
        k = len(view.routes)
        pick = view.routes[self.rng.randrange(k)] if self.rng.random() < self.uniform else primary
        return Decision(pick, (1 - self.uniform) * (pick == primary) + self.uniform / k, pick != primary)

    def retry(self, view: AttemptView) -> RetryPlan | None:
        c = _constraint(view)
        if (c is not None and not c.allowed) or self.rng.random() >= self.retry_share:
            return None
        earliest = view.now if c is None else c.earliest_at
        buckets = [d for d in _window_buckets(view) if view.now + d >= earliest]
        if not buckets:
            return None
        d = buckets[self.rng.randrange(len(buckets))]
        return RetryPlan(view.routes[self.rng.randrange(len(view.routes))], view.now + d)


def _server_health() -> HealthSettings | None:
    """Route health as `authopt serve` runs it by default."""
    d = ServerSettings.model_fields
    if not d["route_health"].default:
        return None
    return HealthSettings(
        fast_half_life_s=d["route_health_half_life_s"].default,
        drop=d["route_health_drop"].default,
        evidence=d["route_health_evidence"].default,
        probe_share=d["route_health_probe_share"].default,
    )


_SERVER_HEALTH = _server_health()


class Authopt:
    """The trained model through the server's decision code. `retries="model"` follows the retry
    advice; `"ladder"` keeps authopt's routing but retries on the fixed ladder (to isolate the value
    of each part)."""

    uses_features = True

    def __init__(
        self,
        model: LoadedModel,
        *,
        exploration_rate: float = 0.02,
        feature_max_age_s: float = 3600.0,
        retries: str = "model",
        seed: int = 0,
        selection: server_policy.SelectionCorrection | Literal["model"] | None = "model",
        issuer_offsets: Mapping[str, float] | Literal["model"] | None = "model",
        health: HealthSettings | None = _SERVER_HEALTH,
        replicas: int = 1,
        echo: bool = False,
        issuer_health: IssuerHealthSettings | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.model = model
        # The server's route health, fed every outcome as ReportOutcome would (None: off). With
        # several replicas behind the platform's round-robin, each keeps its own: a decision is
        # made by the next replica in turn, and its outcome is reported, as a separate call, to
        # the next in turn of its own rotation, so each replica sees a 1/N share of the outcomes.
        self.healths = [RouteHealth(health) for _ in range(replicas)] if health is not None else []
        # The server's issuer health (None: off), one per replica as route health; only the replica
        # that made a decision knows what the model expected of its route (before the correction)
        self.issuer_healths = (
            [IssuerHealth(issuer_health) for _ in range(replicas)] if issuer_health is not None else []
        )
        self._issuer_expected: list[dict[int, tuple[str, float]]] = [{} for _ in self.issuer_healths]
        self._last_factor = 1.0  # the last decision's issuer-health factor
        self.replicas = replicas
        self._decided = 0  # decisions made, for the round-robin
        self._reported = 0  # outcomes reported, for the round-robin
        # per replica, payment -> route -> expected approval: as in the server, only the replica that
        # made a decision knows what it expected; an outcome reported to another one comes without,
        # unless the platform echoes it (`echo`: AttemptOutcome.expected_approval)
        self._expected: list[dict[int, dict[str, float]]] = [{} for _ in self.healths]
        self.echo = echo
        self._last_replica = 0  # the replica that made the last decision
        # "model": the correction in the model's manifest, as the server applies it
        self.selection = model.selection if selection == "model" else selection
        # per issuer key, the logit offset after the correction ("model": the manifest's)
        offsets = model.manifest.route_selection_issuer if issuer_offsets == "model" else issuer_offsets
        self.issuer_offsets: Mapping[str, float] = offsets or {}
        self.last_route_p: list[float] | None = None  # the last decision's uncorrected route column
        self.last_issuer = ""  # the last decision's issuer key (streams.contract's ISSUER)
        self.exploration_rate = exploration_rate
        self.feature_max_age_s = feature_max_age_s
        self.retries = retries
        self.name = "authopt" if retries == "model" else "authopt+ladder"
        self.rng = random.Random(seed)
        self.ladder = Ladder()
        # Sees each first-attempt decision as the server would log it (`sim.served`).
        self.on_response: OnResponse | None = None

    def request(self, view: AttemptView, *, with_history: bool) -> optimizer_pb2.RecommendRequest:
        w, pay = view.world, view.payment
        number = view.number + 1 if with_history else view.number
        req = optimizer_pb2.RecommendRequest(request_id=f"pay-{pay.index}-{number}")
        req.attempt.CopyFrom(attempt_message(w, pay, number))
        for tried in view.history if with_history else view.history[: view.number - 1]:
            add_prior_attempt(req, w, tried.route, tried.outcome, tried.at)
        if req.prior_attempts:
            remaining = _deadline(view) - view.history[-1].at
            req.retry_window_s = max(1, int(remaining))
        return req

    def decide(
        self, view: AttemptView, req: optimizer_pb2.RecommendRequest
    ) -> optimizer_pb2.RecommendResponse:
        cands = candidates(view)
        assert view.store is not None
        feats = lookup_features(view.store, req.attempt, [c.route_id for c in cands])
        now = view.now
        health = issuer_health = None
        if self.healths or self.issuer_healths:  # the replica that decides, in turn
            self._last_replica = self._decided % self.replicas
            self._decided += 1
            health = self.healths[self._last_replica] if self.healths else None
            issuer_health = self.issuer_healths[self._last_replica] if self.issuer_healths else None
        stale = feats.routes_as_of is not None and now - feats.routes_as_of > self.feature_max_age_s
        if feats.routes_known == 0 or stale:
            self.last_route_p = None
            scores = fallback_scores(
                Source.DECISION_SOURCE_FALLBACK_FEATURES, req, cands, feats, self.model.version
            )
        else:
            ctx = attempt_context(req.attempt, req.prior_attempts, at=now)
            routes = [(c.route_id, c.cost_bps, rows) for c, rows in zip(cands, feats.route_rows, strict=True)]
            x = torch.frombuffer(encode_flat(ctx, routes, feats.attempt_rows), dtype=torch.float32)
            out = self.model.infer(x.view(len(routes), -1)).tolist()
            self.last_route_p = [r[0] for r in out]
            card = req.attempt.card
            self.last_issuer = entity_key(Entity.ISSUER, issuer_country=card.issuer_country, bin_=card.bin)
            buckets = self.model.manifest.delay_buckets_s
            offset = self.issuer_offsets.get(self.last_issuer, 0.0) if self.issuer_offsets else 0.0
            self._last_factor = issuer_health.factor(self.last_issuer, now) if issuer_health else 1.0
            scores = model_scores(out, self.model.version, buckets, self.selection, offset, self._last_factor)
        return respond(req, cands, feats, scores, now, self.exploration_rate, self.rng, health)

    def route(self, view: AttemptView) -> Decision:
        req = self.request(view, with_history=False)
        resp = self.decide(view, req)
        if self.on_response is not None:
            self.on_response(view, req, resp)
        if self.healths:
            self._expected[self._last_replica][view.payment.index] = {
                r.route_id: r.approval_probability for r in resp.routes
            }
        if self.issuer_healths and resp.decision_source == Source.DECISION_SOURCE_MODEL:
            # what the model expected of the chosen route before issuer health's factor
            self._issuer_expected[self._last_replica][view.payment.index] = (
                resp.routes[0].route_id,
                resp.routes[0].approval_probability / self._last_factor,
            )
        source = optimizer_pb2.DecisionSource.Name(resp.decision_source).removeprefix("DECISION_SOURCE_")
        top = resp.routes[0]
        p = top.approval_probability if resp.decision_source == Source.DECISION_SOURCE_MODEL else -1.0
        return Decision(view.world.route_index[top.route_id], resp.propensity, resp.explored, source, p)

    def retry(self, view: AttemptView) -> RetryPlan | None:
        if self.retries == "ladder":
            return self.ladder.retry(view)
        resp = self.decide(view, self.request(view, with_history=True))
        advice = resp.retry
        if advice.action == optimizer_pb2.RETRY_ACTION_RETRY_NOW:
            return RetryPlan(view.world.route_index[advice.route_id], view.now)
        if advice.action == optimizer_pb2.RETRY_ACTION_RETRY_AT:
            return RetryPlan(view.world.route_index[advice.route_id], advice.retry_at.ToNanoseconds() / 1e9)
        return None

    def observe(self, view: AttemptView, route: int, outcome: Outcome) -> None:
        if not (self.healths or self.issuer_healths):
            return
        replica = self._reported % self.replicas  # every attempt's outcome is a call in turn
        self._reported += 1
        if view.number == 1 and self.issuer_healths:  # issuer health too judges first attempts only
            w = view.world
            card = view.payment.card
            key = issuer_key(w.issuer_country[int(w.card_issuer[card])], w.card_bin[card])
            route_id = w.route_ids[route]
            mine = [e.pop(view.payment.index, None) for e in self._issuer_expected][replica]
            expected = mine[1] if mine is not None and mine[0] == route_id else None
            self.issuer_healths[replica].observe(
                key,
                view.now,
                outcome.status == APPROVED,
                is_unavailable(outcome.response_code),
                expected,
            )
        if view.number == 1 and self.healths:  # route health judges first attempts, as the server
            w = view.world
            issuer = w.issuer_country[int(w.card_issuer[view.payment.card])]
            route_id = w.route_ids[route]
            kept = [e.pop(view.payment.index, None) for e in self._expected]  # (the server's is bounded)
            expected = (kept[replica] or {}).get(route_id)
            if expected is None and self.echo:  # the deciding replica's, as the platform echoes it
                expected = next((k for k in kept if k is not None), {}).get(route_id)
            health = self.healths[replica]
            health.observe(route_id, issuer, view.now, outcome.status == APPROVED, expected)
