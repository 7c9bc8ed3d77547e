"""Issuer health (server/issuer_health.py): nothing moves on calm traffic, an issuer answering 91/96
scales its cards' probabilities to what they approve, it ends with the outage; the server applies it
from reported outcomes to every route of that issuer only; the simulator's authopt, in a world with
an issuer outage, predicts that issuer's approval closer to the truth with it than without."""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from authopt.v1 import attempt_pb2, optimizer_pb2
from model.artifacts import DEFAULT_MODEL_DIR
from server.decision import model_scores
from server.issuer_health import IssuerHealth, IssuerHealthSettings, is_unavailable, issuer_key
from server.models import load_model_dir
from sim import World
from sim.config import Episode, WorldConfig
from sim.play import play
from sim.policies import Authopt
from tests.conftest import Recording, ServerFactory, make_request, small_default_world

T0 = 1_800_000_000.0
DE = issuer_key("DE", "41111111")


def _calm(health: IssuerHealth, key: str, start: float, minutes: int, *, expected: float = 0.8) -> float:
    """Ordinary traffic for `key`: one first attempt every 10 s, approved as expected, no 91/96."""
    rng = random.Random(hash(key) & 0xFFFF)
    t = start
    while t < start + 60 * minutes:
        ok = rng.random() < expected
        health.observe(key, t, ok, False, expected)
        t += 10
    return t


def test_the_unavailable_codes_are_the_contracts() -> None:
    assert [is_unavailable(c) for c in ("91", "96", "19", "05", "51", "")] == [True] * 3 + [False] * 3
    assert issuer_key("DE", "41111111") == "DE|411111"


def test_calm_traffic_gets_exactly_one_however_noisy() -> None:
    """Approvals far from expectation without 91/96 (a model that misjudges a quiet issuer) move
    nothing: that is the selection correction's, not an outage."""
    health = IssuerHealth()
    rng = random.Random(3)
    for k in range(600):
        health.observe(DE, T0 + 5 * k, rng.random() < 0.3, False, 0.9)
        assert health.factor(DE, T0 + 5 * k) == 1.0
    assert health.factor("FR|497010", T0) == 1.0  # an issuer never seen


def test_an_outage_scales_to_what_the_issuer_approves_and_ends_with_it() -> None:
    health = IssuerHealth()
    t = _calm(health, DE, T0, 30)
    rng = random.Random(4)
    factors = []
    for k in range(90):  # 15 minutes, one attempt every 10 s: 90 % unavailable, the rest approve 60 %
        at = t + 10 * k
        down = rng.random() < 0.9
        health.observe(DE, at, not down and rng.random() < 0.6, down, 0.8)
        factors.append(health.factor(DE, at))
    assert factors[0] == 1.0  # one 91 is not an outage
    assert all(f < 1.0 for f in factors[6:])  # down within a minute
    # by its end the window is all outage: the factor is near the issuer's observed / expected
    # (about 0.06 / 0.8), and far below the 1.0 the model's hour-long features would leave
    assert 0.02 <= statistics.fmean(factors[-30:]) < 0.2
    assert health.factor("FR|497010", t + 900) == 1.0  # another issuer: untouched
    end = t + 900
    after = _calm(health, DE, end, 10)
    assert health.factor(DE, after) == 1.0
    late = [health.factor(DE, end + 60 * m) for m in range(5, 10)]
    assert late == [1.0] * 5  # a few minutes after the outage: as the model says


def test_a_few_unavailable_answers_or_no_expectations_move_nothing() -> None:
    health = IssuerHealth()
    t = _calm(health, DE, T0, 30)
    for k in range(2):  # two 91s: below min_unavailable
        health.observe(DE, t + k, False, True, 0.8)
    assert health.factor(DE, t + 2) == 1.0
    blind = IssuerHealth()
    for k in range(60):  # an outage whose decisions this replica did not make: nothing to scale by
        blind.observe(DE, T0 + 5 * k, False, True, None)
    assert blind.factor(DE, T0 + 300) == 1.0


def test_memory_is_bounded_and_bad_settings_are_refused() -> None:
    health = IssuerHealth(IssuerHealthSettings(max_keys=3))
    for i in range(10):
        health.observe(f"DE|41111{i}", T0 + i, True, False, 0.8)
    assert len(health) == 3
    for bad in ({"half_life_s": 0}, {"min_share": 0}, {"min_unavailable": 0}, {"prior": -1}, {"floor": 0}):
        with pytest.raises(ValueError):
            IssuerHealthSettings(**bad)  # type: ignore[arg-type]


def test_the_factor_scales_every_route_alike_and_keeps_their_order() -> None:
    rows = [[0.9, 0.5], [0.6, 0.4], [0.75, 0.3]]
    plain = model_scores(rows, "v", [60])
    scaled = model_scores(rows, "v", [60], None, 0.0, 0.25)
    assert scaled.p_approve == pytest.approx([0.225, 0.15, 0.1875])
    assert scaled.issuer_factor == 0.25 and plain.issuer_factor == 1.0
    assert scaled.p_retry == plain.p_retry  # a later retry's chances are the model's


