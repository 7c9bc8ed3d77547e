"""`authopt log export` against a real local broker: the attempts and decisions topics into the log's
Parquet layout, each event once across runs over overlapping offsets, resumable, bounded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from authopt.samples import sample_request
from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from cli.main import main
from history.export import ExportError, decision_id, export_log
from history.store import read_decisions, read_events, read_records
from history.train import LogTrainConfig, train_log
from server.settings import RouteConfig
from streams.broker import LocalBroker, start_broker
from streams.kafka import ATTEMPTS_TOPIC, DECISIONS_TOPIC, KafkaSettings


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


def _attempt(i: int, at: float) -> events_pb2.AttemptEvent:
    outcome = attempt_pb2.AttemptOutcome(
        event_id=f"e-{i}",
        request_id=f"req-{i}",
        attempt=sample_request().attempt,
        route_id="acq-a",
        status=attempt_pb2.OUTCOME_STATUS_APPROVED,
    )
    outcome.attempted_at.FromNanoseconds(int(at * 1e9))
    return events_pb2.AttemptEvent(outcome=outcome)


def _decision(i: int, at: float) -> events_pb2.DecisionRecord:
    record = events_pb2.DecisionRecord(
        request=sample_request(f"req-{i}"), response=optimizer_pb2.RecommendResponse(request_id=f"req-{i}")
    )
    record.decided_at.FromNanoseconds(int(at * 1e9))
    return record


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, v) for v in values])
    finally:
        await producer.stop()


def _kafka(broker: LocalBroker) -> KafkaSettings:
    return KafkaSettings.for_bootstrap(broker.bootstrap)


def test_export_writes_each_event_once_across_overlapping_runs(broker: LocalBroker, tmp_path: Path) -> None:
    now = time.time() - 60
    attempts = [_attempt(i, now + i) for i in range(300)]
    decisions = [_decision(i, now + i) for i in range(200)]
    asyncio.run(_produce(broker.bootstrap, ATTEMPTS_TOPIC, [a.SerializeToString() for a in attempts[:200]]))
    asyncio.run(_produce(broker.bootstrap, DECISIONS_TOPIC, [d.SerializeToString() for d in decisions]))
    out = tmp_path / "log"

    first = asyncio.run(export_log(_kafka(broker), out))
    assert [(t.read, t.written) for t in first.topics] == [(200, 200), (200, 200)]
    assert [e.outcome.event_id for e in read_events(out)] == [f"e-{i}" for i in range(200)]
    assert [decision_id(d) for d in read_decisions(out)] == [decision_id(d) for d in decisions]

    # more attempts arrive, then one re-export from the beginning (overlapping every offset) and one
    # that resumes from the checkpoint: each event is in the log once
    asyncio.run(_produce(broker.bootstrap, ATTEMPTS_TOPIC, [a.SerializeToString() for a in attempts[200:]]))
    again = asyncio.run(export_log(_kafka(broker), out, from_beginning=True))
    assert (again.topics[0].read, again.topics[0].written, again.topics[0].already_in_log) == (300, 100, 200)
    resumed = asyncio.run(export_log(_kafka(broker), out))
    assert [t.read for t in resumed.topics] == [0, 0]
    log = read_records(out)
    assert len(log.records) == 300 and log.duplicates == 0  # stored once, not deduplicated on read
    assert [e.outcome for e in read_events(out)] == [a.outcome for a in attempts]


def test_export_skips_and_counts_records_that_are_not_the_topics_message(
    broker: LocalBroker, tmp_path: Path
) -> None:
    now = time.time() - 60
    good = [_attempt(i, now + i).SerializeToString() for i in range(3)]
    asyncio.run(
        _produce(broker.bootstrap, ATTEMPTS_TOPIC, [good[0], b"\xff\xff not protobuf", good[1], b"", good[2]])
    )
    summary = asyncio.run(export_log(_kafka(broker), tmp_path / "log", topics=[ATTEMPTS_TOPIC]))
    assert (summary.topics[0].read, summary.topics[0].written, summary.topics[0].invalid) == (5, 3, 2)


def test_export_since_starts_at_that_time(broker: LocalBroker, tmp_path: Path) -> None:
    now = time.time() - 60
    asyncio.run(
        _produce(
            broker.bootstrap, ATTEMPTS_TOPIC, [_attempt(i, now + i).SerializeToString() for i in range(5)]
        )
    )
    later = datetime.now(UTC) + timedelta(minutes=5)  # after every record's broker timestamp
    summary = asyncio.run(export_log(_kafka(broker), tmp_path / "log", topics=[ATTEMPTS_TOPIC], since=later))
    topic = summary.topics[0]
    assert topic.written == 0 and topic.before_since == topic.read  # (a broker may seek by time coarsely)
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    summary = asyncio.run(
        export_log(_kafka(broker), tmp_path / "log", topics=[ATTEMPTS_TOPIC], since=earlier)
    )
    assert summary.topics[0].written == 5


def test_the_cli_exports_and_says_when_it_cannot(broker: LocalBroker, tmp_path: Path) -> None:
    now = time.time() - 60
    asyncio.run(
        _produce(
            broker.bootstrap, ATTEMPTS_TOPIC, [_attempt(i, now + i).SerializeToString() for i in range(7)]
        )
    )
    runner = CliRunner()
    ok = runner.invoke(
        main, ["log", "export", "--brokers", broker.bootstrap, "--out", str(tmp_path / "log"), "--quiet"]
    )
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.output)
    assert doc["read"] == 7 and doc["written"] == 7
    assert doc["topics"][1]["missing"] is True  # nothing was ever published on the decision log

    both = runner.invoke(
        main,
        [
            "log",
            "export",
            "--brokers",
            broker.bootstrap,
            "--out",
            "x",
            "--since",
            "2026-01-01",
            "--from-beginning",
        ],
    )
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_unreachable_brokers_are_a_clear_error(tmp_path: Path) -> None:
    from streams.broker import free_port

    kafka = KafkaSettings.for_bootstrap(f"127.0.0.1:{free_port()}")
    with pytest.raises(ExportError, match=r"cannot reach the brokers at 127\.0\.0\.1"):
        asyncio.run(export_log(kafka, tmp_path / "log", stall_timeout_s=3))
    assert not (tmp_path / "log").exists()


def test_an_exported_log_with_no_world_trains_or_is_refused_like_an_imported_one(
    broker: LocalBroker, tmp_path: Path
) -> None:
    now = time.time() - 3600
    asyncio.run(
        _produce(
            broker.bootstrap, ATTEMPTS_TOPIC, [_attempt(i, now + i).SerializeToString() for i in range(50)]
        )
    )
    asyncio.run(export_log(_kafka(broker), tmp_path / "log"))
    with pytest.raises(Exception, match="one class only"):
        train_log(
            tmp_path / "log", tmp_path / "models", [RouteConfig(id="acq-a")], LogTrainConfig(progress=False)
        )


def test_large_batches_lose_nothing(broker: LocalBroker, tmp_path: Path) -> None:
    """Many records per fetched batch and more than one fetch's worth per partition: every one is
    exported, the tail of each partition's last batch included (the broker reports a partition's end
    as the start of its last batch)."""
    now = time.time() - 60
    records = [_attempt(i, now + i / 1000).SerializeToString() for i in range(60_000)]
    asyncio.run(_produce(broker.bootstrap, ATTEMPTS_TOPIC, records))
    summary = asyncio.run(export_log(_kafka(broker), tmp_path / "log", topics=[ATTEMPTS_TOPIC]))
    assert summary.topics[0].written == 60_000
    assert len(read_records(tmp_path / "log").records) == 60_000
