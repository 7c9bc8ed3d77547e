"""Kafka topics and connection settings shared by the worker, the replica and the server.

Production points `AUTHOPT_KAFKA_BOOTSTRAP` at any Kafka, with SASL and/or TLS from the variables
below (secrets from mounted Secrets; the password is never logged). The local broker needs none.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ATTEMPTS_TOPIC", "DECISIONS_TOPIC", "DLQ_TOPIC", "FEATURES_TOPIC", "KafkaSettings"]

ATTEMPTS_TOPIC = "authopt.attempts.v1"
FEATURES_TOPIC = "authopt.features.v1"
DLQ_TOPIC = "authopt.attempts.dlq.v1"
DECISIONS_TOPIC = "authopt.decisions.v1"  # the server's decision log (server.decision_log)


class KafkaSettings(BaseSettings):
    """How every authopt process reaches Kafka. Environment: `AUTHOPT_KAFKA_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="AUTHOPT_KAFKA_", frozen=True, extra="forbid")

    bootstrap: str = Field("", description="bootstrap servers, host:port[,host:port]; empty: no Kafka")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_* protocols)"
    )
    sasl_username: str = Field("", description="SASL user name")
    sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (from a Secret)")
    ssl_cafile: Path | None = Field(None, description="PEM CA bundle that signs the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="PEM client key (mutual TLS)")

    @classmethod
    def for_bootstrap(cls, bootstrap: str) -> KafkaSettings:
        """These settings from the environment, with `bootstrap` overriding AUTHOPT_KAFKA_BOOTSTRAP."""
        return cls(bootstrap=bootstrap)  # type: ignore[call-arg]

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile:
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None)
        return ctx

    def client_options(self) -> dict[str, Any]:
        """Security keyword arguments for aiokafka clients."""
        opts: dict[str, Any] = {"security_protocol": self.security_protocol}
        ctx = self.ssl_context()
        if ctx is not None:
            opts["ssl_context"] = ctx
        if self.security_protocol.startswith("SASL"):
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return opts
