"""Publishing attempt outcomes to Kafka topic `authopt.attempts.v1`.

A report is acknowledged to the caller only after the broker has acknowledged the record (acks=all),
so an accepted event is never dropped silently; when no broker is configured or reachable the RPC
answers UNAVAILABLE and the caller keeps the event and retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from opentelemetry.propagate import inject

from authopt.v1 import events_pb2
from server.errors import Unavailable
from streams.kafka import ATTEMPTS_TOPIC, KafkaSettings

__all__ = ["ATTEMPTS_TOPIC", "KafkaPublisher", "OutcomePublisher", "UnconfiguredPublisher", "make_publisher"]

log = logging.getLogger(__name__)


class OutcomePublisher(Protocol):
    """Where accepted outcome events go."""

    async def publish(self, events: Sequence[events_pb2.AttemptEvent]) -> None:
        """Publish all events or raise Unavailable; returns only once they are durable."""

    async def close(self) -> None: ...


class UnconfiguredPublisher:
    """No broker configured: every publish is refused with BROKER_NOT_CONFIGURED."""

    async def publish(self, events: Sequence[events_pb2.AttemptEvent]) -> None:
        raise Unavailable(
            "BROKER_NOT_CONFIGURED",
            "no Kafka broker is configured (set AUTHOPT_KAFKA_BOOTSTRAP); the outcome was not accepted",
        )

    async def close(self) -> None:
        return None


class KafkaPublisher:
    """aiokafka producer with acks=all; records keyed by card fingerprint, trace context in headers."""

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = ATTEMPTS_TOPIC,
        timeout_s: float = 5.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_options = client_options or {}
        self._topic = topic
        self._timeout_s = timeout_s
        self._producer: Any = None
        self._lock = asyncio.Lock()

    async def _ensure_started(self) -> Any:
        from aiokafka import AIOKafkaProducer  # imported lazily: only servers that publish need it

        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    request_timeout_ms=int(self._timeout_s * 1000),
                    client_id="authopt-server",
                    **self._client_options,
                )
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, events: Sequence[events_pb2.AttemptEvent]) -> None:
        headers: dict[str, str] = {}
        inject(headers)
        record_headers = [(k, v.encode()) for k, v in headers.items()]
        try:
            async with asyncio.timeout(self._timeout_s):
                producer = await self._ensure_started()
                sends = [
                    await producer.send(
                        self._topic,
                        value=e.SerializeToString(),
                        key=e.outcome.attempt.card.fingerprint.encode(),
                        headers=record_headers,
                    )
                    for e in events
                ]
                await asyncio.gather(*sends)
        except Exception as exc:  # every Kafka/connection/timeout failure means "not accepted"
            log.warning("publishing %d outcome(s) to %s failed: %s", len(events), self._bootstrap, exc)
            await self._reset()
            raise Unavailable(
                "BROKER_UNAVAILABLE",
                f"the Kafka broker did not acknowledge the outcome(s) within {self._timeout_s:g}s; "
                "nothing was accepted, retry later",
            ) from exc

    async def _reset(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception:  # the broker is already gone; stopping is best effort
                log.debug("producer stop failed", exc_info=True)

    async def close(self) -> None:
        await self._reset()


def make_publisher(kafka: KafkaSettings, timeout_s: float) -> OutcomePublisher:
    """KafkaPublisher when `kafka` names a bootstrap, else the refusing UnconfiguredPublisher."""
    if not kafka.bootstrap:
        return UnconfiguredPublisher()
    return KafkaPublisher(kafka.bootstrap, timeout_s=timeout_s, client_options=kafka.client_options())
