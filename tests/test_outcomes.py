"""ReportOutcome(s): validation, publishing to a real local broker, UNAVAILABLE when none."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from google.protobuf import timestamp_pb2

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from server.errors import error_info
from streams.broker import LocalBroker, free_port, start_broker
from streams.kafka import KafkaSettings
from tests.conftest import ServerFactory, make_request


def make_outcome(event_id: str = "ev-1") -> attempt_pb2.AttemptOutcome:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() - 1) * 1e9))
    return attempt_pb2.AttemptOutcome(
        event_id=event_id,
        request_id="req-1",
        attempt=make_request().attempt,
        route_id="acq-a",
        status=attempt_pb2.OUTCOME_STATUS_DECLINED,
        response_code="51",
        latency_ms=230,
        attempted_at=ts,
    )


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


async def _reason(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call  # type: ignore[misc]
    info = error_info(exc.value)
    assert info is not None
    return f"{exc.value.code().name}/{info.reason}"


async def test_no_broker_configured_is_unavailable(start_server: ServerFactory) -> None:
    srv = await start_server()
    req = optimizer_pb2.ReportOutcomeRequest(outcome=make_outcome())
    assert await _reason(srv.stub.ReportOutcome(req, timeout=5)) == "UNAVAILABLE/BROKER_NOT_CONFIGURED"


async def test_unreachable_broker_is_unavailable(start_server: ServerFactory) -> None:
    srv = await start_server(
        kafka=KafkaSettings.for_bootstrap(f"127.0.0.1:{free_port()}"), kafka_publish_timeout_s=1.0
    )
    req = optimizer_pb2.ReportOutcomeRequest(outcome=make_outcome())
    t0 = time.monotonic()
    assert await _reason(srv.stub.ReportOutcome(req, timeout=10)) == "UNAVAILABLE/BROKER_UNAVAILABLE"
    assert time.monotonic() - t0 < 5


async def test_invalid_outcome_is_rejected(start_server: ServerFactory) -> None:
    srv = await start_server()
    bad = make_outcome()
    bad.status = attempt_pb2.OUTCOME_STATUS_UNSPECIFIED
    req = optimizer_pb2.ReportOutcomeRequest(outcome=bad)
    assert (await _reason(srv.stub.ReportOutcome(req, timeout=5))).startswith("INVALID_ARGUMENT/")


async def test_outcomes_are_published_to_the_broker(start_server: ServerFactory, broker: LocalBroker) -> None:
    srv = await start_server(kafka=KafkaSettings.for_bootstrap(broker.bootstrap))
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    one = await srv.stub.ReportOutcome(
        optimizer_pb2.ReportOutcomeRequest(outcome=make_outcome("ev-1")),
        timeout=15,
        metadata=(("traceparent", traceparent),),
    )
    assert one.event_id == "ev-1"
    batch = await srv.stub.ReportOutcomes(
        optimizer_pb2.ReportOutcomesRequest(outcomes=[make_outcome(f"ev-b{i}") for i in range(5)]), timeout=15
    )
    assert batch.accepted == 5
    consumer = AIOKafkaConsumer(
        "authopt.attempts.v1",
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen: dict[str, events_pb2.AttemptEvent] = {}
        headers: dict[str, dict[str, bytes]] = {}
        async with asyncio.timeout(15):
            while len(seen) < 6:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        ev = events_pb2.AttemptEvent.FromString(rec.value)
                        seen[ev.outcome.event_id] = ev
                        headers[ev.outcome.event_id] = dict(rec.headers)
                        assert rec.key == b"fp-abc"
    finally:
        await consumer.stop()
    assert set(seen) == {"ev-1", *(f"ev-b{i}" for i in range(5))}
    assert seen["ev-1"].outcome.response_code == "51" and seen["ev-1"].producer
    # The caller's trace continues into the record headers.
    assert headers["ev-1"]["traceparent"].decode().split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
