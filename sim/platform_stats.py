"""What the simulated payment platform (`sim.platform`) measures, for the dashboard and the summary.

`PlatformStats` is the whole of it: request counts and errors, decision sources, Recommend latency
(as the platform waits for it and as the server reports it) in bounded-memory histograms, the live
figures of the last few seconds, the outcome reports, and one `Tally` per policy (authopt and the
static baseline) on the same payments. `summary()` is the JSON-ready `platform` part of the
`authopt up` / `authopt simulate` summary (docs/up.md lists its keys).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from authopt.v1 import optimizer_pb2

__all__ = ["LatencyHistogram", "PlatformStats", "Tally"]

_SOURCE_PREFIX = "DECISION_SOURCE_"
_WINDOW_S = 5.0  # live figures (rates, percentiles, freshness) cover the last few seconds


class LatencyHistogram:
    """Log-spaced buckets (2 % wide) of latencies in milliseconds: percentiles in bounded memory."""

    _STEP = math.log(1.02)

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.n = 0
        self.max_ms = 0.0

    def add(self, ms: float) -> None:
        self.counts[int(math.log(max(ms, 1e-3)) / self._STEP)] += 1
        self.n += 1
        self.max_ms = max(self.max_ms, ms)

    def quantile(self, q: float) -> float:
        """The q-quantile (upper edge of its bucket; within 2 %); 0 when empty."""
        if self.n == 0:
            return 0.0
        rank, seen = q * self.n, 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(math.exp((bucket + 1) * self._STEP), self.max_ms)
        return self.max_ms


@dataclass
class Tally:
    """One policy's results on the payments played so far."""

    payments: int = 0
    first_approved: int = 0
    approved: int = 0
    attempts: int = 0
    retries: int = 0
    deferred: int = 0  # retries advised for after the run's end (not played)
    approved_minor: float = 0.0
    cost_minor: float = 0.0
    fees_minor: float = 0.0
    p_first: float = 0.0  # sum of the true P(approve) of the first route chosen

    def attempted(self, number: int, cost_minor: float, retry_fee_minor: float) -> None:
        """Count attempt `number` (1 = the first) of a payment: its route's cost; a retry's fee."""
        self.attempts += 1
        self.cost_minor += cost_minor
        if number > 1:
            self.retries += 1
            self.fees_minor += retry_fee_minor

    def approved_at(self, number: int, amount_minor: float) -> None:
        """Count a payment approved at its attempt `number`."""
        self.approved += 1
        self.first_approved += number == 1
        self.approved_minor += amount_minor

    def merge(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def net_minor(self) -> float:
        return self.approved_minor - self.cost_minor - self.fees_minor

    def as_dict(self) -> dict[str, Any]:
        n = max(self.payments, 1)
        return {
            "payments": self.payments,
            "first_attempt_approval": self.first_approved / n,
            "approval": self.approved / n,
            "expected_first_attempt_approval": self.p_first / n,
            "net_revenue_minor": round(self.net_minor, 2),
            "attempts": self.attempts,
            "retries": self.retries,
            "retries_deferred": self.deferred,
        }


@dataclass
class PlatformStats:
    """Everything the dashboard and the summary show; touched only from the platform's event loop."""

    target_rate: float
    started: float = field(default_factory=time.monotonic)
    stopped: float | None = None
    payments_started: int = 0
    payments_done: int = 0
    requests: int = 0
    request_errors: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    explored: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # as the platform waits for it
    server_time: LatencyHistogram = field(default_factory=LatencyHistogram)  # as the server reports it
    authopt: Tally = field(default_factory=Tally)
    static: Tally = field(default_factory=Tally)
    oracle_p_first: float = 0.0  # sum of the best true P(approve) over the eligible routes
    outcomes_made: int = 0  # attempts played by authopt's decisions (each one is reported)
    reported: int = 0  # outcomes the server accepted (on the broker: acks=all)
    report_errors: Counter[str] = field(default_factory=Counter)
    report_backlog: int = 0
    unreported: int = 0  # outcomes that could not be reported before the end
    sim_time: float = 0.0  # the world's clock at the newest first attempt
    throttled: int = 0  # payments that waited for an in-flight slot
    recent: deque[tuple[float, float, float]] = field(default_factory=deque)  # (t, latency ms, feed age ms)
    end_live: dict[str, Any] | None = None  # live() when the traffic stopped
    incidents: list[dict[str, Any]] = field(default_factory=list)  # those the run played through
    starts: deque[float] = field(default_factory=deque)  # when recent payments started

    def note_response(self, latency_ms: float, resp: optimizer_pb2.RecommendResponse) -> None:
        now = time.monotonic()
        self.requests += 1
        self.latency.add(latency_ms)
        self.server_time.add(resp.server_time_us / 1000)
        self.sources[_source_name(resp)] += 1
        self.explored += resp.explored
        self.recent.append((now, latency_ms, float(resp.route_feature_age_ms)))
        while self.recent and self.recent[0][0] < now - _WINDOW_S:
            self.recent.popleft()

    def live(self) -> dict[str, Any]:
        """The last few seconds: request rate, latency percentiles, feature-feed age."""
        now = time.monotonic()
        recent = [r for r in self.recent if r[0] >= now - _WINDOW_S]
        span = min(_WINDOW_S, max(now - self.started, 1e-9))
        lat = sorted(r[1] for r in recent)
        ages = sorted(r[2] for r in recent if r[2] >= 0)
        while self.starts and self.starts[0] < now - _WINDOW_S:
            self.starts.popleft()
        return {
            "payments_per_s": len(self.starts) / span,
            "requests_per_s": len(recent) / span,
            "latency_p50_ms": _pick(lat, 0.5),
            "latency_p99_ms": _pick(lat, 0.99),
            "feature_age_p50_ms": _pick(ages, 0.5) if ages else None,
            "feature_age_max_ms": ages[-1] if ages else None,
        }

    def summary(self) -> dict[str, Any]:
        elapsed = (self.stopped or time.monotonic()) - self.started
        decided = max(sum(self.sources.values()), 1)
        n = max(self.authopt.payments, 1)
        live = self.end_live or self.live()
        return {
            "elapsed_s": round(elapsed, 3),
            "target_rate": self.target_rate,
            "payments": self.authopt.payments,
            "payments_per_s": self.authopt.payments / max(elapsed, 1e-9),
            "requests": self.requests,
            "requests_per_s": self.requests / max(elapsed, 1e-9),
            "request_errors": dict(self.request_errors),
            "latency_ms": {
                "p50": self.latency.quantile(0.5),
                "p99": self.latency.quantile(0.99),
                "max": self.latency.max_ms,
            },
            "server_time_ms": {"p50": self.server_time.quantile(0.5), "p99": self.server_time.quantile(0.99)},
            "decision_sources": dict(self.sources),
            "model_share": self.sources.get("MODEL", 0) / decided,
            "fallback_share": sum(v for k, v in self.sources.items() if k != "MODEL") / decided,
            "exploration_share": self.explored / decided,
            "feature_age_ms": {"p50": live["feature_age_p50_ms"], "max": live["feature_age_max_ms"]},
            "authopt": self.authopt.as_dict(),
            "static": self.static.as_dict(),
            "oracle_expected_first_attempt_approval": self.oracle_p_first / n,
            "outcomes_reported": self.reported,
            "outcomes_unreported": self.unreported,
            "report_errors": dict(self.report_errors),
            "throttled_payments": self.throttled,
            "world_clock": {
                "end": datetime.fromtimestamp(self.sim_time, UTC).isoformat() if self.sim_time else None,
            },
            "incidents": self.incidents,
        }


def _pick(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def _source_name(resp: optimizer_pb2.RecommendResponse) -> str:
    return optimizer_pb2.DecisionSource.Name(resp.decision_source).removeprefix(_SOURCE_PREFIX)
