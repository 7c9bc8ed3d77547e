"""The server over a real channel on port 0: decisions, fallbacks, reload, streaming, idempotency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.v1 import attempt_pb2, optimizer_pb2
from model import make_tiny_artifact
from server.errors import error_info, retry_after_s
from streams.contract import Entity
from tests.conftest import ROUTES, Running, ServerFactory, make_request

# Every test twice: card state in the server's memory, and in a real redis-server (issue 21).
pytestmark = pytest.mark.both_stores

Source = optimizer_pb2.DecisionSource


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(resp.status)


async def test_model_decision_is_ranked_by_expected_value(
    start_server: ServerFactory, model_dir: Path
) -> None:
    srv = await start_server(model_dir=model_dir)
    resp = await srv.stub.Recommend(make_request(), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_MODEL
    assert resp.model_version == "1"
    assert [r.route_id for r in resp.routes] and {r.route_id for r in resp.routes} == {r[0] for r in ROUTES}
    values = [r.expected_value_minor for r in resp.routes]
    assert values == sorted(values, reverse=True)
    costs = {r: 12_500 * bps / 10_000 + fixed for r, bps, fixed in ROUTES}
    for r in resp.routes:
        assert 0.0 <= r.approval_probability <= 1.0
        assert r.cost_minor == pytest.approx(costs[r.route_id])
        assert r.expected_value_minor == pytest.approx(12_500 * r.approval_probability - r.cost_minor)
    assert not resp.explored and resp.propensity == 1.0
    assert 0 <= resp.feature_age_ms < 60_000
    assert resp.rules_version and resp.server_time_us > 0
    assert not resp.HasField("retry")
    assert await _health(srv.channel, "authopt.v1.AuthorizationOptimizerService") == 1


async def test_configured_routes_are_used_when_request_names_none(start_server: ServerFactory) -> None:
    routes = [{"id": "cfg-1", "cost_bps": 100}, {"id": "cfg-2", "cost_bps": 100}]
    srv = await start_server(routes=routes, features=False)
    req = make_request()
    del req.candidates[:]
    resp = await srv.stub.Recommend(req, timeout=5)
    assert {r.route_id for r in resp.routes} == {"cfg-1", "cfg-2"}
    # No model, no features, equal costs: the configured order decides among unknown routes.
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_NO_MODEL
    assert resp.routes[0].route_id == "cfg-1"


async def test_no_model_falls_back_and_health_stays_serving(start_server: ServerFactory) -> None:
    srv = await start_server()
    resp = await srv.stub.Recommend(make_request(), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_NO_MODEL
    assert resp.model_version == ""
    # Success-rate routing: acq-a has the best 1 h approval rate in the fixture's features.
    assert resp.routes[0].route_id == "acq-a"
    assert await _health(srv.channel) == health_pb2.HealthCheckResponse.SERVING


async def test_mismatched_model_is_refused_and_fallback_serves(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "models"
    make_tiny_artifact(d, "1", contract_hash="sha256:not-our-contract")
    srv = await start_server(model_dir=d)
    assert "refused" in caplog.text and "sha256:not-our-contract" in caplog.text
    resp = await srv.stub.Recommend(make_request(), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_NO_MODEL
    assert await _health(srv.channel) == health_pb2.HealthCheckResponse.SERVING


async def test_missing_route_features_fall_back(start_server: ServerFactory, model_dir: Path) -> None:
    srv = await start_server(model_dir=model_dir, features=False)
    resp = await srv.stub.Recommend(make_request(), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_FEATURES
    assert resp.feature_age_ms == -1 and resp.route_feature_age_ms == -1
    assert resp.model_version == "1"


async def test_queue_wait_is_measured_per_request(start_server: ServerFactory, model_dir: Path) -> None:
    """`authopt_queue_wait_seconds`: each model decision's wait for its forward, a 20 ms batching
    delay included (the overload dashboards' first signal)."""
    srv = await start_server(model_dir=model_dir, batch_max_queue_delay_us=20_000)
    reqs = [make_request(f"q-{i}") for i in range(3)]
    for r in reqs:
        r.latency_budget_ms = 5000  # the 20 ms delay leaves little of the default 50 ms on a busy machine
    resps = await asyncio.gather(*(srv.stub.Recommend(r, timeout=5) for r in reqs))
    assert all(r.decision_source == Source.DECISION_SOURCE_MODEL for r in resps)
    registry = srv.server.metrics.registry
    assert registry.get_sample_value("authopt_queue_wait_seconds_count") == 3
    waited = registry.get_sample_value("authopt_queue_wait_seconds_sum")
    assert waited is not None and 0.015 <= waited < 3.0  # the first waited out the 20 ms delay


async def test_an_old_card_row_is_not_stale_features(start_server: ServerFactory, model_dir: Path) -> None:
    """A card last seen days ago is normal; only the route feed's freshness decides staleness."""
    from tests.conftest import fill_route_features

    srv = await start_server(model_dir=model_dir, features=False, feature_max_age_s=60)
    fill_route_features(srv.features)
    srv.features.put(Entity.CARD_MERCHANT, "fp-abc|m-1", {"reattempts_30d": 1.0}, time.time() - 5 * 86400)
    resp = await srv.stub.Recommend(make_request(), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_MODEL
    assert resp.feature_age_ms >= 5 * 86400 * 1000  # the age reported is still the oldest row used
    assert 0 <= resp.route_feature_age_ms < 60_000  # while the route feed is fresh


async def test_stale_route_features_fall_back(start_server: ServerFactory, model_dir: Path) -> None:
    from tests.conftest import fill_route_features

    srv = await start_server(model_dir=model_dir, features=False, feature_max_age_s=60)
    fill_route_features(srv.features, as_of=time.time() - 600)
    resp = await srv.stub.Recommend(make_request(), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_FEATURES
    assert resp.feature_age_ms >= 600_000
    assert 600_000 <= resp.route_feature_age_ms < 700_000


def _teach_forward_latency(srv: Running, seconds: float) -> None:
    """Make the live latency estimate (an EWMA of observed forwards) believe a forward takes `seconds`."""
    model = srv.server.registry.current
    assert model is not None
    for _ in range(200):
        model.latency.observe(len(ROUTES), seconds)


async def test_budget_below_measured_inference_latency_falls_back(
    start_server: ServerFactory, model_dir: Path
) -> None:
    srv = await start_server(model_dir=model_dir)
    _teach_forward_latency(srv, 0.500)
    req = make_request(request_id="tight")
    # below the forward's 500 ms, and room for the card read from the online store on a busy machine
    # (its own bound is the budget: at 5 ms it could run out there first, FALLBACK_CARD_STATE)
    req.latency_budget_ms = 100
    t0 = time.perf_counter()
    resp = await srv.stub.Recommend(req, timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_BUDGET
    assert time.perf_counter() - t0 < 1.0
    assert len(resp.routes) == len(ROUTES)
    _teach_forward_latency(srv, 0.020)
    roomy = make_request(request_id="roomy")
    roomy.latency_budget_ms = 1000
    assert (await srv.stub.Recommend(roomy, timeout=5)).decision_source == Source.DECISION_SOURCE_MODEL


async def test_grpc_deadline_shorter_than_budget_is_honoured(
    start_server: ServerFactory, model_dir: Path
) -> None:
    srv = await start_server(model_dir=model_dir)
    _teach_forward_latency(srv, 0.800)
    req = make_request()
    req.latency_budget_ms = 5000
    resp = await srv.stub.Recommend(req, timeout=0.5)  # the deadline wins over the request's budget
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_BUDGET


async def test_hot_reload_swaps_to_new_version(start_server: ServerFactory, model_dir: Path) -> None:
    srv = await start_server(model_dir=model_dir, model_poll_interval_s=0.05)
    assert (await srv.stub.Recommend(make_request("a"), timeout=5)).model_version == "1"
    make_tiny_artifact(model_dir, "2", seed=7)
    for _ in range(200):
        resp = await srv.stub.Recommend(make_request(f"poll-{_}"), timeout=5)
        if resp.model_version == "2":
            break
        await asyncio.sleep(0.05)
    assert resp.model_version == "2" and resp.decision_source == Source.DECISION_SOURCE_MODEL
    # A mismatched newer version is refused; version 2 keeps serving.
    make_tiny_artifact(model_dir, "3", contract_hash="sha256:other")
    await asyncio.sleep(0.5)
    resp = await srv.stub.Recommend(make_request("after-3"), timeout=5)
    assert resp.model_version == "2"
    assert "3" in srv.server.registry.rejected


async def test_recommend_stream_answers_each_message(start_server: ServerFactory, model_dir: Path) -> None:
    srv = await start_server(model_dir=model_dir)

    async def requests():  # type: ignore[no-untyped-def]
        for i in range(20):
            req = make_request(f"s-{i}")
            if i == 7:
                req.attempt.amount_minor = -5
            yield optimizer_pb2.RecommendStreamRequest(request=req)

    results = [r async for r in srv.stub.RecommendStream(requests(), timeout=10)]
    assert sorted(r.request_id for r in results) == sorted(f"s-{i}" for i in range(20))
    bad = [r for r in results if r.WhichOneof("result") == "error"]
    assert len(bad) == 1 and bad[0].request_id == "s-7"
    assert bad[0].error.reason == "INVALID_AMOUNT" and bad[0].error.field == "attempt.amount_minor"
    assert bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    good = [r.response for r in results if r.WhichOneof("result") == "response"]
    assert all(g.decision_source == Source.DECISION_SOURCE_MODEL and g.routes for g in good)


async def test_same_request_id_returns_same_decision(start_server: ServerFactory, model_dir: Path) -> None:
    # Exploration at 50 % makes an accidental match of two independent decisions unlikely.
    srv = await start_server(model_dir=model_dir, exploration_rate=0.5)
    first = await srv.stub.Recommend(make_request("idem"), timeout=5)
    again = [await srv.stub.Recommend(make_request("idem"), timeout=5) for _ in range(10)]
    assert all(a == first for a in again)
    concurrent = await asyncio.gather(
        *(srv.stub.Recommend(make_request("idem-c"), timeout=5) for _ in range(10))
    )
    assert all(c == concurrent[0] for c in concurrent)
    changed = make_request("idem")
    changed.attempt.amount_minor = 999
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await srv.stub.Recommend(changed, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(exc.value)
    assert info is not None and info.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_concurrent_requests_are_batched(start_server: ServerFactory, model_dir: Path) -> None:
    srv = await start_server(model_dir=model_dir, batch_max_queue_delay_us=2000)
    # A roomy budget: this test is about batching, and a full GC of the test process's heap can
    # pause it for ~200 ms on a busy 2-core machine (the served process freezes its heap instead).
    reqs = [make_request(f"c-{i}") for i in range(64)]
    for r in reqs:
        r.latency_budget_ms = 5000
    resps = await asyncio.gather(*(srv.stub.Recommend(r, timeout=10) for r in reqs))
    sources = [Source.Name(r.decision_source) for r in resps]
    assert set(sources) == {"DECISION_SOURCE_MODEL"}, sources
    reg = srv.server.metrics.registry
    forwards = reg.get_sample_value("authopt_batch_requests_count")
    merged = reg.get_sample_value("authopt_batch_requests_sum")
    assert forwards is not None and merged == 64
    assert forwards < 64, f"64 concurrent requests ran in {forwards} forwards: no batching"
    # Batched results are the same as scoring each request alone.
    alone = await srv.stub.Recommend(make_request("c-alone"), timeout=5)
    assert [r.approval_probability for r in alone.routes] == pytest.approx(
        [r.approval_probability for r in resps[0].routes], abs=1e-6
    )


async def test_overload_sheds_to_fallback(start_server: ServerFactory, model_dir: Path) -> None:
    srv = await start_server(model_dir=model_dir, batch_queue_size=1, batch_max_queue_delay_us=20_000)
    resps = await asyncio.gather(*(srv.stub.Recommend(make_request(f"o-{i}"), timeout=10) for i in range(20)))
    sources = {r.decision_source for r in resps}
    assert Source.DECISION_SOURCE_FALLBACK_OVERLOAD in sources
    assert all(r.routes for r in resps)


async def test_graceful_drain_finishes_in_flight(start_server: ServerFactory, model_dir: Path) -> None:
    # A 300 ms batching delay keeps requests in flight while the drain starts.
    srv = await start_server(model_dir=model_dir, batch_max_queue_delay_us=100_000)

    async def call(i: int) -> optimizer_pb2.RecommendResponse:
        resp: optimizer_pb2.RecommendResponse = await srv.stub.Recommend(make_request(f"d-{i}"), timeout=10)
        return resp

    in_flight = [asyncio.create_task(call(i)) for i in range(5)]
    registry = srv.server.metrics.registry
    for _ in range(200):  # all five inside the server (a loaded machine may take a while)
        if registry.get_sample_value("authopt_in_flight") == 5:
            break
        await asyncio.sleep(0.005)
    assert registry.get_sample_value("authopt_in_flight") == 5
    health = asyncio.create_task(srv.server.stop(grace=5))
    await asyncio.sleep(0.01)
    # Draining: not ready, still alive (the servicer, as the transport refuses new calls now).
    ready = await srv.server.health.Check(health_pb2.HealthCheckRequest(), None)  # type: ignore[arg-type]
    alive = await srv.server.health.Check(health_pb2.HealthCheckRequest(service="liveness"), None)  # type: ignore[arg-type]
    assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert alive.status == health_pb2.HealthCheckResponse.SERVING
    done = await asyncio.gather(*in_flight)
    assert all(r.routes for r in done)
    await health
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await srv.stub.Recommend(make_request("late"), timeout=1)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_lookup_keys_match_the_contracts_entity_keys() -> None:
    """The hot path builds keys inline; they must be exactly what streams.entity_key publishes."""
    from model.features import InMemoryFeatureStore, lookup_features
    from streams import Entity, entity_key

    attempt = make_request().attempt
    store = InMemoryFeatureStore()
    parts = {
        "route": "acq-a",
        "bin_": attempt.card.bin,
        "issuer_country": attempt.card.issuer_country,
        "merchant": attempt.merchant.id,
        "fingerprint": attempt.card.fingerprint,
        "amount_minor": attempt.amount_minor,
        "currency": attempt.currency,
    }
    for i, entity in enumerate(Entity):
        store.put(entity, entity_key(entity, **parts), {"marker": float(i)}, as_of=1000.0 + i)  # type: ignore[arg-type]
    found = lookup_features(store, attempt, ["acq-a"])
    for i, entity in enumerate(Entity):
        rows = (
            found.route_rows[0]
            if entity in (Entity.ROUTE, Entity.ROUTE_ISSUER, Entity.ROUTE_BIN)
            else found.attempt_rows
        )
        row = rows[entity]
        assert row is not None and row["marker"] == float(i), entity
    assert found.oldest_as_of == 1000.0 and found.routes_known == 1


async def test_non_finite_model_output_degrades_to_fallback(
    start_server: ServerFactory, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from streams import Entity

    srv = await start_server(model_dir=model_dir)
    for route, _, _ in ROUTES:  # a corrupt feature value makes the model's output NaN
        srv.features.put(Entity.ROUTE, route, {"approval_rate_1h": float("nan"), "attempts_1h": 10.0})
    resp = await srv.stub.Recommend(make_request("nan"), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_ERROR
    assert len(resp.routes) == len(ROUTES)
    assert all(0.0 <= r.approval_probability <= 1.0 for r in resp.routes)
    assert "fallback policy" in caplog.text


async def test_async_client_generates_idempotency_keys(start_server: ServerFactory, model_dir: Path) -> None:
    from authopt.client import AsyncClient

    srv = await start_server(model_dir=model_dir)
    async with AsyncClient(f"127.0.0.1:{srv.port}") as client:
        req = make_request("")
        resp = await client.recommend(req)
        assert req.request_id and resp.request_id == req.request_id  # generated, sent, echoed
        again = await client.recommend(req)  # a retried call is the same decision
        assert again == resp
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.report_outcome(attempt_pb2.AttemptOutcome())
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _shed(srv: Running, reason: str) -> float:
    value = srv.server.metrics.registry.get_sample_value("authopt_shed_total", {"reason": reason})
    return 0.0 if value is None else float(value)


async def test_admission_control_answers_beyond_the_limit_from_the_fallback_at_once(
    start_server: ServerFactory, model_dir: Path
) -> None:
    """Beyond `max_in_flight` decisions at once, a request is not queued for the model: it is
    answered at once from the fallback policy, its source saying so, and counted."""
    srv = await start_server(model_dir=model_dir, max_in_flight=1, idempotency_ttl_s=0)
    responses = await asyncio.gather(
        *(srv.stub.Recommend(make_request(f"burst-{i}"), timeout=10) for i in range(40))
    )
    sources = [r.decision_source for r in responses]
    overload = optimizer_pb2.DECISION_SOURCE_FALLBACK_OVERLOAD
    assert optimizer_pb2.DECISION_SOURCE_MODEL in sources and overload in sources  # all answered
    assert _shed(srv, "overload") == sources.count(overload)
    shed = next(r for r in responses if r.decision_source == overload)
    assert len(shed.routes) == len(ROUTES) and shed.model_version == "1"


async def test_a_call_whose_deadline_has_passed_is_not_worked_on(
    start_server: ServerFactory, model_dir: Path
) -> None:
    srv = await start_server(model_dir=model_dir)
    for i in range(20):  # a 1 ms deadline: less than the 2 ms a call needs to be started on
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.Recommend(make_request(f"late-{i}"), timeout=0.001)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.2)
    decided = srv.server.metrics.registry.get_sample_value(
        "authopt_decisions_total", {"source": "DECISION_SOURCE_MODEL"}
    )
    assert _shed(srv, "deadline_passed") >= 1 and not decided  # refused, none decided


async def test_a_connection_beyond_its_stream_limit_waits_in_the_client_not_the_server(
    start_server: ServerFactory, model_dir: Path
) -> None:
    """HTTP/2 MAX_CONCURRENT_STREAMS: with 2 streams a connection, 40 calls at once on one channel
    are all answered by the model, none shed (at most 2 ever reach the handlers at once); without
    the limit the same burst exceeds `max_in_flight=2` and is shed to the fallback."""
    srv = await start_server(
        model_dir=model_dir, max_in_flight=2, max_streams_per_connection=2, idempotency_ttl_s=0
    )
    # A roomy budget: this test is about the stream limit, and on a busy 2-core machine a forward
    # (or a GC pause of the test process) can pass the default 50 ms and answer from the fallback.
    reqs = [make_request(f"conn-{i}") for i in range(40)]
    for r in reqs:
        r.latency_budget_ms = 5000
    responses = await asyncio.gather(*(srv.stub.Recommend(r, timeout=10) for r in reqs))
    assert {r.decision_source for r in responses} == {optimizer_pb2.DECISION_SOURCE_MODEL}
    assert _shed(srv, "overload") == 0


class _StalledBroker:
    """An OutcomePublisher whose broker does not answer until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.published: list[str] = []

    async def publish(self, events: list[object]) -> None:
        await self.release.wait()
        self.published += [e.outcome.event_id for e in events]  # type: ignore[attr-defined]

    async def close(self) -> None:
        return None


def _outcome(event_id: str) -> attempt_pb2.AttemptOutcome:
    outcome = attempt_pb2.AttemptOutcome(
        event_id=event_id,
        request_id=event_id,
        attempt=make_request().attempt,
        route_id=ROUTES[0][0],
        status=attempt_pb2.OUTCOME_STATUS_APPROVED,
    )
    outcome.attempted_at.FromNanoseconds(time.time_ns() - 1_000_000_000)
    return outcome


async def test_outcomes_beyond_the_broker_backlog_are_refused_with_when_to_retry(
    start_server: ServerFactory, model_dir: Path
) -> None:
    """A broker slower than the callers: beyond `max_outcomes_publishing` outcomes waiting for it, a
    report is refused at once (RESOURCE_EXHAUSTED, OUTCOMES_BACKLOG, RetryInfo), never held without
    bound or dropped; those accepted are published once the broker answers."""
    broker = _StalledBroker()
    srv = await start_server(model_dir=model_dir, publisher=broker, max_outcomes_publishing=2)
    waiting = [
        asyncio.ensure_future(
            srv.stub.ReportOutcome(optimizer_pb2.ReportOutcomeRequest(outcome=_outcome(f"o-{i}")))
        )
        for i in range(2)
    ]
    await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.ReportOutcomes(
            optimizer_pb2.ReportOutcomesRequest(outcomes=[_outcome("o-2")]), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(err.value)
    assert info is not None and info.reason == "OUTCOMES_BACKLOG"
    assert retry_after_s(err.value) == pytest.approx(0.5)
    broker.release.set()
    assert [r.event_id for r in await asyncio.gather(*waiting)] == ["o-0", "o-1"]
    assert sorted(broker.published) == ["o-0", "o-1"]
    resp = await srv.stub.ReportOutcomes(optimizer_pb2.ReportOutcomesRequest(outcomes=[_outcome("o-2")]))
    assert resp.accepted == 1 and "o-2" in broker.published  # the retry is taken


async def test_a_drain_delay_answers_calls_while_health_says_not_serving(
    start_server: ServerFactory, model_dir: Path
) -> None:
    """With DRAIN_DELAY_S the server first tells health watchers NOT_SERVING and keeps answering, so a
    call already on its way is served, not cancelled; only then does it refuse new calls."""
    srv = await start_server(model_dir=model_dir, drain_delay_s=0.5)
    stopping = asyncio.ensure_future(srv.server.stop(1.0))
    await asyncio.sleep(0.1)
    assert await _health(srv.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    resp = await srv.stub.Recommend(make_request("in-the-delay"), timeout=5)
    assert resp.decision_source == Source.DECISION_SOURCE_MODEL
    await stopping
    with pytest.raises(grpc.aio.AioRpcError):
        await srv.stub.Recommend(make_request("after"), timeout=2)
