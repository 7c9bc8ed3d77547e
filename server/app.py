"""Server assembly and lifecycle: `create_server(settings) -> (server, port)` and `serve(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from authopt.v1 import optimizer_pb2, optimizer_pb2_grpc
from model.features import FeatureStore, InMemoryFeatureStore
from server import policy, validation
from server.auth import TokenAuth
from server.batcher import BatcherConfig, MicroBatcher
from server.decision import DecisionEngine, EngineConfig
from server.decision_log import DecisionLog, KafkaDecisionLog, NoDecisionLog
from server.errors import MalformedRequests
from server.health import HealthSettings, RouteHealth
from server.idempotency import IdempotencyCache, make_cache
from server.issuer_health import IssuerHealth, IssuerHealthSettings
from server.models import ModelRegistry, resolve_device
from server.publisher import OutcomePublisher, make_publisher
from server.service import OptimizerService
from server.settings import ServerSettings
from server.shadow import Shadow
from server.telemetry import Metrics
from streams.online import CardCache, OnlineCards, OnlineStore
from streams.replica import FeatureReplica

__all__ = ["LIVENESS_SERVICE", "AuthoptServer", "configure_process", "create_server", "freeze_heap", "serve"]

log = logging.getLogger(__name__)
SERVICE_NAME = optimizer_pb2.DESCRIPTOR.services_by_name["AuthorizationOptimizerService"].full_name
#: grpc.health.v1 name for liveness probes: SERVING from start to exit. "" and SERVICE_NAME are the
#: readiness: NOT_SERVING until the feature replica has caught up, and while draining.
LIVENESS_SERVICE = "liveness"
_TRANSPORT_LIMIT = 4 * 1024 * 1024  # hard cap in gRPC core; the settings' limit is checked per RPC


@dataclass
class Challenger:
    """The challenger's own parts: its versions (hot reloaded), its batcher, its shadow decisions."""

    registry: ModelRegistry
    batcher: MicroBatcher
    engine: DecisionEngine
    shadow: Shadow


