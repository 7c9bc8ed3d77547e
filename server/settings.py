"""The server's typed, frozen settings, read from `AUTHOPT_SERVER_*` environment variables.

Read once at the entry point (`ServerSettings()`), then passed down. Every default is safe and
works locally with nothing set: loopback only, no TLS material needed, bounded messages and queues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.kafka import KafkaSettings


class RouteConfig(BaseModel):
    """A route the server offers when a request names no candidates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="route identifier")
    cost_bps: int = Field(0, ge=0, le=10_000, description="variable cost, basis points of the amount")
    fixed_fee_minor: int = Field(0, ge=0, description="fixed cost per attempt, minor units")


def no_kafka() -> KafkaSettings:
    """Kafka settings with no bootstrap and the defaults, read from no environment variable: the
    server's default until its entry point passes `KafkaSettings()` (the environment, read once)."""
    return KafkaSettings.model_construct()


class ServerSettings(BaseSettings):
    """Settings of `authopt serve`. Environment: `AUTHOPT_SERVER_<FIELD>` (routes as JSON)."""

    model_config = SettingsConfigDict(
        env_prefix="AUTHOPT_SERVER_", frozen=True, extra="forbid", populate_by_name=True
    )

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 in a container")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    model_dir: Path | None = Field(None, description="directory of model versions (<dir>/<version>/)")
    model_poll_interval_s: float = Field(2.0, gt=0, description="how often the model directory is scanned")
    shadow_model_dir: Path | None = Field(
        None,
        description="directory of a challenger's versions: scored beside the served model on every "
        "request, off the caller's path, both decisions in the decision log",
    )
    shadow_timeout_ms: int = Field(
        200, ge=1, le=10_000, description="how long a shadow decision may take before it is skipped (counted)"
    )
    shadow_max_in_flight: int = Field(
        256, ge=1, le=100_000, description="shadow decisions at once; beyond it they are skipped (counted)"
    )
    ab_challenger_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of cards (by fingerprint hash, sticky) the shadow model decides for (A/B)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="inference device")
    torch_threads: int = Field(
        1, ge=0, le=256, description="CPU intra-op threads for inference; 0 keeps torch's default"
    )
    inference_executor: Literal["auto", "inline", "thread"] = Field(
        "auto",
        description="where forwards run: the inference thread (auto) or the event loop (inline: "
        "no hand-off, but batches only form with a queue delay)",
    )
    batch_max_rows: int = Field(256, ge=1, le=65_536, description="most (attempt, route) rows per forward")
    batch_max_queue_delay_us: int = Field(
        0, ge=0, le=100_000, description="how long the batcher waits for more requests, microseconds"
    )
    batch_queue_size: int = Field(2048, ge=1, description="requests waiting for inference before shedding")
    default_latency_budget_ms: int = Field(
        50, ge=1, le=10_000, description="budget when the request and its deadline give none"
    )
    exploration_rate: float = Field(0.02, ge=0.0, le=0.5, description="epsilon-greedy share of decisions")
    route_health: bool = Field(
        False,
        description="demote a route whose approval in the last minute fell below what its decisions "
        "expected (server/health.py), from the outcomes this replica receives; behind several replicas "
        "the platform must echo each decision's expectation (AttemptOutcome.expected_approval), else it "
        "loses more in an incident than none; off by default: docs/model.md",
    )
    route_health_half_life_s: float = Field(
        60.0,
        gt=0,
        le=1800,
        description="half-life of route health's fast window (the ratio it reports, the peer check), seconds",
    )
    route_health_drop: float = Field(
        0.35, gt=0, lt=1, description="relative fall of a route's approval below expected that demotes it"
    )
    route_health_evidence: float = Field(
        5.0,
        gt=0,
        le=50,
        description="log-likelihood ratio of 'its approval fell' over 'as expected' that demotes a route",
    )
    route_health_probe_share: float = Field(
        0.1, ge=0, le=1, description="share of a demoted route's requests that still probe it first (logged)"
    )
    issuer_health: bool = Field(
        False,
        description="while a card's issuer answers 91/96 to this replica's recent first attempts, scale "
        "every route's approval probability by the issuer's observed / expected approval over the last "
        "minutes (server/issuer_health.py): calibration in an issuer outage, route order kept; off by "
        "default: docs/model.md",
    )
    issuer_health_half_life_s: float = Field(
        90.0, gt=0, le=1800, description="half-life of issuer health's window, seconds"
    )
    max_message_bytes: int = Field(
        65_536, ge=1024, le=4 * 1024 * 1024, description="largest request accepted"
    )
    max_concurrent_rpcs: int = Field(1024, ge=1, description="RPCs served at once; more are refused")
    max_streams_per_connection: int = Field(
        32,
        ge=1,
        le=100_000,
        description="HTTP/2 streams (calls) one connection may have open at once; a client's further "
        "calls wait in the client within their own deadlines, not in the server's queue",
    )
    max_pending_calls: int = Field(
        0,
        ge=0,
        le=100_000,
        description="calls received but not yet picked up by the handlers beyond which new ones are "
        "refused at once (CANCELLED, in grpc-core); 0: grpc's own limits (calls wait, and expire under "
        "overload)",
    )
    max_outcomes_publishing: int = Field(
        20_000,
        ge=1,
        le=10_000_000,
        description="outcomes (of ReportOutcome(s) calls) waiting for the broker at once; beyond it a "
        "call is refused at once: RESOURCE_EXHAUSTED, OUTCOMES_BACKLOG, with a RetryInfo delay",
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        le=100_000,
        description="decisions worked on at once; beyond it a request is answered at once from the "
        "fallback policy (DECISION_SOURCE_FALLBACK_OVERLOAD)",
    )
    max_candidates: int = Field(16, ge=1, le=256, description="most candidate routes per request")
    routes: tuple[RouteConfig, ...] = Field((), description="routes used when a request names none (JSON)")
    feature_max_age_s: float = Field(
        3600.0, gt=0, description="route features older than this count as stale (fallback)"
    )
    idempotency_ttl_s: int = Field(
        600, ge=0, description="how long a request id returns the same decision, seconds; 0 turns it off"
    )
    cache_url: str = Field("memory://", description="aiocache backend: memory:// or redis://host:port/db")
    kafka: KafkaSettings = Field(
        default_factory=lambda: no_kafka(),
        description="how the server reaches Kafka (outcomes out, features in): the AUTHOPT_KAFKA_* "
        "settings, built by the entry point; no bootstrap: ReportOutcome answers UNAVAILABLE",
    )
    kafka_publish_timeout_s: float = Field(5.0, gt=0, description="how long ReportOutcome waits for acks")
    feature_replica: bool = Field(
        True,
        description="with Kafka: follow authopt.features.v1 into memory; NOT_SERVING until caught up",
    )
    max_cards: int = Field(
        1_000_000,
        ge=1,
        le=100_000_000,
        description="card x merchant keys the feature replica holds; beyond it the least recently "
        "updated or read is evicted (decided as a new card until its next snapshot). ~1 KiB each "
        "(python -m bench.card_memory): ~1 GiB, beside the ~300 MiB process, within the chart's 2 GiB",
    )
    online_store: str = Field(
        "",
        description="redis:// or rediss:// URL of the online store the worker writes card x merchant "
        "rows to: read from there (one MGET per event-loop turn), not held by the replica; empty: held "
        "in memory (MAX_CARDS)",
    )
    online_store_password_file: Path | None = Field(
        None, description="file holding the online store's password (instead of one in the URL)"
    )
    online_store_timeout_ms: float = Field(
        10.0,
        gt=0,
        le=10_000,
        description="longest wait for the online store (also bounded by the request's budget); past it "
        "the decision falls back (DECISION_SOURCE_FALLBACK_CARD_STATE)",
    )
    online_store_cache_cards: int = Field(
        100_000, ge=0, le=10_000_000, description="card rows kept in this process in front of the store (LRU)"
    )
    online_store_cache_ttl_s: float = Field(
        1.0, ge=0, le=3600, description="how long a card row read from the store is reused; 0: never"
    )
    decision_log: bool = Field(
        True, description="with Kafka: publish every decision to authopt.decisions.v1 (off the critical path)"
    )
    decision_log_queue_size: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="decisions waiting for the log; beyond it they are dropped, counted",
    )
    grace_period_s: float = Field(10.0, ge=0, description="drain time on SIGTERM; below the pod's grace")
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="on SIGTERM, keep answering this long with health NOT_SERVING before refusing new "
        "calls, so clients watching health move away first (outside Kubernetes; the chart's preStop "
        "sleep does it there)",
    )
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus port; -1 off, 0 a free one")
    health_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="plaintext port with only grpc.health.v1 (probes when the API is TLS); -1 off, 0 free",
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain; with the key, serve TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle; when set, require client certs")
    auth_tokens_file: Path | None = Field(
        None,
        description="bearer tokens, one caller a line '<name> <token> [recommend,report]' (server/auth.py); "
        "none: no check",
    )
    auth_protect_health: bool = Field(False, description="with tokens: health and reflection need one too")
    seed: int | None = Field(None, description="exploration RNG seed (tests and simulations)")
    replica_id: str = Field("authopt-server", description="producer id stamped on published events")
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes on one port (SO_REUSEPORT), each its own event loop; above 1 set "
        "ONLINE_STORE too, or each process holds every card",
    )
    reuse_port: bool = Field(
        False, description="bind the port with SO_REUSEPORT (set for the processes of PROCESSES > 1)"
    )

    @model_validator(mode="after")
    def _ab_needs_a_challenger(self) -> ServerSettings:
        if self.ab_challenger_share > 0 and self.shadow_model_dir is None:
            raise ValueError(
                "ab_challenger_share > 0 needs shadow_model_dir: the challenger to split traffic with"
            )
        return self
