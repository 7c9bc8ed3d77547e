"""The gRPC servicer: validation, idempotency, tracing and metrics around the decision engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from authopt.v1 import events_pb2, optimizer_pb2, optimizer_pb2_grpc
from server import validation
from server.decision import DecisionEngine, annotate
from server.decision_log import DecisionLog, NoDecisionLog
from server.errors import (
    DeadlinePassed,
    InvalidArgument,
    ResourceExhausted,
    StatusError,
    abort_with,
    to_stream_error,
)
from server.idempotency import IdempotencyCache
from server.publisher import OutcomePublisher
from server.shadow import CHALLENGER, Shadow, arm_of
from server.telemetry import Metrics, extract_trace_context, tracer

__all__ = ["OptimizerService"]

log = logging.getLogger(__name__)
_SERVICE = "authopt.v1.AuthorizationOptimizerService"
Context = grpc.aio.ServicerContext[Any, Any]
_STREAM_CONCURRENCY = 64  # decisions in flight per RecommendStream
_MIN_REMAINING_S = 0.002  # a call with less left than this is not started (DEADLINE_PASSED)


class OptimizerService(optimizer_pb2_grpc.AuthorizationOptimizerServiceServicer):
    """Implements authopt.v1.AuthorizationOptimizerService."""

    def __init__(
        self,
        engine: DecisionEngine,
        idempotency: IdempotencyCache,
        publisher: OutcomePublisher,
        metrics: Metrics,
        *,
        limits: validation.Limits,
        default_budget_ms: int,
        max_message_bytes: int,
        has_configured_routes: bool,
        replica_id: str,
        decision_log: DecisionLog | None = None,
        challenger: DecisionEngine | None = None,
        shadow: Shadow | None = None,
        ab_challenger_share: float = 0.0,
        max_in_flight: int = 64,
        max_outcomes_publishing: int = 20_000,
    ) -> None:
        if (shadow is not None or ab_challenger_share > 0) and challenger is None:
            raise ValueError("a shadow or an A/B split needs the challenger's engine")
        self._engine = engine
        self._challenger = challenger
        self._shadow = shadow
        self._ab_share = ab_challenger_share
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._max_outcomes_publishing = max_outcomes_publishing
        self._outcomes_publishing = 0  # outcomes of ReportOutcome(s) calls waiting for the broker
        metrics.in_flight.set_function(lambda: self._in_flight)
        self._shed = {r: metrics.shed.labels(r) for r in ("deadline_passed", "overload")}
        self._idem = idempotency
        self._publisher = publisher
        self._metrics = metrics
        self._limits = limits
        self._default_budget_s = default_budget_ms / 1000
        self._max_bytes = max_message_bytes
        self._require_candidates = not has_configured_routes
        self._replica_id = replica_id
        self._decision_log = decision_log if decision_log is not None else NoDecisionLog()
        self._latency = {m: metrics.rpc_latency.labels(m) for m in ("Recommend", "ReportOutcome")}
        # Bound once: a labels() lookup per request costs more than the increment.
        self._decisions = {
            v.number: metrics.decisions.labels(v.name) for v in optimizer_pb2.DecisionSource.DESCRIPTOR.values
        }

    def _check_size(
        self,
        msg: optimizer_pb2.RecommendRequest
        | optimizer_pb2.ReportOutcomeRequest
        | optimizer_pb2.ReportOutcomesRequest,
    ) -> None:
        size = msg.ByteSize()
        if size > self._max_bytes:
            raise InvalidArgument(
                "MESSAGE_TOO_LARGE",
                f"request is {size} bytes; the limit is {self._max_bytes} bytes",
                field="",
            )

    async def _recommend(
        self, req: optimizer_pb2.RecommendRequest, time_remaining: float | None
    ) -> optimizer_pb2.RecommendResponse:
        if time_remaining is not None and time_remaining < _MIN_REMAINING_S:
            # Waited in the transport past (or to the edge of) its deadline: the caller has given up
            # or is about to. Working on it would only delay the calls that can still be answered.
            self._shed["deadline_passed"].inc()
            raise DeadlinePassed(
                "DEADLINE_PASSED",
                f"the call's deadline passed before the server could start on it "
                f"({max(time_remaining, 0.0) * 1000:.1f} ms left); not worked on",
                field="",
            )
        started = self._engine.loop_time()
        self._check_size(req)
        validation.validate_recommend(
            req, self._limits, time.time(), require_candidates=self._require_candidates
        )
        budget = req.latency_budget_ms / 1000 if req.latency_budget_ms else self._default_budget_s
        if time_remaining is not None:
            budget = min(budget, time_remaining)
        deadline = started + budget
        if self._idem.enabled:
            resp = await self._idem.get_or_decide(req, lambda: self._decide(req, deadline, started))
        else:
            resp = await self._decide(req, deadline, started)
        self._decisions[resp.decision_source].inc()
        return resp

    async def _decide(
        self, req: optimizer_pb2.RecommendRequest, deadline: float, started: float
    ) -> optimizer_pb2.RecommendResponse:
        """A new decision (an idempotent replay is not one), queued for the decision log: the log's
        task publishes it after the response has gone. Under an A/B split the card's arm decides
        (server/shadow.py); with a shadow, the challenger's decision for the champion's requests
        follows in the background, and the log gets both."""
        if self._in_flight >= self._max_in_flight:
            # Admission control: the model path is full; waiting for it would spend the request's
            # budget in a queue. Answer now from the fallback policy, which says so in its source.
            self._shed["overload"].inc()
            resp = self._engine.shed(req, started)
            self._decision_log.offer(req, resp, time.time())
            return resp
        self._in_flight += 1
        try:
            return await self._admitted(req, deadline, started)
        finally:
            self._in_flight -= 1

    async def _admitted(
        self, req: optimizer_pb2.RecommendRequest, deadline: float, started: float
    ) -> optimizer_pb2.RecommendResponse:
        arm = ""
        engine = self._engine
        if self._ab_share > 0:
            arm = arm_of(req.attempt.card.fingerprint, self._ab_share)
            self._metrics.ab_decisions.labels(arm).inc()
            if arm == CHALLENGER and self._challenger is not None:
                engine = self._challenger
        resp = await engine.decide(req, deadline, started)
        if self._shadow is not None and arm != CHALLENGER:
            self._shadow.after(req, resp, time.time(), arm)
        else:
            self._decision_log.offer(req, resp, time.time(), arm=arm)
        return resp

    async def Recommend(
        self, request: optimizer_pb2.RecommendRequest, context: Context
    ) -> optimizer_pb2.RecommendResponse:
        t0 = time.perf_counter()
        parent = extract_trace_context(context.invocation_metadata())
        # The span made current by hand: start_as_current_span's context manager costs ~4x more.
        span = tracer.start_span(f"{_SERVICE}/Recommend", context=parent, kind=trace.SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            try:
                resp = await self._recommend(request, context.time_remaining())
            except StatusError as err:
                self._metrics.errors.labels(err.reason).inc()
                span.set_attribute("authopt.error_reason", err.reason)
                await abort_with(context, err)
            if span.is_recording():
                annotate(span, resp)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                self._metrics.late.inc()
        except BaseException as exc:
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            otel_context.detach(token)
            span.end()
        self._latency["Recommend"].observe(time.perf_counter() - t0)
        return resp

    async def RecommendStream(
        self,
        request_iterator: AsyncIterator[optimizer_pb2.RecommendStreamRequest],
        context: Context,
    ) -> AsyncIterator[optimizer_pb2.RecommendStreamResponse]:
        parent = extract_trace_context(context.invocation_metadata())
        out: asyncio.Queue[optimizer_pb2.RecommendStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(_STREAM_CONCURRENCY)

        async def one(msg: optimizer_pb2.RecommendStreamRequest) -> None:
            try:
                with tracer.start_as_current_span(
                    f"{_SERVICE}/RecommendStream", context=parent, kind=trace.SpanKind.SERVER
                ) as span:
                    try:
                        resp = await self._recommend(msg.request, None)
                        annotate(span, resp)
                        await out.put(
                            optimizer_pb2.RecommendStreamResponse(request_id=resp.request_id, response=resp)
                        )
                    except StatusError as err:
                        self._metrics.errors.labels(err.reason).inc()
                        await out.put(
                            optimizer_pb2.RecommendStreamResponse(
                                request_id=msg.request.request_id, error=to_stream_error(err)
                            )
                        )
            finally:
                slots.release()

        async def pump() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for msg in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await out.put(None)

        pumper = asyncio.create_task(pump())
        try:
            while (item := await out.get()) is not None:
                yield item
            await pumper
        finally:
            pumper.cancel()

    def _event(self, outcome: object) -> events_pb2.AttemptEvent:
        received = timestamp_pb2.Timestamp()
        received.GetCurrentTime()
        return events_pb2.AttemptEvent(outcome=outcome, received_at=received, producer=self._replica_id)  # type: ignore[arg-type]

    async def _publish(self, events: list[events_pb2.AttemptEvent], context: Context) -> None:
        parent = extract_trace_context(context.invocation_metadata())
        with tracer.start_as_current_span(
            f"{_SERVICE}/ReportOutcome", context=parent, kind=trace.SpanKind.SERVER
        ):
            try:
                if self._outcomes_publishing + len(events) > self._max_outcomes_publishing:
                    # The broker is slower than the callers: refuse at once, with when to come back,
                    # rather than hold an unbounded pile of calls (each holding its outcomes) here.
                    self._metrics.shed.labels("outcomes_backlog").inc()
                    raise ResourceExhausted(
                        "OUTCOMES_BACKLOG",
                        f"{self._outcomes_publishing} outcomes are waiting for the broker (limit "
                        f"{self._max_outcomes_publishing}); retry after the delay in RetryInfo",
                        field="outcomes",
                        retry_after_s=0.5,
                    )
                self._outcomes_publishing += len(events)
                try:
                    await self._publisher.publish(events)
                finally:
                    self._outcomes_publishing -= len(events)
            except StatusError as err:
                self._metrics.errors.labels(err.reason).inc()
                await abort_with(context, err)
        self._metrics.outcomes.inc(len(events))

    async def ReportOutcome(
        self, request: optimizer_pb2.ReportOutcomeRequest, context: Context
    ) -> optimizer_pb2.ReportOutcomeResponse:
        t0 = time.perf_counter()
        try:
            self._check_size(request)
            if not request.HasField("outcome"):
                raise InvalidArgument("MISSING_FIELD", "outcome is required", field="outcome")
            validation.validate_outcome(request.outcome, self._limits, time.time())
        except StatusError as err:
            self._metrics.errors.labels(err.reason).inc()
            await abort_with(context, err)
        await self._publish([self._event(request.outcome)], context)
        self._engine.observe(request.outcome)  # route health: published, not yet in any feature
        self._latency["ReportOutcome"].observe(time.perf_counter() - t0)
        return optimizer_pb2.ReportOutcomeResponse(event_id=request.outcome.event_id)

    async def ReportOutcomes(
        self, request: optimizer_pb2.ReportOutcomesRequest, context: Context
    ) -> optimizer_pb2.ReportOutcomesResponse:
        try:
            self._check_size(request)
            validation.validate_outcomes(request, self._limits, time.time())
        except StatusError as err:
            self._metrics.errors.labels(err.reason).inc()
            await abort_with(context, err)
        await self._publish([self._event(o) for o in request.outcomes], context)
        for outcome in request.outcomes:  # route health: published, not yet in any feature
            self._engine.observe(outcome)
        return optimizer_pb2.ReportOutcomesResponse(accepted=len(request.outcomes))
