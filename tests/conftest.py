"""Shared fixtures: env isolation, tiny model artifacts, real servers on port 0, in-memory spans."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authopt.samples import sample_request
from authopt.v1 import events_pb2, optimizer_pb2, optimizer_pb2_grpc
from model import make_tiny_artifact
from server import AuthoptServer, InMemoryFeatureStore, ServerSettings, create_server
from sim import load_world
from sim.config import WorldConfig
from streams import Entity, entity_key

_SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_SPANS))
trace.set_tracer_provider(_provider)

ROUTES = (("acq-a", 180, 10), ("acq-b", 150, 25), ("acq-c", 250, 0))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AUTHOPT_"):
            monkeypatch.delenv(key)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _SPANS.clear()
    yield _SPANS
    _SPANS.clear()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory holding one tiny artifact, version "1"."""
    d = tmp_path / "models"
    make_tiny_artifact(d, "1")
    return d


def make_request(request_id: str = "req-1", **attempt_overrides: Any) -> optimizer_pb2.RecommendRequest:
    """A valid RecommendRequest over ROUTES for a Visa credit card (`authopt.samples`)."""
    return sample_request(request_id, ROUTES, **attempt_overrides)


def small_default_world(payments_per_hour: float, hours: float, cards: int) -> WorldConfig:
    """The default world at the given size, without issuer outages (scheduled or random): a test adds
    the one incident it measures."""
    config = load_world("default")
    return config.model_copy(
        update={
            "traffic": config.traffic.model_copy(
                update={"payments_per_hour": payments_per_hour, "hours": hours}
            ),
            "cards": config.cards.model_copy(update={"count": cards}),
            "issuers": [
                i.model_copy(
                    update={
                        "outages": [],
                        "random_outages": i.random_outages.model_copy(update={"per_day": 0.0}),
                    }
                )
                for i in config.issuers
            ],
        }
    )


def fill_route_features(store: InMemoryFeatureStore, as_of: float | None = None) -> None:
    """Route-level features for every route in ROUTES (fresh unless `as_of` says otherwise)."""
    for i, (route, _, _) in enumerate(ROUTES):
        store.put(
            Entity.ROUTE,
            entity_key(Entity.ROUTE, route=route),
            {"approval_rate_1h": 0.9 - 0.1 * i, "attempts_1h": 500.0, "approval_rate_24h": 0.85},
            as_of if as_of is not None else time.time(),
        )


class Recording:
    """An OutcomePublisher that keeps what it is given (the broker's part is tested elsewhere)."""

    def __init__(self) -> None:
        self.events: list[events_pb2.AttemptEvent] = []

    async def publish(self, events: Sequence[events_pb2.AttemptEvent]) -> None:
        self.events.extend(events)

    async def close(self) -> None:
        return None


class CardRowsInRedis:
    """The replica's feature store as a test writes it, with the card rows (card x merchant, and
    card x merchant x amount) going to the online store instead, as the worker would write them
    (`streams.online`: one JSON row per card x merchant holding its amount counts); every other
    entity, and every read, goes to the in-memory store."""

    def __init__(self, memory: InMemoryFeatureStore, url: str) -> None:
        import redis

        self._memory = memory
        self._redis = redis.Redis.from_url(url)
        self._rows: dict[str, dict[str, Any]] = {}

    def put(self, entity: Entity, key: str, values: Any, as_of: float | None = None) -> None:
        from streams.contract import CONTRACT_HASH
        from streams.online import _DEFAULT_PREFIX

        if entity not in (Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT):
            self._memory.put(entity, key, values, as_of)
            return
        as_of = time.time() if as_of is None else as_of
        fingerprint, merchant, *amount = key.split("|")
        card = f"{fingerprint}|{merchant}"
        row = self._rows.setdefault(card, {"h": CONTRACT_HASH, "t": as_of, "v": {}, "a": {}})
        if entity is Entity.CARD_MERCHANT:
            row["v"], row["t"] = dict(values), as_of
        else:
            row["a"][amount[0]] = float(values.get("attempts_30d", 0.0))
            row["t"] = max(row["t"], as_of)
        self._redis.set(f"{_DEFAULT_PREFIX}cm:{card}", json.dumps(row))

    def close(self) -> None:
        self._redis.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._memory, name)