@dataclass
class AuthoptServer:
    """A running authopt server: the grpc.aio server plus the tasks and resources it owns."""

    grpc_server: grpc.aio.Server
    settings: ServerSettings
    health: HealthServicer
    registry: ModelRegistry
    batcher: MicroBatcher
    publisher: OutcomePublisher
    features: FeatureStore
    metrics: Metrics
    metrics_http: Any = None  # the Prometheus HTTP server, when enabled
    replica: FeatureReplica | None = None  # follows authopt.features.v1 into `features`
    decision_log: DecisionLog = field(default_factory=NoDecisionLog)
    challenger: Challenger | None = None  # the shadow / A/B model (server/shadow.py)
    health_server: grpc.aio.Server | None = None  # plaintext, health only (settings.health_port)
    health_port: int | None = None
    cards: OnlineCards | None = None  # the online store of card rows, when configured
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _draining: bool = False

    async def start(self) -> None:
        """Load the model (if any), start the batcher and the model watcher, then serve."""
        await self.registry.refresh()
        await self.batcher.start()
        self.decision_log.start()
        self._tasks.append(asyncio.create_task(self.registry.run(), name="model-watcher"))
        if self.challenger is not None:
            await self.challenger.registry.refresh()
            await self.challenger.batcher.start()
            self._tasks.append(asyncio.create_task(self.challenger.registry.run(), name="challenger-watcher"))
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        # Liveness: the process is up with its model warm; never withdrawn for a catch-up or a drain
        # (Kubernetes restarts on liveness, and neither is a reason to).
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)  # type: ignore[arg-type]
        if self.replica is None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        else:
            # Answer from the start (fallbacks say why), but report ready only once the replica has
            # caught up with the features that exist, so a rollout never routes traffic to a cold pod.
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.replica.start()
            self._tasks.append(
                asyncio.create_task(self._serving_when_caught_up(self.replica), name="readiness")
            )

    async def _serving_when_caught_up(self, replica: FeatureReplica) -> None:
        await replica.ready.wait()
        if not self._draining:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)  # type: ignore[arg-type]

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, finish in-flight ones within `grace`, release."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace is None else grace
        self._draining = True
        log.info("draining: health NOT_SERVING, finishing in-flight RPCs within %.1fs", grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.drain_delay_s > 0:
            # Calls keep being answered while watchers (grpc's client-side health checking) take this
            # server out of their pick; refusing at once would cancel calls already on their way.
            await asyncio.sleep(self.settings.drain_delay_s)
        await self.grpc_server.stop(grace)
        if self.health_server is not None:  # last: probes see NOT_SERVING for the whole drain
            await self.health_server.stop(None)
        if self.replica is not None:
            await self.replica.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.challenger is not None:
            await self.challenger.shadow.close(timeout_s=min(grace, 1.0))
            await self.challenger.batcher.stop()
        await self.batcher.stop()
        await self.decision_log.close(timeout_s=min(grace, 5.0))
        await self.publisher.close()
        if self.cards is not None:
            await self.cards.store.close()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    @property
    def metrics_port(self) -> int | None:
        """The bound Prometheus port, or None when metrics are off."""
        return None if self.metrics_http is None else int(self.metrics_http.server_address[1])

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS (mutual with a client CA) from the files, read again when they change: gRPC asks before
    each new connection's handshake, so a renewed certificate (cert-manager, a rotated Secret) is
    served without a restart; a half-written or unreadable pair keeps the one before (logged)."""
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both AUTHOPT_SERVER_TLS_CERT_FILE and AUTHOPT_SERVER_TLS_KEY_FILE")
    files = [p for p in (cert, key, ca) if p is not None]

    def stamp() -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in files)

    def configuration() -> Any:
        pair = (key.read_bytes(), cert.read_bytes())
        roots = ca.read_bytes() if ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    seen = [stamp()]

    def fetch() -> Any:
        try:
            now = stamp()
            if now == seen[0]:
                return None
            fresh = configuration()
        except (OSError, ValueError) as exc:
            log.error("TLS files changed but cannot be read (%s): keeping the certificate before", exc)
            return None
        seen[0] = now
        log.info("TLS certificate reloaded from %s", cert)
        return fresh

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=ca is not None
    )


def _make_batcher(settings: ServerSettings, registry: ModelRegistry, metrics: Metrics | None) -> MicroBatcher:
    """The micro-batcher over the registry's current model, feeding the metrics (the served model's
    only: `metrics` None for a challenger's) and the model's latency estimate."""

    def infer(x: torch.Tensor) -> torch.Tensor:
        model = registry.current
        if model is None:
            raise RuntimeError("no model loaded")
        return model.infer(x)

    def on_batch(rows: int, requests: int, seconds: float) -> None:
        if metrics is not None:
            metrics.observe_batch(rows, requests, seconds)
        model = registry.current
        if model is not None:  # keeps the budget check's latency estimate live
            model.latency.observe(rows, seconds)

    def on_queue_wait(waits: list[float]) -> None:
        if metrics is not None:
            for wait in waits:
                metrics.queue_wait.observe(wait)

    return MicroBatcher(
        infer,
        BatcherConfig(
            max_batch_rows=settings.batch_max_rows,
            max_queue_delay_us=settings.batch_max_queue_delay_us,
            queue_size=settings.batch_queue_size,
            inline=settings.inference_executor == "inline",
        ),
        on_batch=on_batch,
        on_queue_wait=on_queue_wait if metrics is not None else None,
    )


def route_health(settings: ServerSettings) -> RouteHealth | None:
    """The replica's route health (None when `route_health` is off)."""
    if not settings.route_health:
        return None
    return RouteHealth(
        HealthSettings(
            fast_half_life_s=settings.route_health_half_life_s,
            drop=settings.route_health_drop,
            evidence=settings.route_health_evidence,
            probe_share=settings.route_health_probe_share,
        )
    )


def issuer_health(settings: ServerSettings) -> IssuerHealth | None:
    """The replica's issuer health (None when `issuer_health` is off)."""
    if not settings.issuer_health:
        return None
    return IssuerHealth(IssuerHealthSettings(half_life_s=settings.issuer_health_half_life_s))


def _make_challenger(
    settings: ServerSettings,
    store: FeatureStore,
    routes: tuple[policy.Candidate, ...],
    decision_log: DecisionLog,
    metrics: Metrics,
    cards: OnlineCards | None = None,
    health: RouteHealth | None = None,
    issuers: IssuerHealth | None = None,
) -> Challenger | None:
    """With a shadow model directory: the challenger's registry, batcher, engine and shadow (route
    and issuer health shared with the served engine: one replica's outcomes, one view of them)."""
    if settings.shadow_model_dir is None:
        return None
    registry = ModelRegistry(
        settings.shadow_model_dir,
        device=resolve_device(settings.device),
        poll_interval_s=settings.model_poll_interval_s,
    )
    batcher = _make_batcher(settings, registry, None)
    engine = DecisionEngine(
        EngineConfig(settings.exploration_rate, settings.feature_max_age_s, routes),
        store,
        registry,
        batcher,
        rng=random.Random(None if settings.seed is None else settings.seed + 1),
        cards=cards,
        health=health,
        issuer_health=issuers,
    )
    shadow = Shadow(
        engine.decide,
        decision_log,
        metrics,
        timeout_s=settings.shadow_timeout_ms / 1000,
        max_in_flight=settings.shadow_max_in_flight,
    )
    return Challenger(registry, batcher, engine, shadow)


def _feature_source(
    settings: ServerSettings, features: FeatureStore | None
) -> tuple[FeatureStore, FeatureReplica | None]:
    """The store decisions read and, with Kafka, the replica that fills it from the features topic
    (without the card x merchant entities when they are read from the online store)."""
    if features is not None:
        return features, None
    memory = InMemoryFeatureStore()
    if settings.kafka.bootstrap and settings.feature_replica:
        replica = FeatureReplica(
            settings.kafka, memory, max_cards=settings.max_cards, keep_cards=not settings.online_store
        )
        return memory, replica
    return memory, None


def _online_cards(settings: ServerSettings) -> OnlineCards | None:
    """With AUTHOPT_SERVER_ONLINE_STORE: the card rows' store, behind this process's LRU."""
    if not settings.online_store:
        return None
    password = None
    if settings.online_store_password_file is not None:
        password = settings.online_store_password_file.read_text().strip()
    store = OnlineStore(
        settings.online_store, password=password, timeout_s=settings.online_store_timeout_ms / 1000
    )
    return OnlineCards(store, CardCache(settings.online_store_cache_cards, settings.online_store_cache_ttl_s))


def _pending_call_limits(hard: int) -> list[tuple[str, int]]:
    """grpc-core's backlog of calls received but not yet taken by this process's handlers: beyond
    `hard` (and at random between hard/4 and hard) a new call is refused at once (CANCELLED), in C,
    before it costs any Python. 0 keeps grpc's own limits (1,000 / 3,000): calls wait instead, and
    under open-loop overload most of them expire while waiting (docs/reliability.md)."""
    if hard <= 0:
        return []
    return [
        ("grpc.server.max_pending_requests", max(1, hard // 4)),
        ("grpc.server.max_pending_requests_hard_limit", hard),
    ]


def _bind_api(
    settings: ServerSettings, service: OptimizerService, health: HealthServicer, metrics: Metrics
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with the optimizer, health and reflection services, bound (TLS if configured)."""
    limit = max(_TRANSPORT_LIMIT, settings.max_message_bytes)
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
    if settings.auth_tokens_file is not None:
        interceptors.append(
            TokenAuth(
                settings.auth_tokens_file,
                protect_health=settings.auth_protect_health,
                on_refusal=lambda reason: metrics.errors.labels(reason).inc(),
            )
        )
    # Bytes that do not parse: INVALID_ARGUMENT / MALFORMED_MESSAGE, not grpc's UNKNOWN.
    interceptors.append(MalformedRequests(on_refusal=lambda reason: metrics.errors.labels(reason).inc()))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a client's calls beyond it wait in the client,
            # inside their own deadline, instead of in this server's queue (docs/reliability.md).
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            # grpc-core's "overload protection" keeps counting a finished stream until it is freed and
            # refuses (RST_STREAM REFUSED_STREAM: UNAVAILABLE) the client's next call, which a client
            # obeying the limit has every right to open: off, as in grpc's own stream-limit tests.
            ("grpc.http.overload_protection", 0),
            *_pending_call_limits(settings.max_pending_calls),
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    optimizer_pb2_grpc.add_AuthorizationOptimizerServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port


def _bind_health(
    settings: ServerSettings, health: HealthServicer
) -> tuple[grpc.aio.Server | None, int | None]:
    """With `health_port` >= 0: a second server with the health service alone, in plaintext (the
    kubelet's gRPC probe cannot speak TLS, and nothing else is reachable there)."""
    if settings.health_port < 0:
        return None, None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{settings.host}:{settings.health_port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port


async def create_server(
    settings: ServerSettings,
    *,
    features: FeatureStore | None = None,
    publisher: OutcomePublisher | None = None,
) -> tuple[AuthoptServer, int]:
    """Build (not start) the server and bind its port; returns it and the bound port."""
    metrics = Metrics()
    registry = ModelRegistry(
        settings.model_dir,
        device=resolve_device(settings.device),
        poll_interval_s=settings.model_poll_interval_s,
    )
    batcher = _make_batcher(settings, registry, metrics)
    store, replica = _feature_source(settings, features)
    cards = _online_cards(settings)
    routes = tuple(policy.Candidate(r.id, r.cost_bps, r.fixed_fee_minor) for r in settings.routes)
    engine = DecisionEngine(
        EngineConfig(settings.exploration_rate, settings.feature_max_age_s, routes),
        store,
        registry,
        batcher,
        rng=random.Random(settings.seed),
        cards=cards,
        health=route_health(settings),
        issuer_health=issuer_health(settings),
    )
    decision_log: DecisionLog = (
        KafkaDecisionLog(
            settings.kafka,
            metrics,
            producer_id=settings.replica_id,
            exploration_rate=settings.exploration_rate,
            queue_size=settings.decision_log_queue_size,
        )
        if settings.kafka.bootstrap and settings.decision_log
        else NoDecisionLog()
    )
    pub = (
        publisher
        if publisher is not None
        else make_publisher(settings.kafka, settings.kafka_publish_timeout_s)
    )
    challenger = _make_challenger(
        settings, store, routes, decision_log, metrics, cards, engine.health, engine.issuer_health
    )
    service = OptimizerService(
        engine,
        IdempotencyCache(make_cache(settings.cache_url), settings.idempotency_ttl_s),
        pub,
        metrics,
        limits=validation.Limits(max_candidates=settings.max_candidates),
        default_budget_ms=settings.default_latency_budget_ms,
        max_message_bytes=settings.max_message_bytes,
        has_configured_routes=bool(routes),
        replica_id=settings.replica_id,
        decision_log=decision_log,
        challenger=challenger.engine if challenger else None,
        shadow=challenger.shadow if challenger else None,
        ab_challenger_share=settings.ab_challenger_share,
        max_in_flight=settings.max_in_flight,
        max_outcomes_publishing=settings.max_outcomes_publishing,
    )
    health = HealthServicer()
    server, port = _bind_api(settings, service, health, metrics)
    health_server, health_port = _bind_health(settings, health)
    metrics.queue_depth.set_function(lambda: batcher.queue_depth)
    metrics.model_loaded.set_function(lambda: 1.0 if registry.current is not None else 0.0)
    if replica is not None:
        held = replica.materializer
        metrics.feature_cards.watch(held=lambda: held.cards, evicted=lambda: held.evicted)
    if cards is not None:
        online = cards
        metrics.online_store.watch(lambda: (online.store.reads, online.unknown, online.cache.hits))
    metrics_http = None
    if settings.metrics_port >= 0:
        metrics_http, _ = start_http_server(
            settings.metrics_port, addr=settings.host, registry=metrics.registry
        )
    built = AuthoptServer(
        server,
        settings,
        health,
        registry,
        batcher,
        pub,
        store,
        metrics,
        metrics_http,
        replica,
        decision_log,
        challenger,
        health_server=health_server,
        health_port=health_port,
        cards=cards,
    )
    return built, port


def configure_process(settings: ServerSettings) -> None:
    """Process-wide settings for a serving process (call once, before create_server)."""
    if settings.torch_threads:
        # Small batches gain nothing from intra-op parallelism; extra threads only contend with
        # the event loop for the pod's cores (measured: 3-row forwards jumping from 75 us to ms).
        torch.set_num_threads(settings.torch_threads)


def freeze_heap() -> None:
    """Move everything loaded at start (torch, the model, descriptors) out of the GC's generations.

    It lives as long as the process; without this a full collection walks it and pauses requests
    for ~100-200 ms on a small machine (measured in the test suite's process).
    """
    gc.collect()
    gc.freeze()


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain within the grace period."""
    configure_process(settings)
    server, port = await create_server(settings)
    await server.start()
    freeze_heap()
    model = server.registry.current
    log.info(
        "authopt serving on %s:%d (model %s, device %s)",
        settings.host,
        port,
        model.version if model else "none: fallback policy",
        settings.device,
    )
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(asyncio.create_task(server.stop())))
    await server.wait_for_termination()
