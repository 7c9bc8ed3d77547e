"""Decision policy: value ranking, exploration propensities, retry valuation, fallback scores."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from server import policy
from server.policy import Candidate, RankedRoute, advise_retry, explore, rank_by_value
from server.rules import RetryConstraint

NOW = 1_800_000_000.0
HOUR = 3_600
DAY = 86_400
BUCKETS = policy.DELAY_BUCKETS_S

A = Candidate("a", cost_bps=100, fixed_fee_minor=10)  # 1% + 10
B = Candidate("b", cost_bps=0, fixed_fee_minor=0)
C = Candidate("c", cost_bps=50, fixed_fee_minor=0)

FREE = RetryConstraint(allowed=True, earliest_at=NOW, rule_id="", reason="ok")


def test_route_cost() -> None:
    assert policy.route_cost_minor(10_000, 100, 10) == pytest.approx(110.0)
    assert policy.route_cost_minor(0, 100, 10) == pytest.approx(10.0)
    assert policy.route_cost_minor(12_345, 0, 0) == 0.0


def test_rank_by_value_math_and_order() -> None:
    ranked = rank_by_value(10_000, [A, B, C], [0.95, 0.90, 0.93])
    by_id = {r.route_id: r for r in ranked}
    assert by_id["a"].cost_minor == pytest.approx(110.0)
    assert by_id["a"].expected_value_minor == pytest.approx(9_500 - 110)  # 9390
    assert by_id["b"].expected_value_minor == pytest.approx(9_000)
    assert by_id["c"].expected_value_minor == pytest.approx(9_300 - 50)  # 9250
    assert [r.route_id for r in ranked] == ["a", "c", "b"]


def test_rank_ties_higher_p_then_route_id() -> None:
    # x: 100*0.5 - 0 = 50 ; y: 100*0.6 - 10 = 50 -> same value, higher p wins
    x = Candidate("x", 0, 0)
    y = Candidate("y", 0, 10)
    assert [r.route_id for r in rank_by_value(100, [x, y], [0.5, 0.6])] == ["y", "x"]
    z = Candidate("z", 0, 0)
    assert [r.route_id for r in rank_by_value(100, [z, x], [0.5, 0.5])] == ["x", "z"]


def test_rank_validates() -> None:
    with pytest.raises(ValueError, match="candidates"):
        rank_by_value(100, [A, B], [0.5])
    with pytest.raises(ValueError, match="probability"):
        rank_by_value(100, [A], [1.5])
    with pytest.raises(ValueError, match="probability"):
        rank_by_value(100, [A], [math.nan])


def _ranked(k: int) -> list[RankedRoute]:
    return [RankedRoute(f"r{i}", 0.9 - i * 0.01, 100.0 - i, 1.0) for i in range(k)]


@pytest.mark.parametrize(("k", "eps"), [(2, 0.1), (4, 0.2), (5, 1.0)])
def test_explore_propensities_match_frequencies(k: int, eps: float) -> None:
    ranked = _ranked(k)
    rng = random.Random(1234)
    draws = 20_000
    counts: Counter[str] = Counter()
    propensity: dict[str, float] = {}
    for _ in range(draws):
        e = explore(ranked, eps, rng)
        top = e.routes[0].route_id
        counts[top] += 1
        assert propensity.setdefault(top, e.propensity) == e.propensity
        assert e.explored is (top != "r0")
        # the chosen route moved to the front; the others keep their order
        assert [r.route_id for r in e.routes[1:]] == [r.route_id for r in ranked if r.route_id != top]
    assert propensity["r0"] == pytest.approx((1 - eps) + eps / k)
    for i in range(1, k):
        assert propensity[f"r{i}"] == pytest.approx(eps / k)
    for route_id, p in propensity.items():
        sd = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[route_id] / draws - p) < max(5 * sd, 1e-9), route_id
    assert sum(propensity.values()) == pytest.approx(1.0)


def test_explore_eps_zero_never_explores() -> None:
    ranked = _ranked(3)
    rng = random.Random(7)
    for _ in range(2_000):
        e = explore(ranked, 0.0, rng)
        assert not e.explored and e.propensity == 1.0 and e.routes == ranked


def test_explore_single_route() -> None:
    e = explore(_ranked(1), 0.5, random.Random(0))
    assert e.propensity == 1.0 and not e.explored and len(e.routes) == 1


def test_explore_validates() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        explore(_ranked(2), 1.5, random.Random(0))
    with pytest.raises(ValueError, match="empty"):
        explore([], 0.1, random.Random(0))


def test_explore_does_not_mutate_input() -> None:
    ranked = _ranked(3)
    before = list(ranked)
    rng = random.Random(3)
    for _ in range(200):
        explore(ranked, 1.0, rng)
    assert ranked == before


def test_advise_retry_never() -> None:
    never = RetryConstraint(False, NOW, "visa.cat1.never", "Visa category 1: never retry")
    d = advise_retry(10_000, [A, B], [[0.9] * len(BUCKETS)] * 2, BUCKETS, never, NOW)
    assert d.action == "do_not_retry"
    assert d.rule_id == "visa.cat1.never" and d.reason == never.reason
    assert d.p_recover == 0.0 and d.route_id == ""


def test_advise_retry_picks_max_value_bucket_and_route() -> None:
    buckets = [0, HOUR, DAY]
    # a: cost 110 -> best 3000 - 110 = 2890 at 1d; b: cost 0 -> best 2900 at 1h
    p = [[0.10, 0.20, 0.30], [0.05, 0.29, 0.25]]
    d = advise_retry(10_000, [A, B], p, buckets, FREE, NOW)
    assert d.action == "retry_at" and d.route_id == "b"
    assert d.retry_at == NOW + HOUR
    assert d.p_recover == pytest.approx(0.29)
    assert d.expected_value_minor == pytest.approx(2_900)
    assert "b" in d.reason and "1h" in d.reason


def test_advise_retry_now() -> None:
    d = advise_retry(10_000, [B], [[0.5, 0.4]], [0, HOUR], FREE, NOW)
    assert d.action == "retry_now" and d.retry_at == NOW and d.route_id == "b"


def test_advise_retry_tie_sooner_wins() -> None:
    d = advise_retry(10_000, [B], [[0.5, 0.5, 0.5]], [0, HOUR, DAY], FREE, NOW)
    assert d.action == "retry_now"


def test_advise_retry_respects_earliest_at() -> None:
    wait = RetryConstraint(True, NOW + DAY, "mc.mac25.wait_24h", "not before 24h")
    p = [[0.9, 0.8, 0.2, 0.3]]
    d = advise_retry(10_000, [B], p, [0, HOUR, DAY, 2 * DAY], wait, NOW)
    assert d.action == "retry_at"
    assert d.retry_at == NOW + 2 * DAY  # the 0 / 1h buckets are not eligible
    assert d.p_recover == pytest.approx(0.3)
    assert d.rule_id == "mc.mac25.wait_24h"


def test_advise_retry_earliest_after_all_buckets_uses_last_bucket() -> None:
    earliest = NOW + 10 * DAY + 123.5
    wait = RetryConstraint(True, earliest, "mc.mac30.wait_10d", "not before 10d")
    p = [[0.1] * (len(BUCKETS) - 1) + [0.4]]
    d = advise_retry(10_000, [B], p, BUCKETS, wait, NOW)
    assert d.action == "retry_at"
    assert d.retry_at == earliest
    assert d.p_recover == pytest.approx(0.4)
    opts = policy.retry_options(10_000, [B], p, BUCKETS, wait, NOW)
    assert len(opts) == 1 and opts[0].delay_s == 10 * DAY + 123


def test_advise_retry_declines_when_value_below_cost() -> None:
    expensive = Candidate("x", cost_bps=0, fixed_fee_minor=500)
    d = advise_retry(1_000, [expensive], [[0.3, 0.4]], [0, HOUR], FREE, NOW)  # 400 - 500 < 0
    assert d.action == "do_not_retry"
    assert d.reason == "expected recovery value below cost"
    d2 = advise_retry(1_000, [B], [[0.3, 0.4]], [0, HOUR], FREE, NOW, min_value_minor=400.0)
    assert d2.action == "do_not_retry"  # value == threshold is not enough
    d3 = advise_retry(1_000, [B], [[0.3, 0.4]], [0, HOUR], FREE, NOW, min_value_minor=399.0)
    assert d3.action == "retry_at"


def test_advise_retry_no_candidates() -> None:
    d = advise_retry(1_000, [], [], BUCKETS, FREE, NOW)
    assert d.action == "do_not_retry"


def test_advise_retry_validates_shapes() -> None:
    with pytest.raises(ValueError, match="rows"):
        advise_retry(1_000, [A, B], [[0.1, 0.2]], [0, HOUR], FREE, NOW)
    with pytest.raises(ValueError, match="buckets"):
        advise_retry(1_000, [A], [[0.1]], [0, HOUR], FREE, NOW)
    with pytest.raises(ValueError, match="increasing"):
        advise_retry(1_000, [A], [[0.1, 0.2]], [HOUR, 0], FREE, NOW)


def test_success_rate_scores_smoothing() -> None:
    scores = policy.success_rate_scores([A, B, C], [(0.5, 20.0), (1.0, 0.0), (0.9, 1_000_000.0)])
    assert scores[0] == pytest.approx((0.5 * 20 + 0.8 * 20) / 40)  # 0.65
    assert scores[1] == pytest.approx(0.8)  # no attempts -> prior
    assert scores[2] == pytest.approx(0.9, abs=1e-4)  # lots of data -> observed rate


def test_success_rate_scores_unknown_routes_keep_order() -> None:
    cands = [Candidate(f"r{i}", 0, 0) for i in range(4)]
    scores = policy.success_rate_scores(cands, [None, None, (0.95, 100.0), None])
    assert scores[0] > scores[1] > scores[3]
    assert scores[0] == pytest.approx(0.8, abs=1e-5)
    ranked = rank_by_value(1_000, cands, scores)
    assert [r.route_id for r in ranked] == ["r2", "r0", "r1", "r3"]


def test_success_rate_scores_validates() -> None:
    with pytest.raises(ValueError, match="rates"):
        policy.success_rate_scores([A], [])


@pytest.mark.parametrize("code", ["", "05", "51", "91", "96", "54", "14", "N7", "R0", "04"])
@pytest.mark.parametrize("last", [None, 0, 2])
def test_heuristic_probabilities_in_range(code: str, last: int | None) -> None:
    p = policy.heuristic_retry_probabilities(code, 3, last, BUCKETS)
    assert len(p) == 3 and all(len(row) == len(BUCKETS) for row in p)
    assert all(0.0 <= x <= 1.0 for row in p for x in row)


@pytest.mark.parametrize(
    "code", ["03", "04", "07", "12", "15", "41", "43", "46", "57", "62", "78", "93", "R0", "R1", "R3"]
)
def test_heuristic_hard_codes_zero(code: str) -> None:
    p = policy.heuristic_retry_probabilities(code, 2, 0, BUCKETS)
    assert all(x == 0.0 for row in p for x in row)


def test_heuristic_shapes_by_cause() -> None:
    unavailable = policy.heuristic_retry_probabilities("91", 2, 0, BUCKETS)
    assert unavailable[1][0] > unavailable[0][0]  # another route beats the one that failed
    assert unavailable[0][1] > unavailable[0][0]  # the failed route recovers
    funds = policy.heuristic_retry_probabilities("51", 1, None, BUCKETS)[0]
    assert funds[0] < 0.1 and funds == sorted(funds) and funds[-1] > 3 * funds[0]
    dnh = policy.heuristic_retry_probabilities("05", 1, None, BUCKETS)[0]
    assert 0.0 < dnh[0] < 0.5


def test_heuristic_validates() -> None:
    with pytest.raises(ValueError, match="last_route_index"):
        policy.heuristic_retry_probabilities("05", 2, 2, BUCKETS)


def test_advise_retry_discounts_waiting() -> None:
    from server.policy import Candidate, advise_retry
    from server.rules import RetryConstraint

    cands = [Candidate("r1", 0, 0)]
    free = RetryConstraint(allowed=True, earliest_at=1000.0, rule_id="", reason="")
    buckets = [0, 86_400, 10 * 86_400]
    # 10 days later recovers only a little more: not worth the wait at 2 % per day.
    slightly = advise_retry(10_000, cands, [[0.30, 0.303, 0.33]], buckets, free, 1000.0)
    assert slightly.action == "retry_now" and slightly.p_recover == 0.30
    # After payday the recovery is far higher: worth waiting a day.
    much = advise_retry(10_000, cands, [[0.05, 0.40, 0.41]], buckets, free, 1000.0)
    assert much.action == "retry_at" and much.retry_at == 1000.0 + 86_400
    # Without a discount the highest value wins however late.
    flat = advise_retry(10_000, cands, [[0.30, 0.303, 0.33]], buckets, free, 1000.0, daily_discount=0.0)
    assert flat.retry_at == 1000.0 + 10 * 86_400
