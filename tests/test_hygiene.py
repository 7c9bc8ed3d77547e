"""Secrets and PAN hygiene (issue 20): run the loop — a real server, broker and worker, traffic, and
hostile requests that carry card numbers — then scan every log line, every span attribute and every
Kafka record for a full card number or a configured secret: none may be there."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from authopt.samples import sample_attempt
from authopt.v1 import attempt_pb2, optimizer_pb2
from server.pan import contains_card_number
from streams.broker import LocalBroker, LocalWorker, start_broker, start_worker
from streams.kafka import ATTEMPTS_TOPIC, DECISIONS_TOPIC, DLQ_TOPIC, FEATURES_TOPIC, KafkaSettings
from tests.conftest import ServerFactory, make_request

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-Pa55-6f1b"  # a configured SASL password (unused on PLAINTEXT, but configured)
TEST_PANS = ("4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "6011111111111117")


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


@pytest.fixture
def worker(broker: LocalBroker, tmp_path: Path) -> Iterator[LocalWorker]:
    w = start_worker(broker.bootstrap, tmp_path / "worker.log", env={"AUTHOPT_KAFKA_SASL_PASSWORD": SECRET})
    yield w
    w.stop(timeout_s=10)


async def _records(bootstrap: str, topics: tuple[str, ...]) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[bytes] = []
    try:
        quiet = 0
        while quiet < 3:
            batches = await consumer.getmany(timeout_ms=500)
            quiet = 0 if batches else quiet + 1
            for records in batches.values():
                out += [(r.key or b"") + b"\n" + (r.value or b"") for r in records]
                out += [k.encode() + b"=" + (v or b"") for r in records for k, v in r.headers]
    finally:
        await consumer.stop()
    return out


def _leaks(texts: list[str]) -> list[str]:
    return [t[:200] for t in texts if contains_card_number(t) or SECRET in t]


async def test_no_card_number_or_secret_in_logs_spans_or_kafka(
    start_server: ServerFactory,
    broker: LocalBroker,
    worker: LocalWorker,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    kafka = KafkaSettings.model_construct(bootstrap=broker.bootstrap, sasl_password=SecretStr(SECRET))
    srv = await start_server(kafka=kafka, exploration_rate=0.2)
    assert SECRET not in repr(srv.server.settings) and SECRET not in str(srv.server.settings.kafka)

    # Ordinary traffic: decisions and their outcomes through the broker into the worker.
    outcomes = []
    for i in range(40):
        resp = await srv.stub.Recommend(make_request(f"req-{i}"), timeout=10)
        outcome = attempt_pb2.AttemptOutcome(
            event_id=f"ev-{i}",
            request_id=f"req-{i}",
            attempt=make_request().attempt,
            route_id=resp.routes[0].route_id,
            status=attempt_pb2.OUTCOME_STATUS_DECLINED,
            response_code="51",
        )
        outcome.attempted_at.FromNanoseconds(time.time_ns() - 1_000_000_000)
        outcomes.append(outcome)
    assert (
        await srv.stub.ReportOutcomes(optimizer_pb2.ReportOutcomesRequest(outcomes=outcomes), timeout=15)
    ).accepted == 40

    # Hostile input: a card number in every free-text place a caller controls. Each is refused, and
    # neither the refusal nor anything else repeats the number.
    for k, pan in enumerate(TEST_PANS):
        hostile = [
            make_request(f"pan {pan}"),
            make_request(f"h-{k}-m", merchant=attempt_pb2.Merchant(id=pan, mcc="5411", country="DE")),
        ]
        card = attempt_pb2.Card()
        card.CopyFrom(sample_attempt().card)
        card.fingerprint = pan
        hostile.append(make_request(f"h-{k}-c", card=card))
        for req in hostile:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await srv.stub.Recommend(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert not contains_card_number(err.value.details() or "")
        bad = attempt_pb2.AttemptOutcome()
        bad.CopyFrom(outcomes[0])
        bad.event_id = f"ev {pan}"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.ReportOutcomes(optimizer_pb2.ReportOutcomesRequest(outcomes=[bad]), timeout=10)
        assert not contains_card_number(err.value.details() or "")

    await asyncio.sleep(3.0)  # the worker folds the outcomes and publishes features; the log flushes
    records = await _records(broker.bootstrap, (ATTEMPTS_TOPIC, DECISIONS_TOPIC, FEATURES_TOPIC, DLQ_TOPIC))
    assert len(records) >= 80  # the attempts and the decisions at least: the scan looked at real data
    texts = [r.decode("latin-1") for r in records]
    texts += [rec.getMessage() for rec in caplog.records]
    texts += [worker.log_text()]
    finished = spans.get_finished_spans()
    assert finished
    texts += [f"{s.name} {k}={v}" for s in finished for k, v in (s.attributes or {}).items()]
    texts += [f"{e.name} {dict(e.attributes or {})}" for s in finished for e in s.events]
    assert (
        len(_leaks([f"x {TEST_PANS[0]} y", f"password={SECRET}", "id 1733412345678901234"])) == 2
    )  # the scan sees
    assert _leaks(texts) == []
