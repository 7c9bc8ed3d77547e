"""Off-policy evaluation on a log: what a model's routing would have achieved on the logged traffic.

The logged decisions (`DIR/decisions`: authopt's decision log, or a platform's own routing imported
with its candidates and propensities) are joined to their outcomes (`streams.decisions.join_decisions`,
the one join) and replayed in time order through the streams' feature code, so each decision's
candidates are encoded from the features as they stood when it was made (`model.dataset.
encode_candidates`, byte for byte the server's inputs). A target policy is a model routed the way the
server routes: the candidates ranked by expected value ``amount × P(approve) − cost`` (P through the
model's selection correction), the best first, with probability ε spread over all of them.

For each target and metric (first-attempt approval; net revenue = amount if approved, minus the
route's cost, minor units at par) the estimates are:

- **DM** (direct method): the mean over decisions of ``Σ_a π(a|x) q̂(x, a)``, with q̂ the reward model;
  biased wherever q̂ is.
- **IPS**: the mean of ``w r`` with ``w = π(a_logged|x) / μ(a_logged|x)`` (μ: the logged propensity).
- **SNIPS**: ``Σ w r / Σ w``.
- **DR** (doubly robust): the mean of ``DM + w (r − q̂(x, a_logged))``: unbiased when either the
  propensities or q̂ are right.

with 95 % percentile bootstrap intervals (rows resampled), and the effective sample size
``(Σ w)² / Σ w²``.

A policy whose choice depends on the outcomes of its own earlier choices (success-rate routing keeps
running counts of what it caused) is not a function of the logged context alone, so IPS and DR cannot
weigh it. `replay_policy` estimates it by **rejection-sampling replay** (Li et al., WSDM 2011, for
uniform logging; Dudík et al., UAI 2012, for known non-uniform propensities): walking the decisions in
time order, decision i is accepted with probability ``π_t(a_i|x_i) / (M μ(a_i|x_i))`` (M the largest
``1/μ`` in the log), so every context is accepted with the same probability 1/M and an accepted
decision's route is distributed as the policy would have chosen it; the policy learns only the
accepted outcomes, as if it had served that thinned stream. The estimate is unbiased for the policy
run on a stream 1/M as dense (a policy that learns from counts learns more slowly per unit time there;
measured in `docs/history.md`). The reward model q̂ is the champion's P(approve) when a champion is given (the
model trusted today; the same q̂ for both, so their difference is paired), else the candidate's. A
log without propensities gives the direct method only, labelled biased.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from history.store import read_decisions, read_records
from model.dataset import encode_candidates, prior_of
from model.features import FeatureLookup, lookup_features
from model.layout import INPUT_LAYOUT
from model.train import expected_calibration_error, reliability_bins
from server import policy, rules
from server.decision import retry_advice, retry_subject
from server.models import LoadedModel
from server.settings import RouteConfig
from streams.contract import Entity, entity_key
from streams.decisions import join_decisions
from streams.replay import FeatureReplay, ReplayStats

__all__ = [
    "ESTIMATORS",
    "METRICS",
    "Estimate",
    "LoggedDecisions",
    "LoggedRetry",
    "PolicyValue",
    "ReplayPolicy",
    "ReplayValue",
    "RuleCheck",
    "calibration",
    "collect",
    "evaluate_policy",
    "logging_value",
    "model_policy",
    "predict",
    "replay_policy",
    "rule_violations",
    "uplift",
]

METRICS = ("approval", "net_revenue")
ESTIMATORS = ("dm", "ips", "snips", "dr")
_F = npt.NDArray[np.float64]
_NETWORKS = {
    v.number: v.name.removeprefix("CARD_NETWORK_").lower() for v in attempt_pb2.CardNetwork.DESCRIPTOR.values
}


@dataclass(frozen=True)
class LoggedRetry:
    """A logged first attempt that was declined (or failed), as the request for its retry would come
    to the server: what a model's retry advice is replayed on (`rule_violations`)."""

    request: optimizer_pb2.RecommendRequest
    candidates: list[policy.Candidate]
    feats: FeatureLookup
    x: npt.NDArray[np.float32]  # [k, inputs]: the retry's inputs on each candidate
    now: float  # when the decline was reported


