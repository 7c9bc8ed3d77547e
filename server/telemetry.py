"""Tracing (OpenTelemetry API only; the SDK is wired at the entry point) and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["Metrics", "extract_trace_context", "tracer"]

tracer = trace.get_tracer("authopt.server")
_PROPAGATOR = TraceContextTextMapPropagator()


def extract_trace_context(metadata: Iterable[Any] | None) -> Context | None:
    """The caller's W3C trace context from gRPC metadata (`traceparent`/`tracestate`), if any."""
    if not metadata:
        return None
    carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate") and isinstance(v, str)}
    if not carrier:
        return None
    return _PROPAGATOR.extract(carrier)


_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _none() -> int:
    return 0


class FeatureCards:
    """The feature replica's per-card state, read when scraped from its counts (streams.replica
    Materializer `cards`, `evicted`: streams/ does not import the server): 0 without a replica."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._held: Callable[[], int] = _none
        self._evicted: Callable[[], int] = _none
        registry.register(self)

    def watch(self, *, held: Callable[[], int], evicted: Callable[[], int]) -> None:
        """Report these counts from now on (called once, by create_server, when there is a replica)."""
        self._held, self._evicted = held, evicted

    def describe(self) -> Iterator[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._held(), self._evicted())

    @staticmethod
    def _families(held: int | None, evicted: int | None) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "authopt_feature_cards",
            "card x merchant keys the feature replica holds (at most AUTHOPT_SERVER_MAX_CARDS)",
            value=held,
        )
        yield CounterMetricFamily(
            "authopt_feature_cards_evicted",
            "cards the feature replica evicted for its limit, least recently updated or read first "
            "(decided as new cards until their next snapshot)",
            value=evicted,
        )


class OnlineStoreCounts:
    """The online store's read counts (streams.online OnlineCards), read when scraped: 0 without one."""

    _FAMILIES = (
        (
            "authopt_online_store_reads",
            "MGET round trips to the online store (each serves one event-loop turn)",
        ),
        (
            "authopt_online_store_unknown",
            "card lookups the online store did not answer in time or failed "
            "(decided by the fallback policy, DECISION_SOURCE_FALLBACK_CARD_STATE)",
        ),
        ("authopt_online_store_cache_hits", "card rows found in this process's cache in front of the store"),
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        registry.register(self)

    def watch(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        """Report (reads, unknown, cache hits) from now on (create_server, with an online store)."""
        self._counts = counts

    def describe(self) -> Iterator[Metric]:
        return self._families((0, 0, 0))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._counts())

    def _families(self, counts: tuple[int, int, int]) -> Iterator[Metric]:
        for (name, doc), value in zip(self._FAMILIES, counts, strict=True):
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per server instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_latency = Histogram(
            "authopt_rpc_latency_seconds",
            "server-side time per RPC",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter("authopt_decisions_total", "decisions by source", ["source"], registry=r)
        self.batch_rows = Histogram(
            "authopt_batch_rows",
            "(attempt, route) rows per model forward",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "authopt_batch_requests", "requests merged per model forward", buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "authopt_inference_seconds", "model forward time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("authopt_queue_depth", "requests waiting for inference", registry=r)
        self.queue_wait = Histogram(
            "authopt_queue_wait_seconds",
            "time a request waited in the micro-batcher's queue for its model forward",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("authopt_rpc_errors_total", "rejected RPCs by reason", ["reason"], registry=r)
        self.outcomes = Counter("authopt_outcomes_published_total", "outcome events published", registry=r)
        self.model_loaded = Gauge("authopt_model_loaded", "1 when a model is serving", registry=r)
        self.decisions_logged = Counter(
            "authopt_decisions_logged_total", "decisions published to the decision log", registry=r
        )
        self.decision_log_dropped = Counter(
            "authopt_decision_log_dropped_total", "decisions not logged, by reason", ["reason"], registry=r
        )
        self.decision_log_queue = Gauge(
            "authopt_decision_log_queue", "decisions waiting to be published to the log", registry=r
        )
        self.shadow_decisions = Counter(
            "authopt_shadow_decisions_total",
            "shadow (challenger) decisions by outcome: agree / disagree on the first route with the "
            "champion, or skipped: slow, error, busy, fallback",
            ["outcome"],
            registry=r,
        )
        self.shadow_expected_value = Counter(
            "authopt_shadow_expected_value_minor_total",
            "sum of the first route's expected value (minor units) as each model predicts it, over the "
            "requests both decided with their model (divide by the agree + disagree count for a mean)",
            ["model"],
            registry=r,
        )
        self.shed = Counter(
            "authopt_shed_total",
            "requests not worked on normally: deadline_passed (refused, DEADLINE_EXCEEDED), "
            "overload (answered at once from the fallback) or outcomes_backlog (outcome reports "
            "refused, RESOURCE_EXHAUSTED with RetryInfo)",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge("authopt_in_flight", "decisions being worked on", registry=r)
        self.late = Counter(
            "authopt_late_answers_total",
            "Recommend answers finished after the call's deadline (the caller got DEADLINE_EXCEEDED): "
            "work wasted; goodput is decisions minus these",
            registry=r,
        )
        self.ab_decisions = Counter(
            "authopt_ab_decisions_total", "decisions under the A/B split, by arm", ["arm"], registry=r
        )
        self.feature_cards = FeatureCards(r)
        self.online_store = OnlineStoreCounts(r)

    def observe_batch(self, rows: int, requests: int, seconds: float) -> None:
        """Called by the batcher after each forward."""
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.inference_seconds.observe(seconds)
