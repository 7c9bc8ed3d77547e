"""The decision log: every decision the server makes, on Kafka topic `authopt.decisions.v1`.

Off the critical path by construction: `offer` only appends the request and the response to a bounded
queue (no copy, no serialization, no await), and a background task builds the `DecisionRecord`s and
publishes them in batches after the responses have gone. No decision ever waits on Kafka. When the
queue is full (the broker is slow or down) the decision is dropped and counted, never blocked on;
publish failures are counted the same way, by reason (Prometheus `authopt_decision_log_dropped_total`).

Records are keyed by the card fingerprint, as the attempts are, and carry what off-policy evaluation
needs: the candidates as scored, the order served, the decision source, the feature ages and the
propensity of every candidate for the first position under the exploration policy. An outcome
reported with the same request id joins its decision (`streams.decisions.join_decisions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from authopt.v1 import events_pb2, optimizer_pb2
from server import policy
from server.telemetry import Metrics
from streams.kafka import DECISIONS_TOPIC, KafkaSettings

__all__ = ["DecisionLog", "KafkaDecisionLog", "NoDecisionLog", "decision_record"]

log = logging.getLogger(__name__)

_Item = tuple[
    optimizer_pb2.RecommendRequest,
    optimizer_pb2.RecommendResponse,
    float,
    optimizer_pb2.RecommendResponse | None,
    str,
]


def decision_record(
    req: optimizer_pb2.RecommendRequest,
    resp: optimizer_pb2.RecommendResponse,
    decided_at: float,
    *,
    producer: str,
    exploration_rate: float,
    shadow: optimizer_pb2.RecommendResponse | None = None,
    arm: str = "",
) -> events_pb2.DecisionRecord:
    """The record of one decision (`decided_at`: epoch seconds), with the challenger's decision for
    the same request (`shadow`) and the A/B arm when there are."""
    ts = Timestamp()
    ts.FromMicroseconds(round(decided_at * 1e6))  # float seconds hold microseconds, not nanoseconds
    return events_pb2.DecisionRecord(
        request=req,
        response=resp,
        decided_at=ts,
        producer=producer,
        exploration_rate=exploration_rate,
        first_position_propensities=first_position_propensities(resp, exploration_rate),
        shadow=shadow,
        arm=arm,
    )


def first_position_propensities(
    resp: optimizer_pb2.RecommendResponse, exploration_rate: float
) -> list[float]:
    """Each served route's probability of having been first: as the policy set it on the route
    (route health's probes included), else (a response from before it did) `explore`'s."""
    given = [r.first_position_propensity for r in resp.routes]
    if resp.routes and abs(sum(given) - 1.0) < 1e-6:  # set by the policy (they sum to 1)
        return given
    return policy.first_position_propensities(len(resp.routes), exploration_rate, resp.explored)


class DecisionLog(Protocol):
    """Where the server's decisions go."""

    def offer(
        self,
        req: optimizer_pb2.RecommendRequest,
        resp: optimizer_pb2.RecommendResponse,
        decided_at: float,
        *,
        shadow: optimizer_pb2.RecommendResponse | None = None,
        arm: str = "",
    ) -> None:
        """Queue one decision (and the challenger's, and its A/B arm) for the log; never blocks, never
        raises."""

    def start(self) -> None: ...

    async def close(self, timeout_s: float) -> None:
        """Publish what is queued (within `timeout_s`, the rest is counted as dropped), then stop."""


class NoDecisionLog:
    """No Kafka configured, or the log turned off: decisions are not recorded."""

    def offer(
        self,
        req: optimizer_pb2.RecommendRequest,
        resp: optimizer_pb2.RecommendResponse,
        decided_at: float,
        *,
        shadow: optimizer_pb2.RecommendResponse | None = None,
        arm: str = "",
    ) -> None:
        return None

    def start(self) -> None:
        return None

    async def close(self, timeout_s: float) -> None:
        return None


@dataclass
class _Counts:
    published: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


class KafkaDecisionLog:
    """Decisions to Kafka through a bounded queue and one background publishing task."""

    def __init__(
        self,
        kafka: KafkaSettings,
        metrics: Metrics,
        *,
        producer_id: str,
        exploration_rate: float,
        queue_size: int = 10_000,
        batch_size: int = 500,
        topic: str = DECISIONS_TOPIC,
        timeout_s: float = 5.0,
        retry_s: float = 1.0,
    ) -> None:
        self._kafka = kafka
        self._metrics = metrics
        self._producer_id = producer_id
        self._exploration_rate = exploration_rate
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._topic = topic
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self.counts = _Counts()
        metrics.decision_log_queue.set_function(self._queue.qsize)

    def offer(
        self,
        req: optimizer_pb2.RecommendRequest,
        resp: optimizer_pb2.RecommendResponse,
        decided_at: float,
        *,
        shadow: optimizer_pb2.RecommendResponse | None = None,
        arm: str = "",
    ) -> None:
        try:
            self._queue.put_nowait((req, resp, decided_at, shadow, arm))
        except asyncio.QueueFull:
            self._drop("queue_full", 1)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="decision-log")

    async def close(self, timeout_s: float) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Let the task publish what is queued, then stop it; what is left is counted.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._queue.join()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = self._queue.qsize()
        if left:
            self._drop("shutdown", left)
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):  # the broker may already be gone
                await producer.stop()

    def _drop(self, reason: str, n: int) -> None:
        self.counts.dropped[reason] = self.counts.dropped.get(reason, 0) + n
        self._metrics.decision_log_dropped.labels(reason).inc(n)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._publish(batch)
            except asyncio.CancelledError:
                self._drop("shutdown", len(batch))
                raise
            except Exception as exc:  # broker unreachable, timeout, ...: counted, and back off
                self._drop("broker", len(batch))
                log.warning("decision log: %d decisions not published: %s", len(batch), exc)
                await self._reset()
                await asyncio.sleep(self._retry_s)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _publish(self, batch: Sequence[_Item]) -> None:
        async with asyncio.timeout(self._timeout_s):
            producer = await self._ensure_started()
            sends = []
            for req, resp, decided_at, shadow, arm in batch:
                record = decision_record(
                    req,
                    resp,
                    decided_at,
                    producer=self._producer_id,
                    exploration_rate=self._exploration_rate,
                    shadow=shadow,
                    arm=arm,
                )
                sends.append(
                    await producer.send(
                        self._topic,
                        value=record.SerializeToString(),
                        key=req.attempt.card.fingerprint.encode(),
                        timestamp_ms=int(decided_at * 1000),
                    )
                )
            await asyncio.gather(*sends)
        self.counts.published += len(batch)
        self._metrics.decisions_logged.inc(len(batch))

    async def _ensure_started(self) -> Any:
        if self._producer is None:
            from aiokafka import AIOKafkaProducer  # only servers with a broker need it

            producer = AIOKafkaProducer(
                bootstrap_servers=self._kafka.bootstrap,
                acks="all",
                linger_ms=5,
                request_timeout_ms=int(self._timeout_s * 1000),
                client_id="authopt-server-decisions",
                **self._kafka.client_options(),
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
