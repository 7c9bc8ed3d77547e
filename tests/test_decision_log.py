"""The decision log: every new decision on authopt.decisions.v1, off the critical path, joined to its
outcome by request id; drops counted, never waited on."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer
from google.protobuf import timestamp_pb2

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from server import policy
from server.decision_log import decision_record
from streams.broker import LocalBroker, free_port, start_broker
from streams.decisions import join_decisions
from streams.kafka import ATTEMPTS_TOPIC, DECISIONS_TOPIC, KafkaSettings
from tests.conftest import ServerFactory, make_request


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


def _ts(at: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    return ts


def _outcome(event_id: str, request_id: str, *, received_at: float | None = None) -> events_pb2.AttemptEvent:
    outcome = attempt_pb2.AttemptOutcome(
        event_id=event_id,
        request_id=request_id,
        attempt=make_request().attempt,
        route_id="acq-a",
        status=attempt_pb2.OUTCOME_STATUS_APPROVED,
        attempted_at=_ts(time.time() - 1),
    )
    return events_pb2.AttemptEvent(outcome=outcome, received_at=_ts(received_at or time.time()))


# --- propensities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("epsilon", [0.0, 0.02, 0.5, 1.0])
def test_first_position_propensities_match_what_explore_does(k: int, epsilon: float) -> None:
    ranked = [policy.RankedRoute(f"r{i}", 0.9 - i / 10, 100.0 - i, 1.0) for i in range(k)]
    rng = random.Random(3)
    firsts: dict[str, int] = {}
    n = 20_000
    for _ in range(n):
        chosen = policy.explore(ranked, epsilon, rng)
        probs = policy.first_position_propensities(k, epsilon, chosen.explored)
        assert probs[0] == chosen.propensity
        assert sum(probs) == pytest.approx(1.0)
        # Every route's propensity, in the served order, is the same whatever was drawn.
        by_route = dict(zip((r.route_id for r in chosen.routes), probs, strict=True))
        assert by_route["r0"] == pytest.approx((1 - epsilon) + epsilon / k if k > 1 else 1.0)
        firsts[chosen.routes[0].route_id] = firsts.get(chosen.routes[0].route_id, 0) + 1
    # ...and they are the frequencies with which explore puts each route first.
    for route, count in firsts.items():
        expected = ((1 - epsilon) + epsilon / k) if route == "r0" or k == 1 else epsilon / k
        assert count / n == pytest.approx(expected, abs=0.015)


def test_decision_record_carries_request_response_and_propensities() -> None:
    req = make_request("req-9")
    resp = optimizer_pb2.RecommendResponse(
        request_id="req-9",
        routes=[optimizer_pb2.RankedRoute(route_id=r) for r in ("acq-b", "acq-a", "acq-c")],
        explored=True,
        propensity=0.1 / 3,
        decision_source=optimizer_pb2.DECISION_SOURCE_MODEL,
    )
    rec = decision_record(req, resp, 1_750_000_000.25, producer="replica-1", exploration_rate=0.1)
    assert rec.request == req and rec.response == resp and rec.producer == "replica-1"
    assert rec.decided_at.seconds == 1_750_000_000 and rec.decided_at.nanos == 250_000_000
    assert list(rec.first_position_propensities) == pytest.approx([0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3])
    assert rec.first_position_propensities[0] == pytest.approx(resp.propensity)


# --- the join ---------------------------------------------------------------------------------------


def test_join_counts_missing_late_orphan_and_repeated_records() -> None:
    now = time.time()
    decisions = [
        decision_record(
            make_request(f"r{i}"),
            optimizer_pb2.RecommendResponse(request_id=f"r{i}"),
            now,
            producer="p",
            exploration_rate=0.0,
        )
        for i in range(5)
    ]
    decisions.append(decisions[0])  # delivered twice
    outcomes = [
        _outcome("e0", "r0"),
        _outcome("e0", "r0"),  # the same event again
        _outcome("e1", "r1", received_at=now + 7200),  # two hours later
        _outcome("e2", "r2"),
        _outcome("e2b", "r2"),  # a second report against one decision
        _outcome("e9", "r-unknown"),
        _outcome("e10", ""),
    ]
    joined = join_decisions(decisions, outcomes, late_after_s=3600)
    assert [(d.request.request_id, o.outcome.event_id) for d, o in joined.pairs] == [
        ("r0", "e0"),
        ("r1", "e1"),
        ("r2", "e2"),
    ]
    assert [d.request.request_id for d in joined.unanswered] == ["r3", "r4"]
    assert joined.decisions == 5
    assert (joined.late, joined.orphan_outcomes, joined.duplicate_decisions, joined.duplicate_outcomes) == (
        1,
        2,
        1,
        2,
    )


# --- through a real server and broker -----------------------------------------------------------------


async def _read(bootstrap: str, topic: str, n: int, timeout_s: float = 20) -> list[tuple[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    out.extend((r.key, r.value) for r in records)
        # Nothing more is coming: a replayed decision must not have been logged twice.
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            out.extend((r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    return out


async def test_every_new_decision_is_logged_and_joins_its_outcome(
    start_server: ServerFactory, broker: LocalBroker
) -> None:
    srv = await start_server(kafka=KafkaSettings.for_bootstrap(broker.bootstrap), exploration_rate=0.3)
    responses = {}
    for i in range(12):
        responses[f"req-{i}"] = await srv.stub.Recommend(make_request(f"req-{i}"), timeout=10)
    replay = await srv.stub.Recommend(make_request("req-0"), timeout=10)  # idempotent: no new decision
    assert replay == responses["req-0"]
    reported = [
        optimizer_pb2.ReportOutcomesRequest(
            outcomes=[
                attempt_pb2.AttemptOutcome(
                    event_id=f"ev-{i}",
                    request_id=f"req-{i}",
                    attempt=make_request().attempt,
                    route_id=responses[f"req-{i}"].routes[0].route_id,
                    status=attempt_pb2.OUTCOME_STATUS_APPROVED,
                    attempted_at=_ts(time.time() - 1),
                )
                for i in range(8)
            ]
        )
    ]
    for batch in reported:
        assert (await srv.stub.ReportOutcomes(batch, timeout=15)).accepted == 8

    raw = await _read(broker.bootstrap, DECISIONS_TOPIC, 12)
    assert len(raw) == 12
    assert {key for key, _ in raw} == {b"fp-abc"}  # keyed by card fingerprint, as the attempts
    records = [events_pb2.DecisionRecord.FromString(value) for _, value in raw]
    for rec in records:
        resp = responses[rec.request.request_id]
        assert rec.response == resp and rec.request == make_request(rec.request.request_id)
        assert rec.exploration_rate == pytest.approx(0.3) and rec.producer == "authopt-server"
        assert len(rec.first_position_propensities) == len(resp.routes)
        assert sum(rec.first_position_propensities) == pytest.approx(1.0)
        assert rec.first_position_propensities[0] == pytest.approx(resp.propensity)
    events = [
        events_pb2.AttemptEvent.FromString(v) for _, v in await _read(broker.bootstrap, ATTEMPTS_TOPIC, 8)
    ]
    joined = join_decisions(records, events)
    assert sorted(d.request.request_id for d, _ in joined.pairs) == sorted(f"req-{i}" for i in range(8))
    assert sorted(d.request.request_id for d in joined.unanswered) == sorted(f"req-{i}" for i in range(8, 12))
    assert joined.orphan_outcomes == joined.duplicate_decisions == joined.late == 0
    log = srv.server.decision_log
    assert log.counts.published == 12 and not log.counts.dropped  # type: ignore[attr-defined]


async def test_no_decision_waits_on_an_absent_broker_and_drops_are_counted(
    start_server: ServerFactory,
) -> None:
    """Kafka unreachable: decisions answer as fast as without a log; what cannot be logged is
    counted by reason (the full queue, the broker), never blocked on."""
    dead = KafkaSettings.for_bootstrap(f"127.0.0.1:{free_port()}")
    srv = await start_server(
        kafka=dead, decision_log_queue_size=3, feature_replica=False, kafka_publish_timeout_s=1.0
    )
    took = []
    for i in range(40):
        t0 = time.perf_counter()
        resp = await srv.stub.Recommend(make_request(f"req-{i}"), timeout=5)
        took.append(time.perf_counter() - t0)
        assert resp.routes
    took.sort()
    assert took[len(took) // 2] < 0.05 and took[-1] < 1.0, took
    counts = srv.server.decision_log.counts  # type: ignore[attr-defined]
    assert counts.published == 0
    assert counts.dropped.get("queue_full", 0) >= 40 - 3 - 3  # at most a queue and a batch in flight
    await srv.server.stop(grace=0.5)
    assert sum(counts.dropped.values()) == 40  # the rest at shutdown (or by the broker): all counted
    metric = srv.server.metrics.decision_log_dropped
    assert sum(metric.labels(r)._value.get() for r in counts.dropped) == 40