@dataclass
class LoggedDecisions:
    """The logged first-attempt decisions joined to their outcomes, in time order."""

    x: list[npt.NDArray[np.float32]] = field(default_factory=list)  # [k, inputs] per decision
    candidates: list[list[str]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    cost: list[_F] = field(default_factory=list)  # per candidate, minor units
    amount: list[float] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)  # index of the route the attempt went to
    propensity: list[float] = field(default_factory=list)  # μ(chosen | x); nan: not logged
    approved: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    issuer: list[str] = field(default_factory=list)  # the card's ISSUER key (the model's issuer offsets)
    segments: dict[str, list[str]] = field(
        default_factory=lambda: {"network": [], "issuer_country": [], "route": []}
    )
    skipped: Counter[str] = field(default_factory=Counter)
    join: dict[str, int] = field(default_factory=dict)
    retries: list[LoggedRetry] = field(default_factory=list)  # declined first attempts, for the rules

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def has_propensities(self) -> bool:
        return any(not math.isnan(p) for p in self.propensity)


def collect(
    log_dir: Path,
    routes: Sequence[RouteConfig],
    *,
    since_us: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoggedDecisions:
    """The decisions under `log_dir` (decided at or after `since_us`) with their inputs and outcomes."""
    costs = {r.id: r for r in routes}
    log = read_records(log_dir)
    events = [events_pb2.AttemptEvent.FromString(r) for r in log.records]
    joined = join_decisions(read_decisions(log_dir), events)
    out = LoggedDecisions()
    out.join = {
        "decisions": joined.decisions,
        "pairs": len(joined.pairs),
        "unanswered": len(joined.unanswered),
        "late": joined.late,
        "orphan_outcomes": joined.orphan_outcomes,
        "duplicate_decisions": joined.duplicate_decisions,
        "duplicate_outcomes": joined.duplicate_outcomes,
    }
    by_event: dict[str, events_pb2.DecisionRecord] = {}
    for decision, event in joined.pairs:
        if since_us is not None and decision.decided_at.ToMicroseconds() < since_us:
            out.skipped["before_window"] += 1
        elif event.outcome.attempt.attempt_number != 1:
            out.skipped["not_a_first_attempt"] += 1
        else:
            by_event[event.outcome.event_id] = decision
    live = FeatureReplay(lateness_s=float("inf"), max_future_s=float("inf"), stats=ReplayStats())
    for i, (raw, event) in enumerate(zip(log.records, events, strict=True)):
        found = by_event.get(event.outcome.event_id)
        if found is not None:
            _add(out, live, found, event.outcome, costs)
        live.apply(raw)
        if found is not None and event.outcome.status != attempt_pb2.OUTCOME_STATUS_APPROVED:
            _add_retry(out, live, found, event.outcome, costs)
        if progress is not None and (i % 10_000 == 0 or i + 1 == len(events)):
            progress(i + 1, len(events))
    return out


def _candidates(decision: events_pb2.DecisionRecord, costs: dict[str, RouteConfig]) -> list[str] | None:
    """The decision's candidate routes (the configured ones when it named none); None when one of
    them is not configured (its cost unknown)."""
    names = [c.id for c in decision.request.candidates] or list(costs)
    return None if any(n not in costs for n in names) else names


def _add(
    out: LoggedDecisions,
    live: FeatureReplay,
    decision: events_pb2.DecisionRecord,
    o: attempt_pb2.AttemptOutcome,
    costs: dict[str, RouteConfig],
) -> None:
    names = _candidates(decision, costs)
    if names is None:
        out.skipped["unknown_route"] += 1
        return
    if o.route_id not in names:
        out.skipped["route_not_a_candidate"] += 1
        return
    ranked = [r.route_id for r in decision.response.routes]
    props = list(decision.first_position_propensities)
    mu = props[ranked.index(o.route_id)] if o.route_id in ranked and len(props) == len(ranked) else math.nan
    at = o.attempted_at.ToMicroseconds() / 1e6
    amount = o.attempt.amount_minor
    routes = [(n, costs[n].cost_bps) for n in names]
    x = np.frombuffer(encode_candidates(live.store, o.attempt, [], routes, at), dtype=np.float32)
    out.x.append(x.reshape(len(names), len(INPUT_LAYOUT)))
    out.candidates.append(names)
    out.request_ids.append(o.request_id)
    out.cost.append(np.array([amount * costs[n].cost_bps / 10_000 + costs[n].fixed_fee_minor for n in names]))
    out.amount.append(float(amount))
    out.chosen.append(names.index(o.route_id))
    out.propensity.append(mu if mu > 0 else math.nan)
    out.approved.append(1.0 if o.status == attempt_pb2.OUTCOME_STATUS_APPROVED else 0.0)
    out.at.append(at)
    card = o.attempt.card
    out.issuer.append(entity_key(Entity.ISSUER, issuer_country=card.issuer_country, bin_=card.bin))
    out.segments["network"].append(_NETWORKS.get(o.attempt.card.network, "unspecified"))
    out.segments["issuer_country"].append(o.attempt.card.issuer_country)
    out.segments["route"].append(o.route_id)


def _add_retry(
    out: LoggedDecisions,
    live: FeatureReplay,
    decision: events_pb2.DecisionRecord,
    o: attempt_pb2.AttemptOutcome,
    costs: dict[str, RouteConfig],
) -> None:
    names = _candidates(decision, costs)
    if names is None:
        return
    prior = prior_of(o)
    prior.status = o.status
    request = optimizer_pb2.RecommendRequest(
        request_id=o.request_id, attempt=o.attempt, prior_attempts=[prior]
    )
    request.attempt.attempt_number = 2
    candidates = [policy.Candidate(n, costs[n].cost_bps, costs[n].fixed_fee_minor) for n in names]
    now = o.attempted_at.ToMicroseconds() / 1e6 + o.latency_ms / 1000
    feats = lookup_features(live.store, request.attempt, names)
    routes = [(n, costs[n].cost_bps) for n in names]
    x = np.frombuffer(encode_candidates(live.store, request.attempt, [prior], routes, now), dtype=np.float32)
    out.retries.append(LoggedRetry(request, candidates, feats, x.reshape(len(names), len(INPUT_LAYOUT)), now))


@dataclass
class RuleCheck:
    """A model's retry advice on the logged declines, checked against the network rules."""

    declines: int = 0
    retries_advised: int = 0
    violations: int = 0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "declines": self.declines,
            "retries_advised": self.retries_advised,
            "violations": self.violations,
            "examples": self.examples,
        }


