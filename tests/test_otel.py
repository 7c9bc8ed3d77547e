"""The entry point's exporter choice follows the standard OTEL_* variables."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from cli.otel import exporter_from_env


def test_default_is_none_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert exporter_from_env() is None


def test_endpoint_implies_otlp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    exporter = exporter_from_env()
    assert isinstance(exporter, OTLPSpanExporter)
    exporter.shutdown()


def test_console_and_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert isinstance(exporter_from_env(), ConsoleSpanExporter)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="otlp, console or none"):
        exporter_from_env()


def test_no_exporter_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an exporter, spans stay the API's non-recording ones (no cost per decision)."""
    from opentelemetry import trace

    from cli.otel import configure_tracing

    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    before = trace.get_tracer_provider()
    assert configure_tracing("authopt-test") is None
    assert trace.get_tracer_provider() is before
