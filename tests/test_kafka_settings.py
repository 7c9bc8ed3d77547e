"""Kafka connection settings (SASL/TLS) and the local-broker accommodations being opt-in."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from streams.kafka import KafkaSettings
from streams.worker import WorkerSettings, _credentials, make_app


def test_plaintext_by_default() -> None:
    k = KafkaSettings.for_bootstrap("kafka-0:9092")
    assert k.client_options() == {"security_protocol": "PLAINTEXT"} and _credentials(k) is None


def test_sasl_ssl_from_the_environment_keeps_the_password_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHOPT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("AUTHOPT_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("AUTHOPT_KAFKA_SASL_USERNAME", "authopt")
    monkeypatch.setenv("AUTHOPT_KAFKA_SASL_PASSWORD", "s3cret-pw")
    k = KafkaSettings.for_bootstrap("kafka-0:9093")
    opts = k.client_options()
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-256"
    assert opts["sasl_plain_username"] == "authopt" and opts["sasl_plain_password"] == "s3cret-pw"
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert "s3cret-pw" not in repr(k) and "s3cret-pw" not in str(k.model_dump())
    creds: Any = _credentials(k)
    assert type(creds).__name__ == "SASLCredentials" and creds.username == "authopt"


def test_unknown_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHOPT_KAFKA_SECURITY_PROTOCOL", "SSL_PLUS")
    with pytest.raises(ValueError, match="security_protocol"):
        KafkaSettings()


def test_missing_ca_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHOPT_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("AUTHOPT_KAFKA_SSL_CAFILE", str(tmp_path / "nope.pem"))
    with pytest.raises(FileNotFoundError):
        KafkaSettings.for_bootstrap("kafka-0:9093").client_options()


def test_real_kafka_gets_no_local_broker_accommodations() -> None:
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from faust.transport.drivers import aiokafka as driver

    leave = GroupCoordinator._maybe_leave_group
    app, _ = make_app(WorkerSettings(), KafkaSettings.for_bootstrap("kafka-0:9092"))
    assert GroupCoordinator._maybe_leave_group is leave
    assert driver.aiokafka.AIOKafkaConsumer.__module__.startswith("aiokafka")
    assert app.conf.broker_session_timeout == 60.0  # Faust's default, untouched
    with pytest.raises(ValueError, match="AUTHOPT_KAFKA_BOOTSTRAP"):
        make_app(WorkerSettings(), KafkaSettings.for_bootstrap(""))


def test_server_settings_carry_the_kafka_settings_read_at_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """`authopt serve` reads AUTHOPT_KAFKA_* once and hands them down; ServerSettings alone reads none."""
    from server.publisher import KafkaPublisher, UnconfiguredPublisher, make_publisher
    from server.settings import ServerSettings

    monkeypatch.setenv("AUTHOPT_KAFKA_BOOTSTRAP", "kafka-0:9093")
    monkeypatch.setenv("AUTHOPT_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    alone = ServerSettings()  # type: ignore[call-arg]
    assert alone.kafka.bootstrap == ""
    assert isinstance(make_publisher(alone.kafka, 1.0), UnconfiguredPublisher)
    built = ServerSettings(kafka=KafkaSettings())  # type: ignore[call-arg]
    assert built.kafka.bootstrap == "kafka-0:9093"
    assert built.kafka.client_options()["security_protocol"] == "SASL_PLAINTEXT"
    assert isinstance(make_publisher(built.kafka, 1.0), KafkaPublisher)