def _outcome(
    i: int, route: str, at: float, *, unavailable: bool, card: attempt_pb2.Card
) -> attempt_pb2.AttemptOutcome:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    attempt = make_request().attempt
    attempt.card.CopyFrom(card)
    return attempt_pb2.AttemptOutcome(
        event_id=f"ev-{i}",
        request_id=f"req-{i}",
        attempt=attempt,
        route_id=route,
        status=attempt_pb2.OUTCOME_STATUS_DECLINED if unavailable else attempt_pb2.OUTCOME_STATUS_APPROVED,
        response_code="91" if unavailable else "",
        latency_ms=200,
        attempted_at=ts,
    )


async def test_the_server_scales_an_issuer_that_answers_91_and_no_other(
    start_server: ServerFactory, model_dir: Path
) -> None:
    """The replica decides 40 first attempts for a German Visa BIN; their outcomes come back 91
    (the issuer is down): its next decision for that BIN scales every route's probability by one
    factor below 1, in the same order; a French BIN's decision is as before; with issuer health off
    nothing moves."""
    fr_card = attempt_pb2.Card()
    fr_card.CopyFrom(make_request().attempt.card)
    fr_card.bin, fr_card.issuer_country = "49701012", "FR"
    seen: dict[bool, dict[str, list[float]]] = {}
    for on in (False, True):
        srv = await start_server(model_dir=model_dir, publisher=Recording(), issuer_health=on)
        before = await srv.stub.Recommend(make_request("before"), timeout=5)
        assert before.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL
        other_before = await srv.stub.Recommend(make_request("other-0", card=fr_card), timeout=5)
        now = time.time()
        decided = []
        for i in range(40):
            resp = await srv.stub.Recommend(make_request(f"req-{i}"), timeout=5)
            decided.append(
                _outcome(
                    i,
                    resp.routes[0].route_id,
                    now - 60 + i,
                    unavailable=i % 10 != 0,
                    card=make_request().attempt.card,
                )
            )
        await srv.stub.ReportOutcomes(optimizer_pb2.ReportOutcomesRequest(outcomes=decided), timeout=10)
        after = await srv.stub.Recommend(make_request("after"), timeout=5)
        other = await srv.stub.Recommend(make_request("other", card=fr_card), timeout=5)
        assert [r.route_id for r in after.routes] == [r.route_id for r in before.routes]
        seen[on] = {
            "before": [r.approval_probability for r in before.routes],
            "after": [r.approval_probability for r in after.routes],
            "other": [r.approval_probability for r in other.routes],
            "other_before": [r.approval_probability for r in other_before.routes],
        }
    off, on_ = seen[False], seen[True]
    assert off["after"] == pytest.approx(off["before"])
    ratios = [a / b for a, b in zip(on_["after"], on_["before"], strict=True)]
    assert all(r == pytest.approx(ratios[0], rel=1e-5) for r in ratios)  # one factor for every route
    assert 0.02 <= ratios[0] < 0.5  # 4 approvals of 40 expected at the model's probability
    assert on_["other"] == pytest.approx(on_["other_before"])  # another issuer: untouched


def _world_with_issuer_outage() -> tuple[WorldConfig, int]:
    """The default world, small (45 minutes), without random issuer outages; one 25-minute outage
    (severity 0.9) of its busiest issuer at 15 minutes."""
    config = small_default_world(2000, 0.75, 2000)
    world = World(config, 1)
    busiest = Counter(int(world.card_issuer[p.card]) for p in world.payments()).most_common(1)[0][0]
    episode = Episode(start_hour=15 / 60, minutes=25, severity=0.9)
    issuers = [
        i.model_copy(update={"outages": [episode]}) if k == busiest else i
        for k, i in enumerate(config.issuers)
    ]
    return config.model_copy(update={"issuers": issuers}), busiest


@pytest.mark.timeout(300)
def test_in_an_issuer_outage_the_simulated_server_predicts_closer_to_the_truth() -> None:
    """The bundled model played over an issuer's outage: with issuer health its chosen route's
    probability for that issuer's payments in the outage is far closer to the world's own (about 0.08)
    than without (the model's hour-long features leave it several times too high), and the payments
    outside the outage are predicted as before."""
    config, busiest = _world_with_issuer_outage()
    world = World(config, 1)
    payments = world.payments()
    model = load_model_dir(DEFAULT_MODEL_DIR)
    start = world.t0
    inside = [
        k
        for k, p in enumerate(payments)
        if int(world.card_issuer[p.card]) == busiest and start + 1200 <= p.at < start + 2400
    ]
    elsewhere = [k for k, p in enumerate(payments) if int(world.card_issuer[p.card]) != busiest]
    gap, calm = {}, {}
    for on in (False, True):
        result = play(
            world,
            Authopt(model, seed=1, issuer_health=IssuerHealthSettings() if on else None),
            payments=payments,
        )
        rows = [
            (result.first_p_model[k], result.first_p_true[k]) for k in inside if result.first_p_model[k] >= 0
        ]
        assert len(rows) > 100
        gap[on] = statistics.fmean(pm - pt for pm, pt in rows)
        calm[on] = [result.first_p_model[k] for k in elsewhere]
    print(f"mean predicted - true in the outage: without {gap[False]:.3f}, with {gap[True]:.3f}")
    assert gap[False] > 0.15  # the model alone: far too hopeful
    assert gap[True] < min(gap[False] / 2, 0.1)
    # the rest only through what the outage issuer's routing changed in the shared route features
    assert abs(statistics.fmean(calm[True]) - statistics.fmean(calm[False])) < 0.005