class Running:
    """A started server, its port and a stub on a real channel."""

    def __init__(
        self, server: AuthoptServer, port: int, channel: grpc.aio.Channel, store_url: str | None = None
    ) -> None:
        self.server = server
        self.port = port
        self.channel = channel
        self.stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
        store = server.features
        assert isinstance(store, InMemoryFeatureStore)
        # one writer for the server's life: a card's row is written whole, from what this test set of
        # it so far (a later amount row must not write the card's values over with nothing)
        self._features = store if store_url is None else CardRowsInRedis(store, store_url)

    @property
    def features(self) -> InMemoryFeatureStore:
        return self._features  # type: ignore[return-value]

    def close_store(self) -> None:
        if isinstance(self._features, CardRowsInRedis):
            self._features.close()


ServerFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
def card_store(request: pytest.FixtureRequest) -> str:
    """Where a started server keeps card state: "memory", or "redis" for a test marked both_stores
    in its second run."""
    return str(getattr(request, "param", "memory"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "start_server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_stores"):
        metafunc.parametrize("card_store", ["memory", "redis"], indirect=True)


@pytest.fixture
async def start_server(
    card_store: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerFactory]:
    """Factory: `await start_server(model_dir=..., **settings)` → Running; all stopped at teardown.
    With `card_store` "redis" the servers read card state from a real redis-server (started for
    the test) and `Running.features` writes card rows there."""
    running: list[Running] = []
    redis_proc = None
    store_url: str | None = None
    if card_store == "redis":
        redis_proc, store_url = _start_redis(tmp_path_factory.mktemp("redis"))

    async def factory(*, features: bool = True, publisher: Any = None, **overrides: Any) -> Running:
        online = {}
        if store_url is not None and "online_store" not in overrides:
            # every read reaches the store (no reuse), with time to answer on a loaded machine
            online = {
                "online_store": store_url,
                "online_store_cache_ttl_s": 0,
                "online_store_timeout_ms": 2000,
            }
        settings = ServerSettings(
            **{"port": 0, "host": "127.0.0.1", "exploration_rate": 0.0, **online, **overrides}
        )
        store = InMemoryFeatureStore()
        if features:
            fill_route_features(store)
        server, port = await create_server(settings, features=store, publisher=publisher)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        r = Running(server, port, channel, store_url if online else None)
        running.append(r)
        return r

    try:
        yield factory
    finally:
        for r in running:
            await r.channel.close()
            await r.server.stop(grace=0.5)
            r.close_store()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(5)


class RedisServer:
    """A redis-server process the test started, and its URL."""

    def __init__(self, url: str, process: Any) -> None:
        self.url = url
        self.process = process


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (a free port, nothing persisted), stopped at teardown.

    `scripts/setup --dev` installs it (Debian's redis-server); without it a test is skipped here
    and fails under CI, where a missing install step must not pass unnoticed."""
    import subprocess

    proc, url = _start_redis(tmp_path)
    try:
        yield RedisServer(url, proc)
    finally:
        proc.kill()  # also when the test left it stopped (SIGSTOP)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_redis(tmp_path: Path) -> tuple[Any, str]:
    """A redis-server process on a free port of 127.0.0.1, accepting connections, and its URL."""
    import shutil
    import socket
    import subprocess

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server not found: scripts/setup --dev installs it (Debian: redis-server)")
        pytest.skip("redis-server not found (Debian: redis-server; scripts/setup --dev installs it)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with open(tmp_path / "redis.log", "wb") as out:
        proc = subprocess.Popen([*args, "--dir", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((tmp_path / "redis.log").read_text()[-2000:]) from None
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"