def rule_violations(model: LoadedModel, logged: LoggedDecisions) -> RuleCheck:
    """Replay the model's retry advice (the server's own `retry_advice`) on every logged decline and
    judge each advised retry by the network rules at the time it names (`rules.evaluate_retry`)."""
    check = RuleCheck(declines=len(logged.retries))
    buckets = list(model.manifest.delay_buckets_s)
    for r in logged.retries:
        p_retry = model.infer(torch.from_numpy(r.x))[:, 1:].tolist()
        advice = retry_advice(r.request, r.candidates, r.feats, p_retry, buckets, r.now)
        if advice.action == policy.DO_NOT_RETRY:
            continue
        check.retries_advised += 1
        last = r.request.prior_attempts[-1]
        if last.status == attempt_pb2.OUTCOME_STATUS_ERROR:
            continue  # no issuer answer: no decline for the rules to judge
        network, decline, counters = retry_subject(r.request, r.feats)
        judged = rules.evaluate_retry(network, decline, counters, r.now)
        if not judged.allowed or advice.retry_at + 1e-6 < judged.earliest_at:
            check.violations += 1
            if len(check.examples) < 5:
                check.examples.append(f"request {r.request.request_id}: {judged.reason}")
    return check


def predict(model: LoadedModel, logged: LoggedDecisions, *, corrected: bool = True) -> list[_F]:
    """The model's P(approve) of every candidate of every decision: through its selection correction
    and its issuer's offset (`corrected`, as the server ranks), or the calibrated net's own."""
    if not len(logged):
        return []
    sizes = [len(x) for x in logged.x]
    flat = torch.from_numpy(np.concatenate(logged.x))
    p = np.concatenate([model.infer(flat[i : i + 8192])[:, 0].numpy() for i in range(0, len(flat), 8192)])
    out, start = [], 0
    # issuer offsets need each decision's issuer (decisions collected before they were kept: none)
    offsets = model.manifest.route_selection_issuer if corrected and len(logged.issuer) == len(sizes) else {}
    for j, k in enumerate(sizes):
        row = [float(v) for v in p[start : start + k]]
        if corrected and model.selection is not None:
            row = model.selection.apply(row)
        if offsets:
            row = policy.shift_logits(row, offsets.get(logged.issuer[j], 0.0))
        out.append(np.array(row, dtype=np.float64))
        start += k
    return out


