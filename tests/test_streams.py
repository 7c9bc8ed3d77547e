"""Streams through the real local broker: worker process + replica vs the offline replay.

Each test starts its own Tansu broker (in memory, 127.0.0.1, a free port) and `authopt worker`
processes, and stops them worker first, broker last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.v1 import events_pb2, optimizer_pb2, optimizer_pb2_grpc
from server import ServerSettings, create_server
from streams.broker import LocalBroker, LocalWorker, free_port, start_broker, start_worker
from streams.contract import Entity
from streams.kafka import ATTEMPTS_TOPIC, DLQ_TOPIC, KafkaSettings
from streams.replay import replay_final
from streams.replica import FeatureReplica
from streams.store import InMemoryFeatureStore
from tests.conftest import ServerFactory, make_request
from tests.events import T0, event, random_events
from tests.test_outcomes import make_outcome

pytestmark = pytest.mark.timeout(240)

WorkerFactory = Callable[..., LocalWorker]


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


@pytest.fixture
def workers(broker: LocalBroker, tmp_path: Path) -> Iterator[WorkerFactory]:
    started: list[LocalWorker] = []

    def factory(**env: str) -> LocalWorker:
        w = start_worker(
            broker.bootstrap,
            tmp_path / f"worker-{len(started)}.log",
            env={"AUTHOPT_WORKER_PUBLISH_INTERVAL_S": "0.1", "AUTHOPT_WORKER_STATS_INTERVAL_S": "1", **env},
        )
        started.append(w)
        return w

    yield factory
    for w in started:  # workers before the broker (the broker fixture is torn down after this one)
        w.stop(timeout_s=10)


async def produce(
    bootstrap: str, records: list[bytes], headers: list[tuple[str, bytes]] | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for raw in records:
            try:
                key = events_pb2.AttemptEvent.FromString(raw).outcome.attempt.card.fingerprint.encode()
            except Exception:
                key = b"garbage"
            await producer.send(ATTEMPTS_TOPIC, raw, key=key, headers=headers or [])
        await producer.flush()
    finally:
        await producer.stop()


async def attempts_on_broker(bootstrap: str, group: str = "authopt-features") -> str:
    """What the broker holds of the attempts topic, per partition: records read from the start,
    the end offset it reports and the group's committed offset (for a stalled worker's report)."""
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(ATTEMPTS_TOPIC) or ())
        tps = [TopicPartition(ATTEMPTS_TOPIC, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
        await consumer.seek_to_beginning(*tps)
        seen = {tp: 0 for tp in tps}
        last = {tp: -1 for tp in tps}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            if not batch:
                break
            for tp, records in batch.items():
                seen[tp] += len(records)
                last[tp] = records[-1].offset
        return "; ".join(
            f"p{tp.partition}: {seen[tp]} read (last offset {last[tp]}), "
            f"end {ends[tp]}, committed {committed[tp]}"
            for tp in tps
        )
    finally:
        await consumer.stop()


def _route_events(replica: FeatureReplica) -> int:
    return sum(replica.materializer.events_for(Entity.ROUTE, r) for r in ("acq-a", "acq-b", "acq-c"))


@contextlib.asynccontextmanager
async def following(bootstrap: str) -> AsyncIterator[FeatureReplica]:
    """A replica of the features topic in this process, stopped on exit."""
    replica = FeatureReplica(KafkaSettings.for_bootstrap(bootstrap), InMemoryFeatureStore())
    replica.start()
    try:
        yield replica
    finally:
        await replica.stop()


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.1)


def assert_same_rows(online: InMemoryFeatureStore, offline: InMemoryFeatureStore) -> None:
    a, b = online.rows(), offline.rows()
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for key, row in b.items():
        assert a[key].as_of == pytest.approx(row.as_of, abs=1e-6), key
        assert dict(a[key].values) == pytest.approx(dict(row.values), rel=1e-9, abs=1e-9), key


async def test_parity_dead_letters_and_duplicates(broker: LocalBroker, workers: WorkerFactory) -> None:
    evs = random_events(600, seed=11)
    records = [e.SerializeToString() for e in evs]
    records += records[100:130]  # a caller reporting 30 outcomes twice
    bad = [
        b"\x0a\xff\xff\xff",  # undecodable
        event("neg", T0, amount_minor=-1).SerializeToString(),
        event("late", T0 - 7200, received_at=T0).SerializeToString(),
        event("future", T0 + 7200, received_at=T0).SerializeToString(),
    ]
    records[200:200] = bad
    worker = workers()
    await produce(broker.bootstrap, records)

    async with following(broker.bootstrap) as replica:
        await wait_for(lambda: _route_events(replica) >= 600, 90, "600 events in the replica")
        await asyncio.sleep(1.0)  # anything more (double counting) would arrive by now
        assert _route_events(replica) == 600  # 600 distinct valid events; duplicates and bad ones add nothing
        assert_same_rows(replica.store, replay_final(records))

    dead = await consume(broker.bootstrap, DLQ_TOPIC, 4)
    reasons = sorted(dict(h)["authopt-dlq-reason"].decode() for _, h in dead)
    assert reasons == ["EVENT_IN_FUTURE", "EVENT_TOO_LATE", "NEGATIVE_AMOUNT", "UNDECODABLE"]
    assert sorted(v for v, _ in dead) == sorted(bad)  # the original bytes, untouched
    await wait_for(lambda: "duplicates ignored" in worker.log_text(), 10, "a stats line")
    assert worker.process.poll() is None  # bad input never crashed it


async def consume(
    bootstrap: str, topic: str, n: int, timeout_s: float = 20
) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[tuple[bytes, list[tuple[str, bytes]]]] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < n:
                for recs in (await consumer.getmany(timeout_ms=300)).values():
                    out += [(r.value, list(r.headers)) for r in recs]
    finally:
        await consumer.stop()
    return out


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
async def test_restart_after_a_crash_does_not_double_count(
    broker: LocalBroker, workers: WorkerFactory, store: str, tmp_path: Path
) -> None:
    first = [e.SerializeToString() for e in random_events(300, seed=21)]
    second = [e.SerializeToString() for e in random_events(200, seed=22, start=T0 + 7200)]
    env = {"AUTHOPT_WORKER_STORE": store, "AUTHOPT_WORKER_DATA_DIR": str(tmp_path / "data")}
    w1 = workers(**env)
    await produce(broker.bootstrap, first)
    async with following(broker.bootstrap) as replica:
        await wait_for(lambda: _route_events(replica) >= 300, 90, "the first 300 events")
        w1.process.kill()  # a crash: whatever it had not committed is processed again by the next one
        w1.process.wait(10)
        w2 = workers(**env)  # memory: state rebuilt from the features topic; RocksDB: from its files
        await produce(broker.bootstrap, second + first[:50])  # and a caller re-sending 50 old reports
        try:
            await wait_for(lambda: _route_events(replica) >= 500, 60, "all 500 events after the restart")
        except AssertionError:
            # Known liveness problem on the local broker (docs/streams.md, "Known problem"): now and
            # then a restarted worker stops consuming. Keep its task stacks in the test output, then
            # restart it once more: the counts below must still be exact after two restarts.
            w2.process.send_signal(signal.SIGUSR1)  # Faust's worker logs every task's stack
            time.sleep(1)
            print(f"restarted worker stalled at {_route_events(replica)} events")
            print("attempts on the broker:", await attempts_on_broker(broker.bootstrap))
            print("its log:")
            print("\n".join(w2.log_text().splitlines()[-150:]))
            w2.stop()
            w3 = workers(**env)
            try:
                await wait_for(
                    lambda: _route_events(replica) >= 500, 90, "the 500 events after a second restart"
                )
            except AssertionError:
                print(f"second restart stalled at {_route_events(replica)} events")
                print("attempts on the broker:", await attempts_on_broker(broker.bootstrap))
                print("\n".join(w3.log_text().splitlines()[-60:]))
                raise
        await asyncio.sleep(1.5)
        assert _route_events(replica) == 500
        assert_same_rows(replica.store, replay_final(first + second))


async def test_server_ready_only_after_the_replica_caught_up(
    broker: LocalBroker, workers: WorkerFactory, model_dir: Path
) -> None:
    records = [
        e.SerializeToString() for e in random_events(400, seed=31, start=time.time() - 600, span_s=540)
    ]
    w = workers()
    await produce(broker.bootstrap, records)
    async with following(broker.bootstrap) as follower:
        await wait_for(lambda: _route_events(follower) >= 400, 90, "the worker to publish")
    w.stop()

    settings = ServerSettings(
        port=0,
        host="127.0.0.1",
        kafka=KafkaSettings.for_bootstrap(broker.bootstrap),
        exploration_rate=0.0,
        model_dir=model_dir,
    )
    server, port = await create_server(settings)
    assert server.replica is not None
    statuses: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await server.start()
        try:
            # Not ready before the replica has read the topic (the server answers, from fallbacks).
            first = await server.health.Check(health_pb2.HealthCheckRequest(), None)  # type: ignore[arg-type]
            assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # ... but alive: a liveness probe must not restart a pod that is catching up.
            alive = await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
            while True:
                status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
                statuses.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            # SERVING means caught up: every row the topic holds is already in memory.
            assert_same_rows(server.replica.store, replay_final(records))
            stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
            resp = await stub.Recommend(make_request(), timeout=5)
            # the replica's route features are fresh enough for the model to decide
            assert resp.feature_age_ms > 0 and resp.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL

            status = server.replica.status()
            assert status["ready"] and status["connected"] and status["rows"] == len(server.replica.store)
            # Broker gone: the replica keeps the last values and the server keeps answering from them.
            rows = len(server.replica.store)
            broker.stop()
            await wait_for(
                lambda: not server.replica.connected, 20, "the replica to notice the broker is gone"
            )
            assert len(server.replica.store) == rows
            again = await stub.Recommend(make_request("req-2"), timeout=5)
            assert again.feature_age_ms >= resp.feature_age_ms
        finally:
            await server.stop(grace=0.5)


async def test_worker_waits_for_an_unreachable_broker(tmp_path: Path) -> None:
    port = free_port()
    worker = start_worker(f"127.0.0.1:{port}", tmp_path / "worker.log")
    try:
        await wait_for(
            lambda: "unreachable (attempt 2" in worker.log_text(), 30, "the worker's retry log line"
        )
        assert worker.process.poll() is None  # waiting, not crashed
        with start_broker(port) as late_broker:
            records = [e.SerializeToString() for e in random_events(100, seed=41)]
            await produce(late_broker.bootstrap, records)
            async with following(late_broker.bootstrap) as replica:
                await wait_for(
                    lambda: _route_events(replica) == 100, 90, "the worker to catch up once the broker is up"
                )
            assert worker.stop() in (0, -15)  # stopped before its broker
    finally:
        worker.stop()


def test_authopt_broker_command_runs_and_stops(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "broker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"broker pid (\d+) listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        pid, port = int(match[1]), int(match[2])
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert "AUTHOPT_KAFKA_BOOTSTRAP=127.0.0.1:" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "broker stopped" in out
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the broker went with it
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_feature_update_span_links_to_the_reported_outcome(
    broker: LocalBroker, workers: WorkerFactory, start_server: ServerFactory
) -> None:
    # The whole chain, across processes: a caller's trace -> ReportOutcome (server) -> record
    # headers -> the worker's update span, exported by the worker through OTEL_TRACES_EXPORTER.
    worker = workers(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="authopt-worker-test")
    srv = await start_server(kafka=KafkaSettings.for_bootstrap(broker.bootstrap))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await srv.stub.ReportOutcome(
        optimizer_pb2.ReportOutcomeRequest(outcome=make_outcome("ev-traced")),
        timeout=15,
        metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
    )
    await wait_for(lambda: "1 events applied" in worker.log_text(), 60, "the worker to apply the outcome")
    assert worker.stop() in (0, -15)  # a clean stop flushes the spans
    log = worker.log_text()
    spans = [s for s in log.split('"name": "')[1:] if s.startswith("authopt.features.update")]
    assert spans, "no authopt.features.update span exported"
    assert any(f'"trace_id": "0x{trace_id}"' in s.split('"resource"')[0] for s in spans)


async def test_worker_health_endpoint_answers_liveness_and_readiness(
    broker: LocalBroker, workers: WorkerFactory, tmp_path: Path
) -> None:
    """/livez while the loop turns; /readyz 503 until the table is recovered, then 200 naming the
    partitions it consumes; anything else 404 (streams/health.py)."""
    import urllib.error
    import urllib.request

    stats_file = tmp_path / "stats.json"
    w = workers(AUTHOPT_WORKER_HEALTH_PORT="0", AUTHOPT_WORKER_STATS_FILE=str(stats_file))

    def port() -> int | None:
        try:
            return json.loads(stats_file.read_text()).get("health_port")
        except (OSError, ValueError):
            return None

    await wait_for(lambda: port() is not None, 60, "the health port in the stats file")

    def get(path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port()}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert get("/livez") == (200, {"status": "alive"})
    assert get("/nowhere")[0] == 404
    await wait_for(lambda: get("/readyz")[0] == 200, 60, "readiness")
    _, doc = get("/readyz")
    assert doc["status"] == "ready" and ATTEMPTS_TOPIC in doc["detail"], doc
    await produce(broker.bootstrap, [e.SerializeToString() for e in random_events(50, seed=5)])
    await asyncio.sleep(1.0)
    assert get("/readyz")[0] == 200 and get("/livez")[0] == 200
    assert w.process.poll() is None
