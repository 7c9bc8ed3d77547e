"""The Faust agent in `test_context()` (no broker): batching by partition, table writes, trace links."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authopt.v1 import events_pb2
from streams.contract import Entity
from streams.kafka import KafkaSettings
from streams.processor import table_key
from streams.worker import WorkerSettings, WorkerStats, make_app
from tests.events import T0, event

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
async def app() -> AsyncIterator[tuple[Any, WorkerStats]]:
    # No broker is contacted: test_context() feeds the agent directly.
    built = make_app(WorkerSettings(publish_interval_s=0.05), KafkaSettings.for_bootstrap("127.0.0.1:1"))
    sent: list[tuple[str, bytes, bytes, int]] = []

    async def send(topic: str, key: bytes, value: bytes, partition: int, *_: Any) -> asyncio.Future[None]:
        # No producer runs in test_context(): record what would go to Kafka, delivered at once.
        sent.append((topic, key, value, partition))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    built[0].producer.send = send
    built[0].sent = sent
    yield built
    # The agent's stream built (but never started) Faust's consumer thread, which made its own
    # event loop; close it so the suite stays free of ResourceWarnings.
    thread = getattr(built[0].consumer, "_thread", None)
    loop = getattr(thread, "thread_loop", None)
    if loop is not None and not loop.is_closed():
        loop.close()


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_agent_folds_events_into_per_partition_states(
    app: tuple[Any, WorkerStats], spans: InMemorySpanExporter
) -> None:
    app, stats = app
    table = app.tables["feature-state"]
    async with app.agents["update-features"].test_context() as agent:
        for i in range(6):
            headers = {"traceparent": f"00-{TRACE_ID}-b7ad6b716920333{i}-01".encode()} if i == 0 else None
            await agent.put(
                event(f"e{i}", T0 + i, fingerprint=f"fp-{i % 2}").SerializeToString(),
                key=f"fp-{i % 2}".encode(),
                partition=i % 2,
                headers=headers,
            )
        await agent.put(
            event("e0", T0, fingerprint="fp-0").SerializeToString(), key=b"fp-0", partition=0
        )  # replayed
        await _until(lambda: stats.applied + stats.duplicates == 7)
    assert stats.applied == 6 and stats.duplicates == 1
    counters = stats.as_dict()
    assert counters["events"] == 7 and counters["dead_lettered"] == {}
    # The route's events are split by source partition: 3 + 3, never one state for both.
    for partition in (0, 1):
        raw = table[table_key(Entity.ROUTE, "acq-a", partition)]
        snap = events_pb2.FeatureSnapshot.FromString(raw)
        assert snap.source_partition == partition and snap.events == 3
    assert table.get(table_key(Entity.CARD_MERCHANT, "fp-1|m-1", 0)) is None
    assert (
        events_pb2.FeatureSnapshot.FromString(table[table_key(Entity.CARD_MERCHANT, "fp-1|m-1", 1)]).events
        == 3
    )
    # The update's span links to the decision that reported the outcome.
    updates = [s for s in spans.get_finished_spans() if s.name == "authopt.features.update"]
    linked = {format(link.context.trace_id, "032x") for s in updates for link in s.links}
    assert TRACE_ID in linked
    assert sum(s.attributes["authopt.events"] for s in updates) == 7  # type: ignore[index,misc]
    # Every changed state went to the compacted features topic, in its source partition.
    sent = app.sent
    assert {(t, p) for t, _, _, p in sent} == {("authopt.features.v1", 0), ("authopt.features.v1", 1)}
    latest = {key: (value, partition) for _, key, value, partition in sent}
    for key, (value, partition) in latest.items():
        assert key.endswith(b"#%d" % partition) and table[key] == value


def test_stats_file_is_written_whole(tmp_path: Path) -> None:
    stats = WorkerStats(applied=5, duplicates=2)
    stats.dead["late"] += 1
    path = tmp_path / "worker-stats.json"
    stats.write(path)
    doc = json.loads(path.read_text())
    assert doc["events"] == 8 and doc["applied"] == 5 and doc["dead_lettered"] == {"late": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["worker-stats.json"]  # no temp file left


class _BatchingProducer:
    """aiokafka's batch API over real BatchBuilders, recording what was submitted."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.submitted: list[tuple[str, int, int, bool]] = []  # topic, partition, records, closed

    def create_batch(self) -> Any:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(self.batch_size, 0)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[None]:
        self.submitted.append((topic, partition, batch.record_count(), batch._closed))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _FaustProducer:
    def __init__(self, inner: _BatchingProducer | None) -> None:
        self._producer = inner
        self.sent: list[tuple[str, bytes, bytes, int]] = []

    async def send(
        self, topic: str, key: bytes, value: bytes, partition: int, *_: Any
    ) -> asyncio.Future[None]:
        self.sent.append((topic, key, value, partition))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _App:
    def __init__(self, producer: _FaustProducer) -> None:
        self.producer = producer


@pytest.mark.parametrize(("batch_size", "expected"), [(16_384, [40]), (1, [1] * 40), (1_000, None)])
async def test_changelog_records_go_out_in_closed_producer_batches(
    batch_size: int, expected: list[int] | None
) -> None:
    from streams.kafka import FEATURES_TOPIC
    from streams.worker import _send_changelog

    inner = _BatchingProducer(batch_size)
    app = _App(_FaustProducer(inner))
    records = [(b"route:acq-%d#3" % i, b"x" * 90) for i in range(40)]
    futures = await _send_changelog(app, 3, records)
    await asyncio.gather(*futures)
    counts = [n for _, _, n, _ in inner.submitted]
    assert sum(counts) == 40 and all(
        t == FEATURES_TOPIC and p == 3 and closed for t, p, _, closed in inner.submitted
    )
    if expected is not None:
        assert counts == expected  # one batch; or one record per batch (the shared local broker)
    else:
        assert len(counts) > 1 and max(counts) < 40  # split where a batch is full
    assert len(futures) == len(counts) and app.producer.sent == []


async def test_changelog_records_without_a_started_producer_are_sent_one_by_one() -> None:
    from streams.worker import _send_changelog

    app = _App(_FaustProducer(None))
    futures = await _send_changelog(app, 1, [(b"a", b"1"), (b"b", b"2")])
    assert [k for _, k, _, _ in app.producer.sent] == [b"a", b"b"] and len(futures) == 2
    assert await _send_changelog(app, 1, []) == []


async def test_offsets_skipped_inside_faust_are_sought_back(app: tuple[Any, WorkerStats]) -> None:
    # Faust 0.15 can drop a fetched event around a rebalance and then commit past it
    # (streams.progress): the agent notices the hole in the partition's offsets and seeks back.
    app, stats = app
    sought: list[tuple[str, int, int]] = []

    async def seek(tp: Any, offset: int) -> None:
        sought.append((tp.topic, tp.partition, offset))

    app.consumer.seek = seek
    async with app.agents["update-features"].test_context() as agent:
        for i in range(3):
            await agent.put(event(f"e{i}", T0 + i).SerializeToString(), key=b"fp-1", partition=0)
        await _until(lambda: stats.applied == 3)
        assert sought == [] and stats.repairs == 0
        agent.sent_offset += 2  # offsets 3 and 4 never reach the agent
        await agent.put(event("e5", T0 + 5).SerializeToString(), key=b"fp-1", partition=0)
        await _until(lambda: stats.applied == 4)
        await _until(lambda: bool(sought))
    assert sought == [("authopt.attempts.v1", 0, 3)]
    assert stats.repairs == 1 and "1 consumer repairs" in stats.line()