def model_policy(model: LoadedModel, logged: LoggedDecisions, exploration: float = 0.0) -> list[_F]:
    """π(·|x) of each decision: the model's value-ranked route first (ties: candidate order),
    with `exploration` spread uniformly over all candidates."""
    policies = []
    for p, amount, cost in zip(predict(model, logged), logged.amount, logged.cost, strict=True):
        k = len(p)
        pi = np.full(k, exploration / k)
        pi[int(np.argmax(amount * p - cost))] += 1.0 - exploration
        policies.append(pi)
    return policies


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # 95 % bootstrap interval
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass
class PolicyValue:
    """A policy's estimated value on the logged traffic, per metric and estimator."""

    estimates: dict[str, dict[str, Estimate]]  # metric -> estimator -> estimate
    ess: float  # effective sample size of the importance weights (nan: no propensities)
    rows: int
    rows_weighted: int  # decisions with a logged propensity
    contributions: dict[str, _F] = field(repr=False, default_factory=dict)  # metric -> per-row DR terms

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_weighted": self.rows_weighted,
            "ess": self.ess,
            **{m: {e: est.as_dict() for e, est in by.items()} for m, by in self.estimates.items()},
        }


def _rewards(logged: LoggedDecisions, p_hat: list[_F]) -> dict[str, tuple[_F, list[_F]]]:
    """Per metric: the logged rewards and the reward model's value of every candidate."""
    approved = np.array(logged.approved)
    chosen_cost = np.array([c[a] for c, a in zip(logged.cost, logged.chosen, strict=True)])
    amount = np.array(logged.amount)
    return {
        "approval": (approved, p_hat),
        "net_revenue": (
            approved * amount - chosen_cost,
            [amt * p - c for amt, p, c in zip(logged.amount, p_hat, logged.cost, strict=True)],
        ),
    }


