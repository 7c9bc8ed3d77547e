"""RecommendRequest.retry_window_s: retry advice never proposes a time outside the caller's window."""

from __future__ import annotations

import random
import time

from authopt.v1 import attempt_pb2, optimizer_pb2
from model.features import InMemoryFeatureStore, lookup_features
from model.layout import DELAY_BUCKETS_S
from server import policy
from server.decision import model_scores, respond
from tests.conftest import ROUTES, make_request

NOW = time.time()


def _advice(
    window_s: int, *, code: str = "05", mac: str = "", network: int = 1, p: float = 0.5
) -> optimizer_pb2.RetryAdvice:
    req = make_request()
    req.attempt.card.network = network  # type: ignore[assignment]
    prior = req.prior_attempts.add(route_id="acq-a", response_code=code, mastercard_mac=mac)
    prior.attempted_at.FromNanoseconds(int((NOW - 1) * 1e9))
    req.retry_window_s = window_s
    cands = [policy.Candidate(r, b, f) for r, b, f in ROUTES]
    feats = lookup_features(InMemoryFeatureStore(), req.attempt, [c.route_id for c in cands])
    # Later buckets recover more: without a window the advice waits.
    rows = [[0.5] + [p * (1 + b) / len(DELAY_BUCKETS_S) for b in range(len(DELAY_BUCKETS_S))] for _ in cands]
    scores = model_scores(rows, "1", DELAY_BUCKETS_S)
    return respond(req, cands, feats, scores, NOW, 0.0, random.Random(0)).retry


def test_without_a_window_the_best_later_bucket_wins() -> None:
    advice = _advice(0)
    assert advice.action == optimizer_pb2.RETRY_ACTION_RETRY_AT
    assert advice.retry_at.ToNanoseconds() / 1e9 > NOW + 3600


def test_a_short_window_keeps_the_retry_inside_it() -> None:
    advice = _advice(120)
    assert advice.action == optimizer_pb2.RETRY_ACTION_RETRY_NOW


def test_a_rule_wait_past_the_window_means_no_retry() -> None:
    advice = _advice(120, code="51", mac="25", network=attempt_pb2.CARD_NETWORK_MASTERCARD)
    assert advice.action == optimizer_pb2.RETRY_ACTION_DO_NOT_RETRY
    assert "retry window" in advice.reason and advice.rule_id


def test_a_window_that_fits_the_rule_wait_allows_it() -> None:
    advice = _advice(3 * 86400, code="51", mac="25", network=attempt_pb2.CARD_NETWORK_MASTERCARD)
    assert advice.action == optimizer_pb2.RETRY_ACTION_RETRY_AT
    assert advice.retry_at.ToNanoseconds() / 1e9 <= NOW - 1 + 3 * 86400
