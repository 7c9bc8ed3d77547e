"""The route share floor (`route_share_floor`, `policy.explore_starved`): a route an issuer's traffic
has left is put first for a floor share of that issuer's first attempts, with exact first-position
propensities; nothing changes without one; the server does it over a real channel and says so."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from model.features import InMemoryFeatureStore
from server import policy
from server.decision_log import decision_record
from server.settings import ServerSettings
from streams.contract import Entity, entity_key
from tests.conftest import ROUTES, ServerFactory, make_request

IDS = [r for r, _, _ in ROUTES]


def _ranked() -> list[policy.RankedRoute]:
    return policy.rank_by_value(10_000, [policy.Candidate(r, 100, 0) for r in IDS], [0.9, 0.8, 0.7])


def test_starved_routes_are_those_below_the_floor_share_of_the_issuers_attempts() -> None:
    assert policy.starved_routes(IDS, [80.0, 17.0, 3.0], 0.05) == ["acq-c"]
    assert policy.starved_routes(IDS, [80.0, 17.0, 3.0], 0.2) == ["acq-b", "acq-c"]
    assert policy.starved_routes(IDS, [8.0, 1.0, 0.0], 0.05) == []  # too few attempts to judge
    assert policy.starved_routes(IDS, [80.0, 17.0, 3.0], 0.0) == []  # off


def test_with_nothing_starved_exploration_is_unchanged_draw_for_draw() -> None:
    a, b = random.Random(7), random.Random(7)
    for _ in range(500):
        plain = policy.explore_with_health(_ranked(), 0.2, a, {}, 0.1)
        floored = policy.explore_starved(
            policy.explore_with_health(_ranked(), 0.2, b, {}, 0.1), _ranked(), [], 0.05, b
        )
        assert floored == plain


@pytest.mark.parametrize(
    ("starved", "demoted"), [({"acq-c"}, set()), ({"acq-b", "acq-c"}, set()), ({"acq-c"}, {"acq-b"})]
)
def test_first_position_propensities_are_exact_with_a_floor(starved: set[str], demoted: set[str]) -> None:
    rng, n, floor, epsilon = random.Random(3), 40_000, 0.05, 0.1
    counts: Counter[str] = Counter()
    claimed: dict[str, float] = {}
    for _ in range(n):
        ranked = _ranked()
        inner = policy.explore_with_health(ranked, epsilon, rng, demoted, 0.1)
        chosen = policy.explore_starved(inner, ranked, starved, floor, rng)
        first = chosen.routes[0].route_id
        counts[first] += 1
        assert chosen.propensity == pytest.approx(chosen.first_position[0])
        assert sum(chosen.first_position) == pytest.approx(1.0)
        assert chosen.explored == (first != "acq-a")  # acq-a is the greedy route
        assert sorted(r.route_id for r in chosen.routes) == IDS
        for r, p in zip(chosen.routes, chosen.first_position, strict=True):
            assert claimed.setdefault(r.route_id, p) == pytest.approx(p)
    for route in IDS:
        assert counts[route] / n == pytest.approx(claimed[route], abs=0.01), route
    for route in starved:  # the floor, at least, is what a starved route gets first
        assert claimed[route] >= floor


def test_the_floor_never_moves_more_than_half_the_requests() -> None:
    ranked = _ranked()
    inner = policy.explore_with_health(ranked, 0.0, random.Random(1), {}, 0.0)
    chosen = policy.explore_starved(inner, ranked, {"acq-b", "acq-c"}, 0.25, random.Random(1))
    assert chosen.first_position[[r.route_id for r in chosen.routes].index("acq-a")] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="floor"):
        policy.explore_starved(inner, ranked, {"acq-c"}, 1.5, random.Random(1))


def test_the_setting_is_bounded_and_off_by_default() -> None:
    assert ServerSettings().route_share_floor == 0.0
    with pytest.raises(ValueError, match="route_share_floor"):
        ServerSettings(route_share_floor=0.5)


def _issuer_pairs(features: InMemoryFeatureStore, counts: dict[str, float]) -> None:
    req = make_request()
    card = req.attempt.card
    for route, n in counts.items():
        key = entity_key(Entity.ROUTE_ISSUER, route=route, bin_=card.bin, issuer_country=card.issuer_country)
        features.put(Entity.ROUTE_ISSUER, key, {"attempts_1h": n, "approval_rate_1h": 0.8}, time.time())


async def test_the_server_puts_a_starved_route_first_for_the_floor_share_and_logs_it(
    start_server: ServerFactory,
) -> None:
    srv = await start_server(route_share_floor=0.2)
    # the issuer's traffic went to acq-a and acq-b; acq-c got 2 of its 100 attempts in the last hour
    _issuer_pairs(srv.features, {"acq-a": 60.0, "acq-b": 38.0, "acq-c": 2.0})
    firsts: Counter[str] = Counter()
    n = 400
    for i in range(n):
        req = make_request(f"req-{i}")
        resp = await srv.stub.Recommend(req, timeout=10)
        firsts[resp.routes[0].route_id] += 1
        by_id = {r.route_id: r.first_position_propensity for r in resp.routes}
        assert by_id["acq-c"] == pytest.approx(0.2)  # exploration_rate 0 in tests: the floor alone
        assert by_id["acq-a"] == pytest.approx(0.8)  # the greedy route, by the route features
        assert resp.propensity == pytest.approx(by_id[resp.routes[0].route_id])
        assert resp.explored == (resp.routes[0].route_id == "acq-c")
        record = decision_record(req, resp, time.time(), producer="t", exploration_rate=0.0)
        assert list(record.first_position_propensities) == [r.first_position_propensity for r in resp.routes]
    assert firsts.keys() == {"acq-a", "acq-c"}
    assert firsts["acq-c"] / n == pytest.approx(0.2, abs=0.06)
    # a retry's ranking is left alone: the floor is about which first attempts measure a route
    retry = make_request("req-retry")
    prior = retry.prior_attempts.add(route_id="acq-a", response_code="05")
    prior.attempted_at.FromNanoseconds(int((time.time() - 5) * 1e9))
    for _ in range(50):
        resp = await srv.stub.Recommend(retry, timeout=10)
        assert {r.route_id: r.first_position_propensity for r in resp.routes}["acq-c"] == 0.0
        assert not resp.explored


async def test_without_a_floor_the_server_keeps_the_greedy_route(start_server: ServerFactory) -> None:
    srv = await start_server()
    _issuer_pairs(srv.features, {"acq-a": 60.0, "acq-b": 38.0, "acq-c": 2.0})
    for i in range(100):
        resp = await srv.stub.Recommend(make_request(f"req-{i}"), timeout=10)
        assert resp.routes[0].route_id == "acq-a"
        assert not resp.explored
