"""`authopt log export`: the attempts and decisions topics into the log's day-partitioned Parquet.

Reads `authopt.attempts.v1` (`AttemptEvent`s) and `authopt.decisions.v1` (`DecisionRecord`s) from
the brokers into the layout `authopt log import` writes (`history.store`): `DIR/attempts/...` and
`DIR/decisions/...`, so training and evaluation read an exported log and an imported one alike.

- **Idempotent by event id**: before a day's first event is written, the ids the log already holds
  for that day are read (one column), and an event whose id is there is skipped; running the export
  twice over overlapping offsets stores each event once. (A decision's id is its request id and its
  time: `<request_id>@<decided_at µs>`.)
- **Bounded**: each partition is read from its start offset to the end offset it had when the
  export began (the fetch's whole last batch included), so an export stops by itself while the
  server keeps publishing. Where each partition stopped is kept in `DIR/exports/<topic>.json`; the
  next export resumes there, unless `since` (a time: the first offsets at or after it, and records
  whose broker timestamp is older are skipped: not every broker seeks by time exactly) or
  `from_beginning` says otherwise.
- **Nothing half-written**: a run's files are renamed into place only when its topic is complete;
  the checkpoint moves only after that. A record that is not the topic's message is counted and
  skipped (named in the summary), never stops the export.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from authopt.v1 import events_pb2
from history.errors import HistoryError
from history.store import DayWriter, Kind, day_of, decision_id, event_ids
from streams.kafka import ATTEMPTS_TOPIC, DECISIONS_TOPIC, KafkaSettings

__all__ = ["TOPICS", "ExportError", "ExportSummary", "TopicExport", "decision_id", "export_log"]

TOPICS: dict[str, Kind] = {ATTEMPTS_TOPIC: "attempts", DECISIONS_TOPIC: "decisions"}
Progress = Callable[[str, int, int], None]  # (topic, records read, records to read)
_DRAIN_CAP = 100_000  # records read past a partition's end at most (see _read)


class ExportError(HistoryError):
    """The export cannot run (brokers unreachable, a stalled partition); nothing of the topic was kept."""


@dataclass
class TopicExport:
    """What an export did with one topic."""

    topic: str
    kind: Kind
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition: (from, to) offsets
    read: int = 0
    written: int = 0
    already_in_log: int = 0
    before_since: int = 0  # records older than `since` in the first fetched batches
    invalid: int = 0
    days: set[str] = field(default_factory=set)
    missing: bool = False  # the topic does not exist on the brokers

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "missing": self.missing,
            "partitions": {str(p): {"from": a, "to": b} for p, (a, b) in sorted(self.partitions.items())},
            "read": self.read,
            "written": self.written,
            "already_in_log": self.already_in_log,
            "before_since": self.before_since,
            "invalid": self.invalid,
            "days": sorted(self.days),
        }


@dataclass
class ExportSummary:
    topics: list[TopicExport] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        read = sum(t.read for t in self.topics)
        return {
            "topics": [t.as_dict() for t in self.topics],
            "read": read,
            "written": sum(t.written for t in self.topics),
            "seconds": round(self.seconds, 3),
            "events_per_s": round(read / self.seconds) if self.seconds > 0 else 0,
        }


def _identify(kind: Kind, raw: bytes) -> tuple[str, int] | None:
    """(event id, time in epoch µs) of a record, or None if it is not the topic's message."""
    try:
        if kind == "attempts":
            event = events_pb2.AttemptEvent.FromString(raw)
            at = event.outcome.attempted_at.ToMicroseconds()
            return (event.outcome.event_id, at) if event.outcome.event_id and at > 0 else None
        record = events_pb2.DecisionRecord.FromString(raw)
        at = record.decided_at.ToMicroseconds()
        return (decision_id(record), at) if record.request.request_id and at > 0 else None
    except DecodeError:
        return None


def _checkpoint_path(out: Path, topic: str) -> Path:
    return out / "exports" / f"{topic}.json"