def _bootstrap(
    terms: dict[str, tuple[_F, _F | None]], n: int, rng: np.random.Generator, resamples: int
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of the mean (or, with weights, the ratio Σ t / Σ w) of each term,
    from `resamples` Poisson-weighted resamples of the rows."""
    samples: dict[str, list[float]] = {k: [] for k in terms}
    for _ in range(resamples):
        counts = rng.poisson(1.0, n).astype(np.float64)
        total = counts.sum()
        for k, (t, w) in terms.items():
            denom = float(counts @ w) if w is not None else float(total)
            samples[k].append(float(counts @ t) / denom if denom > 0 else math.nan)
    return {k: _interval(v) for k, v in samples.items()}


def _interval(samples: list[float]) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the finite samples (nan, nan when there are none)."""
    finite = np.asarray(samples, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return math.nan, math.nan
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def evaluate_policy(
    logged: LoggedDecisions,
    pi: list[_F],
    p_hat: list[_F],
    *,
    resamples: int = 300,
    seed: int = 0,
    rows: npt.NDArray[np.bool_] | None = None,
) -> PolicyValue:
    """DM, IPS, SNIPS and DR of the policy `pi` (π(·|x) per decision) with reward model `p_hat`,
    over the decisions selected by `rows` (all by default)."""
    n_all = len(logged)
    keep = np.ones(n_all, dtype=bool) if rows is None else rows
    idx = np.flatnonzero(keep)
    mu = np.array(logged.propensity)[idx]
    weighted = ~np.isnan(mu)
    chosen = np.array(logged.chosen)[idx]
    pi_chosen = np.array([pi[i][logged.chosen[i]] for i in idx])
    w = np.where(weighted, pi_chosen / np.where(weighted, mu, 1.0), 0.0)
    estimates: dict[str, dict[str, Estimate]] = {}
    contributions: dict[str, _F] = {}
    rng = np.random.default_rng(seed)
    for metric, (reward_all, q_all) in _rewards(logged, p_hat).items():
        r = reward_all[idx]
        dm = np.array([float(pi[i] @ q_all[i]) for i in idx])
        q_logged = np.array([q_all[i][a] for i, a in zip(idx, chosen, strict=True)])
        terms: dict[str, tuple[_F, _F | None]] = {"dm": (dm, None)}
        if weighted.any():
            sel = weighted
            terms["ips"] = (w[sel] * r[sel], None)
            terms["snips"] = (w[sel] * r[sel], w[sel])
            dr = dm[sel] + w[sel] * (r[sel] - q_logged[sel])
            terms["dr"] = (dr, None)
            contributions[metric] = np.where(weighted, dm + w * (r - q_logged), np.nan)
        by: dict[str, Estimate] = {}
        for name, (t, weights) in terms.items():
            low, high = _bootstrap({name: (t, weights)}, len(t), rng, resamples)[name]
            if weights is not None:
                value = float(t.sum() / weights.sum()) if weights.sum() > 0 else math.nan
            else:
                value = float(t.mean()) if len(t) else math.nan
            by[name] = Estimate(value, low, high)
        estimates[metric] = by
    ws = w[weighted]
    ess = float(ws.sum() ** 2 / (ws**2).sum()) if weighted.any() and (ws**2).sum() > 0 else math.nan
    return PolicyValue(estimates, ess, len(idx), int(weighted.sum()), contributions)


class ReplayPolicy(Protocol):
    """A policy that learns from the outcomes of its own choices (for `replay_policy`)."""

    def probabilities(self, logged: LoggedDecisions, i: int) -> Sequence[float]:
        """π(·|x_i) over `logged.candidates[i]`, given the outcomes it has learned so far."""
        ...

    def learn(self, logged: LoggedDecisions, i: int, chosen: int) -> None:
        """Decision i went to candidate `chosen`; its outcome is `logged.approved[i]`."""
        ...


@dataclass(frozen=True)
class ReplayValue:
    """A history-dependent policy's value by rejection-sampling replay (`replay_policy`)."""

    estimates: dict[str, Estimate]  # metric -> the replays' mean, with its 95 % interval
    accepted: float  # decisions accepted per replay (mean)
    replays: int
    bound: float  # M: every decision is accepted with probability 1/M
    rows: int
    over_bound: int  # decisions whose π/μ exceeded M (accepted with probability 1; 0 when μ is right)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "accepted": self.accepted,
            "replays": self.replays,
            "bound": self.bound,
            "over_bound": self.over_bound,
            **{m: {"replay": e.as_dict()} for m, e in self.estimates.items()},
        }


def replay_policy(
    logged: LoggedDecisions,
    make_policy: Callable[[int], ReplayPolicy],
    *,
    replays: int = 20,
    seed: int = 0,
    rows: npt.NDArray[np.bool_] | None = None,
) -> ReplayValue:
    """The value of the policies `make_policy(r)` (a fresh one per replay r, seeded by r) on the
    logged traffic by rejection-sampling replay (see the module docstring), over the decisions
    selected by `rows` (all by default) that carry a propensity. The estimate is the mean of
    `replays` independent replays; its interval is one replay's normal interval (mean ± 1.96 × the
    accepted rewards' standard error), which bounds the mean's spread from above."""
    keep = np.ones(len(logged), dtype=bool) if rows is None else rows
    mu = np.array(logged.propensity)
    idx = np.flatnonzero(keep & ~np.isnan(mu))
    if not len(idx):
        nan = Estimate(math.nan, math.nan, math.nan)
        return ReplayValue({m: nan for m in METRICS}, 0.0, replays, math.nan, 0, 0)
    bound = float(1.0 / mu[idx].min())
    rewards = {m: r for m, (r, _) in _rewards(logged, [np.zeros(len(c)) for c in logged.cost]).items()}
    rng = np.random.default_rng(seed)
    means: dict[str, list[float]] = {m: [] for m in METRICS}
    variances: dict[str, list[float]] = {m: [] for m in METRICS}
    counts: list[int] = []
    over = 0
    for r in range(replays):
        target = make_policy(r)
        draws = rng.random(len(idx))
        taken: list[int] = []
        for i, u in zip(idx, draws, strict=True):
            a = logged.chosen[i]
            ratio = float(target.probabilities(logged, int(i))[a]) / (bound * mu[i])
            if ratio > 1.0 and r == 0:
                over += 1
            if u < ratio:
                target.learn(logged, int(i), a)
                taken.append(int(i))
        counts.append(len(taken))
        for m in METRICS:
            got = rewards[m][taken]
            means[m].append(float(got.mean()) if len(got) else math.nan)
            variances[m].append(float(got.var(ddof=1)) / len(got) if len(got) > 1 else math.nan)
    estimates = {}
    for m in METRICS:
        value, se = float(np.mean(means[m])), math.sqrt(float(np.mean(variances[m])))
        estimates[m] = Estimate(value, value - 1.96 * se, value + 1.96 * se)
    return ReplayValue(estimates, float(np.mean(counts)), replays, bound, len(idx), over)


def logging_value(logged: LoggedDecisions, *, resamples: int = 300, seed: int = 0) -> dict[str, Estimate]:
    """What the logged routing achieved (on-policy: the plain means), with bootstrap intervals."""
    rng = np.random.default_rng(seed)
    out = {}
    for metric, (r, _) in _rewards(logged, [np.zeros(len(c)) for c in logged.cost]).items():
        low, high = _bootstrap({metric: (r, None)}, len(r), rng, resamples)[metric]
        out[metric] = Estimate(float(r.mean()) if len(r) else math.nan, low, high)
    return out


def uplift(
    candidate: PolicyValue, champion: PolicyValue, metric: str, *, resamples: int = 300, seed: int = 0
) -> Estimate:
    """The DR estimate of candidate − champion on `metric`, paired row by row (same rows, same q̂)."""
    a, b = candidate.contributions.get(metric), champion.contributions.get(metric)
    if a is None or b is None:
        return Estimate(math.nan, math.nan, math.nan)
    d = (a - b)[~np.isnan(a - b)]
    low, high = _bootstrap({"d": (d, None)}, len(d), np.random.default_rng(seed), resamples)["d"]
    return Estimate(float(d.mean()) if len(d) else math.nan, low, high)


def calibration(logged: LoggedDecisions, p: list[_F]) -> dict[str, Any]:
    """ECE and reliability bins of the chosen routes' predicted approval against what happened."""
    pc = np.array([row[a] for row, a in zip(p, logged.chosen, strict=True)])
    y = np.array(logged.approved)
    if not len(y):
        return {"ece": math.nan, "reliability": [], "rows": 0}
    return {
        "ece": expected_calibration_error(pc, y),
        "reliability": [list(b) for b in reliability_bins(pc, y)],
        "rows": len(y),
    }
