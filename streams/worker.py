"""`authopt worker`: the Faust app that turns attempt outcomes into feature snapshots.

One agent consumes `authopt.attempts.v1` in batches (`stream.take_events`), groups each batch by
partition and folds it into entity states with streams.processor. The states live in a Faust table
whose changelog *is* the compacted topic `authopt.features.v1`: one write per changed entity per
batch is at once the worker's recovery log and the snapshot the server replicas read. A batch
closes after `publish_interval_s` (or `batch_max` events), so each entity is published at most once
per batch. Its events are acknowledged (and later committed) only once its snapshots and dead
letters are on the broker; events replayed after a crash or rebalance are recognised by event id
and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.features import EntityState
from streams.health import serve_health
from streams.kafka import ATTEMPTS_TOPIC, DLQ_TOPIC, FEATURES_TOPIC, KafkaSettings
from streams.online import DEFAULT_TTL_S, OnlineStore, card_value
from streams.processor import DEFAULT_LATENESS_S, DEFAULT_MAX_FUTURE_S, FeatureProcessor
from streams.progress import PartitionProgress

__all__ = ["WorkerSettings", "WorkerStats", "make_app", "run_worker"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer("authopt.streams")
_MAX_LINKS = 128  # OpenTelemetry's default span link limit


class WorkerSettings(BaseSettings):
    """Settings of `authopt worker`. Environment: `AUTHOPT_WORKER_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="AUTHOPT_WORKER_", frozen=True, extra="forbid")

    app_id: str = Field("authopt-features", description="Faust app id: the consumer group")
    partitions: int = Field(
        4, ge=1, le=1024, description="partitions of the attempts and features topics (created if missing)"
    )
    replication_factor: int = Field(
        1, ge=1, le=16, description="replication of the topics the worker creates"
    )
    store: Literal["memory://", "rocksdb://"] = Field(
        "memory://", description="table store: memory (rebuilt from the topic) or RocksDB on disk"
    )
    data_dir: Path = Field(Path("/tmp/authopt-worker"), description="Faust data directory (RocksDB files)")
    batch_max: int = Field(5000, ge=1, le=100_000, description="most events folded per batch")
    publish_interval_s: float = Field(
        0.1,
        gt=0,
        le=60,
        description="a batch closes after this long: at most one snapshot per entity per batch",
    )
    lateness_s: float = Field(
        DEFAULT_LATENESS_S, gt=0, description="events older than this before their receipt go to the DLQ"
    )
    max_future_s: float = Field(
        DEFAULT_MAX_FUTURE_S, ge=0, description="events newer than this after their receipt go to the DLQ"
    )
    stall_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a partition with records past its position and no event for this long is sought back",
    )
    stats_interval_s: float = Field(10.0, gt=0, description="how often the worker logs its counters")
    health_host: str = Field("127.0.0.1", description="address of the health endpoint; 0.0.0.0 in a pod")
    health_port: int = Field(
        -1, ge=-1, le=65535, description="HTTP port of /livez and /readyz (streams/health.py); -1 off, 0 free"
    )
    stats_file: Path | None = Field(
        None, description="also write the counters as JSON to this file at each stats tick and at exit"
    )
    local_broker: bool = Field(
        False, description="apply the local Tansu broker accommodations (streams.local_kafka)"
    )
    local_broker_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="workers sharing the local broker; above 1 adds the rebalance accommodation",
    )
    online_store: str = Field(
        "",
        description="redis:// or rediss:// URL: card x merchant rows also written there (streams/online.py)",
    )
    online_store_password_file: Path | None = Field(
        None, description="file holding the online store's password (instead of one in the URL)"
    )
    online_store_ttl_s: int = Field(
        DEFAULT_TTL_S, ge=60, description="a card x merchant row expires this long after its last write"
    )
    online_store_unwritten_max: int = Field(
        200_000,
        ge=0,
        description="card rows kept to retry while the online store fails (newest kept; then rebuild-store)",
    )


@dataclass
class WorkerStats:
    """Counters since start (logged every stats_interval_s)."""

    applied: int = 0
    duplicates: int = 0
    snapshots: int = 0
    batches: int = 0
    repairs: int = 0
    store_rows: int = 0  # card rows written to the online store
    store_failures: int = 0  # batches whose online-store write failed (their rows retried later)
    store_dropped: int = 0  # rows given up beyond online_store_unwritten_max (rebuild-store restores)
    dead: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    health_port: int | None = None  # the bound health port, when the endpoint is on

    def as_dict(self) -> dict[str, Any]:
        """The counters as JSON-ready values; `events` counts every event taken from the topic."""
        dead = dict(sorted(self.dead.items()))
        return {
            "events": self.applied + self.duplicates + sum(dead.values()),
            "applied": self.applied,
            "duplicates": self.duplicates,
            "dead_lettered": dead,
            "snapshots": self.snapshots,
            "batches": self.batches,
            "repairs": self.repairs,
            "store_rows": self.store_rows,
            "store_failures": self.store_failures,
            "store_dropped": self.store_dropped,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "health_port": self.health_port,
        }

    def write(self, path: Path) -> None:
        """Write `as_dict()` to `path` atomically (a reader never sees half a file)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.as_dict()))
        tmp.replace(path)

    def line(self) -> str:
        rate = self.applied / max(time.monotonic() - self.started, 1e-9)
        dead = ", ".join(f"{k}={v}" for k, v in sorted(self.dead.items())) or "none"
        return (
            f"worker: {self.applied} events applied ({rate:.0f}/s since start), "
            f"{self.duplicates} duplicates ignored, {self.snapshots} snapshots in {self.batches} batches, "
            f"dead-lettered: {dead}"
            + (f", {self.repairs} consumer repairs" if self.repairs else "")
            + (f", {self.store_rows} card rows to the online store" if self.store_rows else "")
            + (f", {self.store_failures} failed store writes" if self.store_failures else "")
        )


def _links(events: Sequence[Any]) -> list[trace.Link]:
    links: list[trace.Link] = []
    propagator = TraceContextTextMapPropagator()
    for event in events:
        headers = event.headers
        if not headers:
            continue
        items = headers.items() if hasattr(headers, "items") else headers
        carrier = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in items}
        if "traceparent" not in carrier:
            continue
        ctx = trace.get_current_span(propagator.extract(carrier)).get_span_context()
        if ctx.is_valid:
            links.append(trace.Link(ctx))
            if len(links) >= _MAX_LINKS:
                break
    return links


def _credentials(kafka: KafkaSettings) -> Any:
    import faust

    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value(),
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.ssl_context(),
        )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(kafka.ssl_context())
    return None


async def _send_changelog(app: Any, partition: int, records: Sequence[tuple[bytes, bytes]]) -> list[Any]:
    """Send one partition's changelog records as producer batches; returns their delivery futures.

    Faust's own changelog path (Table.__setitem__ -> send_soon) hands records over one event-loop
    turn at a time, ~10x slower than the arithmetic here; its Producer.send still costs a signal and
    a coroutine per record. aiokafka's batch API appends records to a batch directly (what its send()
    does underneath) and submits each full batch once. Batches honour the producer's
    max_batch_size, so the local broker's one-record batches (FAUST_SETTINGS_SHARED) still hold.
    The table is co-partitioned with the source.
    """
    if not records:
        return []
    producer = getattr(app.producer, "_producer", None)  # the aiokafka producer Faust started
    futures: list[Any] = []
    if producer is None:  # none started (Faust's test_context): one send per record
        for key, value in records:
            futures.append(await app.producer.send(FEATURES_TOPIC, key, value, partition, None, None))
        return futures
    batch = producer.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: submit, start another
            batch.close()
            futures.append(await producer.send_batch(batch, FEATURES_TOPIC, partition=partition))
            batch = producer.create_batch()
            # An empty batch takes any one record (aiokafka lets the first exceed max_batch_size;
            # the broker's message size limit still applies). Never drop one silently.
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise RuntimeError(f"changelog record {key!r} does not fit an empty producer batch")
    if batch.record_count():
        batch.close()
        futures.append(await producer.send_batch(batch, FEATURES_TOPIC, partition=partition))
    return futures


async def _dead_letter(dlq: Any, event: Any, partition: int, reason: str, detail: str) -> Any:
    """Send the original record to the dead-letter topic with why; returns the delivery future."""
    return await dlq.send(
        key=event.key,
        value=event.value,
        headers=[
            ("authopt-dlq-reason", reason.encode()),
            ("authopt-dlq-detail", detail.encode()),
            ("authopt-dlq-source", f"{ATTEMPTS_TOPIC}/{partition}/{event.message.offset}".encode()),
        ],
    )


def _faust_app(settings: WorkerSettings, kafka: KafkaSettings) -> Any:
    import faust

    extra: dict[str, Any] = {}
    if settings.local_broker:
        from streams.local_kafka import FAUST_SETTINGS, FAUST_SETTINGS_SHARED, apply_client_patches

        apply_client_patches()
        extra.update(FAUST_SETTINGS)
        if settings.local_broker_workers > 1:
            extra.update(FAUST_SETTINGS_SHARED)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host.strip()}" for host in kafka.bootstrap.split(",")],
        broker_credentials=_credentials(kafka),
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        **extra,
    )
    return app


class _BatchHandler:
    """Folds one `take_events` batch into the table and sends its snapshots and dead letters."""

    def __init__(
        self,
        app: Any,
        store: Any,
        processor: FeatureProcessor,
        dlq: Any,
        stats: WorkerStats,
        *,
        end_marker: bool,
        stall_s: float = 10.0,
        online: OnlineStore | None = None,
        unwritten_max: int = 200_000,
    ) -> None:
        self.app, self.store, self.processor, self.dlq, self.stats = app, store, processor, dlq, stats
        self.online = online
        self.unwritten: dict[str, str] = {}  # card rows whose store write failed, to retry
        self.unwritten_max = unwritten_max
        self.end_marker = end_marker
        self.progress = PartitionProgress(stall_s)
        self.stalled: set[int] = set()  # attempts partitions the last watch found stalled, until they move

    async def seek(self, partition: int, offset: int, why: str) -> None:
        """Seek one attempts partition back (streams.progress): what comes twice changes nothing."""
        from faust.types import TP

        log.warning("worker: %s/%d %s; seeking back to offset %d", ATTEMPTS_TOPIC, partition, why, offset)
        self.stats.repairs += 1
        await self.app.consumer.seek(TP(ATTEMPTS_TOPIC, partition), offset)

    async def watch(self) -> None:
        """Seek back every partition that holds records past its position and has not moved for stall_s."""
        app = self.app
        if app.rebalancing:
            return
        consumer = app.consumer
        tps = [tp for tp in consumer.assignment() if tp.topic == ATTEMPTS_TOPIC]
        if not tps:
            return
        ends = {tp.partition: end for tp, end in (await consumer.highwaters(*tps)).items() if end is not None}
        # Faust keeps the offsets it sought to at assignment here; it has no public accessor.
        committed = {tp.partition: consumer._committed_offset.get(tp) for tp in tps}
        stalled = self.progress.stalled(ends, committed, time.monotonic(), app.consumer_generation_id)
        self.stalled |= set(stalled)
        for partition, offset in stalled.items():
            await self.seek(
                partition,
                offset,
                f"stalled ({ends[partition]} is the end, nothing taken for {self.progress.stall_s:g}s)",
            )

    async def _write_online(self, cards: Mapping[str, EntityState]) -> None:
        """The batch's card rows (and any a failed write left) to the online store, one round trip.

        A failure never stops the changelog, the source of truth: the rows are kept (newest per
        card, at most `unwritten_max`) and retried with the next batch; beyond that they are
        counted as dropped and `authopt features rebuild-store` restores them.
        """
        assert self.online is not None
        values = self.unwritten
        values.update((k, card_value(st)) for k, st in cards.items())
        try:
            await self.online.write_values(values)
        except Exception as e:
            self.stats.store_failures += 1
            if self.stats.store_failures == 1 or self.stats.store_failures % 100 == 0:
                log.warning(
                    "worker: online store write failed (%d so far), %d card rows kept to retry: %r",
                    self.stats.store_failures,
                    len(values),
                    e,
                )
            while len(values) > self.unwritten_max:
                del values[next(iter(values))]
                self.stats.store_dropped += 1
            return
        self.stats.store_rows += len(values)
        self.unwritten = {}

    def _expected(self, partition: int, generation: int | None) -> int | None:
        """The offset this partition's consumer stands at: all below it processed or committed."""
        if self.progress.generation == generation and partition in self.progress.next:
            return self.progress.next[partition]
        from faust.types import TP

        # A new generation starts each partition at its committed offset (Faust keeps the offsets it
        # sought to at assignment here; no public accessor).
        committed = self.app.consumer._committed_offset.get(TP(ATTEMPTS_TOPIC, partition))
        return committed if isinstance(committed, int) else None

    async def __call__(self, events: Sequence[Any]) -> None:
        from faust.streams import _current_event

        by_partition: dict[int, list[Any]] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).append(event)
        deliveries = []
        cards: dict[str, EntityState] = {}
        gaps: dict[int, int] = {}
        generation, now = self.app.consumer_generation_id, time.monotonic()
        for partition, part in by_partition.items():
            offsets: list[int] | None = None
            expected: int | None = None
            if part[0].message.generation_id in (generation, None):  # else fetched before a rebalance
                offsets = [e.message.offset for e in part]
                expected = self._expected(partition, generation)
                seek = self.progress.observe(partition, offsets, now, generation, expected)
                self.stalled.discard(partition)
                if seek is not None:
                    gaps[partition] = seek
            # Table writes go to the changelog partition of Faust's "current event"; a batch mixes
            # partitions, so make one of this partition's events current while writing its states.
            token = _current_event.set(weakref.ref(part[-1]))
            outbox: list[tuple[bytes, bytes]] = []

            def write(key: bytes, value: bytes, outbox: list[tuple[bytes, bytes]] = outbox) -> None:
                self.store[key] = value
                outbox.append((key, value))

            try:
                with tracer.start_as_current_span(
                    "authopt.features.update",
                    links=_links(part),
                    attributes={"messaging.kafka.partition": partition, "authopt.events": len(part)},
                ) as span:
                    result = self.processor.process(
                        partition, [e.value for e in part], write, offsets, expected
                    )
                    span.set_attribute("authopt.snapshots", len(result.snapshots))
                    span.set_attribute("authopt.dead_letters", len(result.dead))
            finally:
                _current_event.reset(token)
            deliveries += await _send_changelog(self.app, partition, outbox)
            cards.update(result.cards)
            self.stats.applied += len(result.applied)
            self.stats.duplicates += result.duplicates
            self.stats.snapshots += len(result.snapshots)
            for dead in result.dead:
                event = part[dead.index]
                self.stats.dead[dead.reason.value] += 1
                log.warning(
                    "dead letter %s at %s/%d/%d: %s",
                    dead.reason.value,
                    ATTEMPTS_TOPIC,
                    partition,
                    event.message.offset,
                    dead.detail,
                )
                deliveries.append(
                    await _dead_letter(self.dlq, event, partition, dead.reason.value, dead.detail)
                )
        self.stats.batches += 1
        if self.online is not None and (cards or self.unwritten):
            await self._write_online(cards)
        # The batch's events are acked (then committed) only once every snapshot and dead letter
        # is on the broker: a crash before that replays them, and replays change nothing.
        if deliveries:
            await asyncio.gather(*deliveries)
            if self.end_marker:
                from streams.local_kafka import end_changelog_batches

                await end_changelog_batches(self.app, by_partition)
        for partition, offset in gaps.items():
            await self.seek(partition, offset, "skipped offsets never taken")


def make_app(settings: WorkerSettings, kafka: KafkaSettings) -> tuple[Any, WorkerStats]:
    """Build the Faust app (not started); returns it and its live counters."""
    import faust

    if not kafka.bootstrap:
        raise ValueError("AUTHOPT_KAFKA_BOOTSTRAP is empty: the worker needs a Kafka to consume from")
    app = _faust_app(settings, kafka)

    def raw_topic(name: str, **options: Any) -> Any:
        # Bytes in, bytes out; created with our partition count when missing.
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
            internal=True,
            **options,
        )

    attempts, dlq = raw_topic(ATTEMPTS_TOPIC), raw_topic(DLQ_TOPIC)
    features = raw_topic(FEATURES_TOPIC, compacting=True)
    states = app.Table(
        "feature-state",
        partitions=settings.partitions,
        changelog_topic=features,
        key_type=bytes,  # "raw" for the store too (RocksDB would otherwise decode values as JSON)
        value_type=bytes,
        schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
    )
    # Read and write the table's store directly: the Table's mapping methods add a few Python
    # layers per access, and the memory store is a plain dict underneath.
    store: Any = states.data
    if isinstance(getattr(store, "data", None), dict):
        store = store.data
    processor = FeatureProcessor(store, lateness_s=settings.lateness_s, max_future_s=settings.max_future_s)
    stats = WorkerStats()

    online = None
    if settings.online_store:
        password = None
        if settings.online_store_password_file is not None:
            password = settings.online_store_password_file.read_text().strip()
        online = OnlineStore(settings.online_store, password=password, ttl_s=settings.online_store_ttl_s)
    handle = _BatchHandler(
        app,
        store,
        processor,
        dlq,
        stats,
        end_marker=settings.local_broker,
        stall_s=settings.stall_s,
        online=online,
        unwritten_max=settings.online_store_unwritten_max,
    )

    @app.agent(attempts, name="update-features", concurrency=1)  # type: ignore[untyped-decorator]
    async def update_features(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.publish_interval_s):
            await handle(events)

    @app.timer(max(0.5, settings.stall_s / 4))  # type: ignore[untyped-decorator]
    async def watch_progress() -> None:
        await handle.watch()

    if settings.health_port >= 0:
        _add_health(app, handle, settings, stats)

    @app.timer(settings.stats_interval_s)  # type: ignore[untyped-decorator]
    async def log_stats() -> None:
        log.info("%s", stats.line())
        if settings.stats_file is not None:
            stats.write(settings.stats_file)

    return app, stats


def _add_health(app: Any, handle: _BatchHandler, settings: WorkerSettings, stats: WorkerStats) -> None:
    """Serve /livez and /readyz (streams.health) on the worker's loop once the app starts."""
    servers: list[Any] = []  # kept referenced while the app runs

    @app.task  # type: ignore[untyped-decorator]
    async def health() -> None:
        server = await serve_health(
            settings.health_host, settings.health_port, lambda: _readiness(app, handle)
        )
        servers.append(server)
        stats.health_port = int(server.sockets[0].getsockname()[1])
        if settings.stats_file is not None:
            stats.write(settings.stats_file)


def _readiness(app: Any, handle: _BatchHandler) -> tuple[bool, str]:
    """Ready when the table is recovered, no rebalance is under way and no attempts partition this
    worker owns is stalled."""
    if app.rebalancing:
        return False, "rebalancing"
    recovery = getattr(app.tables, "recovery", None)
    completed = getattr(recovery, "completed", None)
    if completed is None or not completed.is_set():
        return False, "recovering the feature table"
    if handle.stalled:
        return False, f"{ATTEMPTS_TOPIC} partitions {sorted(handle.stalled)} stalled (being sought back)"
    try:
        owned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == ATTEMPTS_TOPIC)
    except Exception:
        return False, "no consumer yet"
    return True, f"consuming {ATTEMPTS_TOPIC} partitions {owned}" if owned else "idle: no partitions assigned"


async def _kafka_answers(kafka: KafkaSettings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap, request_timeout_ms=5000, **kafka.client_options()
    )
    try:
        await admin.start()
    finally:
        await admin.close()


def wait_for_kafka(kafka: KafkaSettings, *, max_backoff_s: float = 10.0) -> None:
    """Block until the bootstrap servers answer, retrying with exponential backoff and saying so."""
    backoff, attempt = 0.5, 1
    while True:
        try:
            asyncio.run(_kafka_answers(kafka))
            if attempt > 1:
                log.info("worker: Kafka at %s answers (after %d attempts)", kafka.bootstrap, attempt)
            return
        except Exception as exc:
            log.warning(
                "worker: Kafka at %s unreachable (attempt %d: %s); retrying in %.1fs",
                kafka.bootstrap,
                attempt,
                exc or type(exc).__name__,
                backoff,
            )
        time.sleep(backoff)
        backoff, attempt = min(backoff * 2, max_backoff_s), attempt + 1


def run_worker(settings: WorkerSettings, kafka: KafkaSettings, *, loglevel: str = "info") -> None:
    """Wait for Kafka, then run the worker until SIGTERM/SIGINT (blocking)."""
    from faust.worker import Worker

    wait_for_kafka(kafka)
    if settings.local_broker:
        from streams.local_kafka import seal_changelog

        sealed = asyncio.run(seal_changelog(kafka.bootstrap))
        log.info(
            "worker: sealed %d partition(s) of %s before recovery (local broker)", sealed, FEATURES_TOPIC
        )
    app, stats = make_app(settings, kafka)
    log.info(
        "authopt worker: %s -> %s (%d partitions, store %s, batch <= %d events / %.2fs)%s",
        ATTEMPTS_TOPIC,
        FEATURES_TOPIC,
        settings.partitions,
        settings.store,
        settings.batch_max,
        settings.publish_interval_s,
        ", local broker accommodations on" if settings.local_broker else "",
    )
    worker = Worker(app, loglevel=loglevel, quiet=True, override_logging=False)
    try:
        worker.execute_from_commandline()
    finally:
        log.info("%s", stats.line())
        if settings.stats_file is not None:
            stats.write(settings.stats_file)