def _read_checkpoint(out: Path, topic: str) -> dict[int, int]:
    path = _checkpoint_path(out, topic)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        return {int(p): int(o) for p, o in doc["next_offsets"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(
            f"{path}: not an export checkpoint ({exc}); remove it or pass --from-beginning"
        ) from exc


def _write_checkpoint(out: Path, topic: str, positions: dict[int, int]) -> None:
    path = _checkpoint_path(out, topic)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    doc = {"topic": topic, "next_offsets": {str(p): o for p, o in sorted(positions.items())}}
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


class _Sink:
    """One topic's new events into its day partitions, skipping ids the log (or this run) holds."""

    def __init__(self, out: Path, kind: Kind, report: TopicExport, since_ms: int | None) -> None:
        self._out, self._kind, self._report = out, kind, report
        self._since_ms = since_ms
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._writer = DayWriter(out, f"export-{stamp}", kind)
        self._seen: dict[str, set[str]] = {}

    def add(self, raw: bytes, timestamp_ms: int) -> None:
        report = self._report
        report.read += 1
        if self._since_ms is not None and timestamp_ms < self._since_ms:
            report.before_since += 1
            return
        found = _identify(self._kind, raw)
        if found is None:
            report.invalid += 1
            return
        event_id, at_us = found
        day = day_of(at_us)
        seen = self._seen.get(day)
        if seen is None:
            seen = self._seen[day] = event_ids(self._out, self._kind, day)
        if event_id in seen:
            report.already_in_log += 1
            return
        seen.add(event_id)
        self._writer.add(event_id, at_us, raw)
        report.written += 1

    @property
    def read(self) -> int:
        return self._report.read

    def commit(self) -> None:
        if self._report.written:
            self._report.days = self._writer.commit()
        else:
            self._writer.abort()

    def abort(self) -> None:
        self._writer.abort()


async def _export_topic(
    kafka: KafkaSettings,
    out: Path,
    topic: str,
    *,
    since: datetime | None,
    from_beginning: bool,
    progress: Progress | None,
    stall_timeout_s: float,
) -> TopicExport:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    kind = TOPICS[topic]
    report = TopicExport(topic, kind)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        client_id="authopt-log-export",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
        request_timeout_ms=int(stall_timeout_s * 1000),
        **kafka.client_options(),
    )
    try:
        await asyncio.wait_for(consumer.start(), timeout=stall_timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await consumer.stop()
        why = str(exc) or type(exc).__name__
        raise ExportError(f"cannot reach the brokers at {kafka.bootstrap}: {why}") from exc
    since_ms = None if since is None else int(since.timestamp() * 1000)
    sink = _Sink(out, kind, report, since_ms)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()  # a fresh client may not know it yet
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            report.missing = True
            return report
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends: dict[Any, int] = await consumer.end_offsets(tps)
        starts = await _starts(consumer, out, topic, tps, ends, since=since, from_beginning=from_beginning)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        positions = await _read(consumer, topic, starts, ends, sink, progress, stall_timeout_s)
        report.partitions = {tp.partition: (starts[tp], positions[tp]) for tp in tps}
        sink.commit()
        _write_checkpoint(out, topic, {tp.partition: positions[tp] for tp in tps})
        return report
    except BaseException:
        sink.abort()
        raise
    finally:
        await consumer.stop()


async def _read(
    consumer: Any,
    topic: str,
    starts: dict[Any, int],
    ends: dict[Any, int],
    sink: _Sink,
    progress: Progress | None,
    stall_timeout_s: float,
) -> dict[Any, int]:
    """Read every partition from its start to its end into `sink`; returns where each stopped.

    A partition that reached its end is read on until a fetch brings nothing more for it (at most
    `_DRAIN_CAP` records past the end, so a topic still being written to cannot keep the export
    going): records a client has already fetched past the end are kept, and a broker that reports
    the end of a partition as the start of its last batch (Tansu: ../shared/notes/local-kafka.md)
    loses nothing of that batch.
    """
    total = sum(max(0, ends[tp] - starts[tp]) for tp in starts)
    remaining = {tp for tp in starts if starts[tp] < ends[tp]}
    positions = dict(starts)
    for tp in set(starts) - remaining:
        consumer.pause(tp)
    last_progress = time.monotonic()
    while remaining:
        draining = all(positions[tp] >= ends[tp] for tp in remaining)
        batches = await consumer.getmany(*remaining, timeout_ms=200 if draining else 500, max_records=20_000)
        if draining:
            for tp in [tp for tp in remaining if tp not in batches]:
                remaining.discard(tp)
                consumer.pause(tp)
        if not batches:
            if remaining and time.monotonic() - last_progress > stall_timeout_s:
                behind = ", ".join(
                    f"partition {tp.partition} at {positions[tp]}/{ends[tp]}" for tp in remaining
                )
                raise ExportError(f"{topic}: no records for {stall_timeout_s:g} s ({behind})")
            continue
        last_progress = time.monotonic()
        for tp, messages in batches.items():
            for message in messages:
                sink.add(message.value, message.timestamp)
            positions[tp] = messages[-1].offset + 1
            if positions[tp] >= ends[tp] + _DRAIN_CAP:
                remaining.discard(tp)
                consumer.pause(tp)
        if progress is not None:
            progress(topic, min(sink.read, total), total)
    return positions


async def _starts(
    consumer: Any,
    out: Path,
    topic: str,
    tps: Sequence[Any],
    ends: dict[Any, int],
    *,
    since: datetime | None,
    from_beginning: bool,
) -> dict[Any, int]:
    """Each partition's first offset to read: at `since`, else the beginning, else the checkpoint's."""
    beginnings: dict[Any, int] = await consumer.beginning_offsets(tps)
    if since is not None:
        found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        return {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
    if from_beginning:
        return dict(beginnings)
    saved = _read_checkpoint(out, topic)
    return {tp: max(beginnings[tp], saved.get(tp.partition, beginnings[tp])) for tp in tps}


async def export_log(
    kafka: KafkaSettings,
    out: Path,
    *,
    topics: Sequence[str] = (ATTEMPTS_TOPIC, DECISIONS_TOPIC),
    since: datetime | None = None,
    from_beginning: bool = False,
    progress: Progress | None = None,
    stall_timeout_s: float = 30.0,
) -> ExportSummary:
    """Export `topics` from `kafka` into the log under `out` (see the module docstring)."""
    if not kafka.bootstrap:
        raise ExportError("no brokers: pass --brokers or set AUTHOPT_KAFKA_BOOTSTRAP")
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        raise ExportError(f"cannot export {', '.join(unknown)}: known topics are {', '.join(TOPICS)}")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    summary = ExportSummary()
    started = time.perf_counter()
    for topic in topics:
        summary.topics.append(
            await _export_topic(
                kafka,
                out,
                topic,
                since=since,
                from_beginning=from_beginning,
                progress=progress,
                stall_timeout_s=stall_timeout_s,
            )
        )
    summary.seconds = time.perf_counter() - started
    return summary
