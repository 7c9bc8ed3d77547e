"""A challenger model beside the served one: shadow decisions and an A/B split.

**Shadow** (`AUTHOPT_SERVER_SHADOW_MODEL_DIR`): after the caller has its answer from the champion,
the challenger decides the same request through its own engine (the same features, policy and rules;
its own model registry and micro-batcher), and the decision log records both (`DecisionRecord.shadow`).
The caller never waits on it: it runs as a background task, bounded in time (`shadow_timeout_ms`) and
in number (`shadow_max_in_flight`); one that is slow, fails, is refused for lack of room, or answers
from the fallback policy is skipped, and counted (`authopt_shadow_decisions_total{outcome}`). For the
rest, Prometheus shows whether the two put the same route first and each model's expected value of
its first route.

**A/B** (`AUTHOPT_SERVER_AB_CHALLENGER_SHARE`): that share of cards — by a hash of the card
fingerprint, so a payment's retries and a card's later payments stay with the model that started —
is decided by the challenger instead; the arm is in the decision log, so both a plain A/B comparison
and the off-policy estimates can use it. A request without a fingerprint goes to the champion.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

from authopt.v1 import optimizer_pb2
from server.decision_log import DecisionLog
from server.telemetry import Metrics

__all__ = ["CHALLENGER", "CHAMPION", "Shadow", "arm_of"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
_MODEL = optimizer_pb2.DECISION_SOURCE_MODEL
Decide = Callable[[optimizer_pb2.RecommendRequest, float, float], Awaitable[optimizer_pb2.RecommendResponse]]


def arm_of(fingerprint: str, share: float) -> str:
    """The A/B arm of a card: the challenger for `share` of fingerprints (stable across processes
    and restarts: a hash, not Python's salted `hash`)."""
    if share <= 0 or not fingerprint:
        return CHAMPION
    bucket = int.from_bytes(hashlib.blake2b(fingerprint.encode(), digest_size=8).digest(), "big") % 10_000
    return CHALLENGER if bucket < share * 10_000 else CHAMPION


def _first_value(resp: optimizer_pb2.RecommendResponse) -> float:
    return resp.routes[0].expected_value_minor if resp.routes else 0.0


class Shadow:
    """Shadow decisions by the challenger's `decide`, then the decision log (see the module docstring)."""

    def __init__(
        self,
        decide: Decide,
        decision_log: DecisionLog,
        metrics: Metrics,
        *,
        timeout_s: float,
        max_in_flight: int,
    ) -> None:
        self._decide = decide
        self._log = decision_log
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def after(
        self,
        req: optimizer_pb2.RecommendRequest,
        resp: optimizer_pb2.RecommendResponse,
        decided_at: float,
        arm: str = "",
    ) -> None:
        """The champion answered `req` with `resp`: score the challenger in the background, then log
        both (with the A/B `arm`, if any). Never blocks, never raises."""
        if len(self._tasks) >= self._max_in_flight:
            self._skip("busy")
            self._log.offer(req, resp, decided_at, arm=arm)
            return
        task = asyncio.create_task(self._run(req, resp, decided_at, arm), name="shadow-decision")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        req: optimizer_pb2.RecommendRequest,
        resp: optimizer_pb2.RecommendResponse,
        decided_at: float,
        arm: str,
    ) -> None:
        shadow: optimizer_pb2.RecommendResponse | None = None
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.timeout(self._timeout_s):
                shadow = await self._decide(req, started + self._timeout_s, started)
        except TimeoutError:
            self._skip("slow")
        except asyncio.CancelledError:
            self._skip("shutdown")
            self._log.offer(req, resp, decided_at, arm=arm)
            raise
        except Exception:
            log.exception("shadow decision failed; the champion's decision is logged alone")
            self._skip("error")
        else:
            if shadow.decision_source != _MODEL:
                self._skip("fallback")  # the challenger had no model answer: nothing to compare
                shadow = None
            else:
                self._compare(resp, shadow)
        self._log.offer(req, resp, decided_at, shadow=shadow, arm=arm)

    def _compare(
        self, champion: optimizer_pb2.RecommendResponse, challenger: optimizer_pb2.RecommendResponse
    ) -> None:
        if champion.decision_source != _MODEL:
            self._skip("champion_fallback")
            return
        same = bool(champion.routes and challenger.routes) and (
            champion.routes[0].route_id == challenger.routes[0].route_id
        )
        self._metrics.shadow_decisions.labels("agree" if same else "disagree").inc()
        self._metrics.shadow_expected_value.labels(CHAMPION).inc(_first_value(champion))
        self._metrics.shadow_expected_value.labels(CHALLENGER).inc(_first_value(challenger))

    def _skip(self, reason: str) -> None:
        self._metrics.shadow_decisions.labels(reason).inc()

    async def close(self, timeout_s: float) -> None:
        """Let the shadow decisions in flight finish (within `timeout_s`), then cancel the rest."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
