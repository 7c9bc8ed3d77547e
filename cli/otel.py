"""OpenTelemetry SDK wiring for the entry points (library modules use only the API).

The exporter follows the standard variables: OTEL_TRACES_EXPORTER=otlp|console|none (default: otlp
when OTEL_EXPORTER_OTLP_ENDPOINT is set, else none), OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_*,
and the sampler from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (read by the SDK itself).
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

__all__ = ["configure_tracing", "exporter_from_env"]


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none")


def exporter_from_env() -> SpanExporter | None:
    """The span exporter OTEL_TRACES_EXPORTER (and OTEL_EXPORTER_OTLP_ENDPOINT) asks for."""
    default = "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"
    return _exporter(os.environ.get("OTEL_TRACES_EXPORTER", default).strip().lower())


def configure_tracing(service_name: str = "authopt") -> TracerProvider | None:
    """Install the SDK TracerProvider with the exporter the environment asks for.

    With no exporter (the default without an endpoint) nothing is installed: spans would be
    recorded only to be dropped (~30 µs each, five per decision), so the API's non-recording spans
    stay, which still carry the caller's trace context into the Kafka headers. Returns the
    provider to shut down at exit, or None.
    """
    exporter = exporter_from_env()
    if exporter is None:
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8192))
    trace.set_tracer_provider(provider)
    return provider
