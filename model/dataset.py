"""Training rows from an event log, through the streams' own feature code, point in time.

The log is what the server publishes on `authopt.attempts.v1` (length-delimited `AttemptEvent`s in
the order they were accepted). Every attempt gives a route-head row (output column 0): the features
as they stood just before it (`streams.replay.FeatureReplay`: only earlier events are in them), its
payment's earlier attempts as prior attempts, the route it used, and whether it was approved. Every
decline that the logging policy retried after exactly one of the model's delay buckets gives a
retry-head row (column 1 + b): the features just after the decline was reported (when the server
advises), the payment's attempts so far, the route of the retry, and whether the retry was approved.
The encoding is `model.layout.encode_flat` with `model.features.lookup_features` and
`attempt_context`: byte for byte what the server computes.
"""

from __future__ import annotations

import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from authopt.v1 import attempt_pb2, events_pb2
from model.features import attempt_context, lookup_features
from model.layout import DELAY_BUCKETS_S, INPUT_LAYOUT, AttemptContext, encode_flat
from model.train import TrainingSet
from streams.replay import FeatureReplay, ReplayStats
from streams.store import FeatureStore

__all__ = [
    "DatasetSummary",
    "RowSpec",
    "build_training_set",
    "encode_candidates",
    "encode_in_context",
    "payment_rows",
    "prior_of",
]

_APPROVED = attempt_pb2.OUTCOME_STATUS_APPROVED
_BUCKET_TOLERANCE_S = 1.0


@dataclass
class DatasetSummary:
    events: int = 0
    route_rows: int = 0
    retry_rows: int = 0
    retry_rows_by_bucket: dict[int, int] = field(default_factory=dict)
    approved_share: float = 0.0
    dead_letters: dict[str, int] = field(default_factory=dict)
    first_event_at: float = 0.0
    last_event_at: float = 0.0
    split_row: int | None = None  # the first row of an event at or after `split_at`

    def as_dict(self) -> dict[str, object]:
        return {
            "events": self.events,
            "route_rows": self.route_rows,
            "retry_rows": self.retry_rows,
            "retry_rows_by_bucket_s": {
                str(DELAY_BUCKETS_S[b]): n for b, n in sorted(self.retry_rows_by_bucket.items())
            },
            "approved_share": round(self.approved_share, 6),
            "dead_letters": dict(self.dead_letters),
            "first_event_at": self.first_event_at,
            "last_event_at": self.last_event_at,
        }


def prior_of(outcome: attempt_pb2.AttemptOutcome) -> attempt_pb2.PriorAttempt:
    """An earlier attempt as a Recommend request carries it."""
    prior = attempt_pb2.PriorAttempt(
        route_id=outcome.route_id,
        response_code=outcome.response_code,
        mastercard_mac=outcome.mastercard_mac,
        visa_category=outcome.visa_category,
    )
    prior.attempted_at.CopyFrom(outcome.attempted_at)
    return prior


def encode_candidates(
    store: FeatureStore,
    attempt: attempt_pb2.Attempt,
    priors: Sequence[attempt_pb2.PriorAttempt],
    routes: Sequence[tuple[str, int]],
    at: float,
) -> array.array[float]:
    """The model inputs of `attempt` on each of `routes` (id, cost in bps), one row after another, from
    the features in `store` at time `at`: byte for byte what the server computes."""
    return encode_in_context(store, attempt, attempt_context(attempt, priors, at=at), routes)


def encode_in_context(
    store: FeatureStore, attempt: attempt_pb2.Attempt, ctx: AttemptContext, routes: Sequence[tuple[str, int]]
) -> array.array[float]:
    """`encode_candidates` with the request-level inputs already computed."""
    feats = lookup_features(store, attempt, [r for r, _ in routes])
    rows = [(r, cost, f) for (r, cost), f in zip(routes, feats.route_rows, strict=True)]
    return encode_flat(ctx, rows, feats.attempt_rows)


def _seconds(ts: object) -> float:
    return ts.seconds + ts.nanos / 1e9  # type: ignore[attr-defined, no-any-return]


def _bucket(delay_s: float) -> int | None:
    for b, d in enumerate(DELAY_BUCKETS_S):
        if abs(delay_s - d) <= _BUCKET_TOLERANCE_S:
            return b
    return None


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One training row of a payment's attempt, all but its features: which attempt of the payment
    it belongs to, whether it reads the features just before that attempt was applied (a route row)
    or just after (a retry row), its output column, route, label and request-level inputs."""

    index: int  # of the attempt among the payment's attempts
    after: bool
    column: int
    route: str
    y: float
    attempt: attempt_pb2.Attempt
    ctx: AttemptContext


def payment_rows(outcomes: Sequence[attempt_pb2.AttemptOutcome]) -> list[RowSpec]:
    """The rows of one payment's attempts (`outcomes`: its events in log order), in row order: each
    attempt's route row, then its retry row when the attempt was declined and the next one followed
    after one of the retry head's delay buckets."""
    priors: list[attempt_pb2.PriorAttempt] = []
    out: list[RowSpec] = []
    for k, o in enumerate(outcomes):
        at = _seconds(o.attempted_at)
        attempt = attempt_pb2.Attempt()
        attempt.CopyFrom(o.attempt)
        ok = o.status == _APPROVED
        out.append(
            RowSpec(
                k, False, 0, o.route_id, 1.0 if ok else 0.0, attempt, attempt_context(attempt, priors, at)
            )
        )
        priors.append(prior_of(o))
        if ok or k + 1 == len(outcomes):
            continue
        nxt = outcomes[k + 1]
        b = _bucket(_seconds(nxt.attempted_at) - at)
        if b is not None:
            retry = attempt_pb2.Attempt()
            retry.CopyFrom(o.attempt)
            retry.attempt_number = len(priors) + 1
            y = 1.0 if nxt.status == _APPROVED else 0.0
            out.append(RowSpec(k, True, 1 + b, nxt.route_id, y, retry, attempt_context(retry, priors, at)))
    return out


def build_training_set(
    records: Iterable[bytes],
    route_cost_bps: Mapping[str, int],
    *,
    progress: Callable[[int], None] | None = None,
    split_at: float | None = None,
) -> tuple[TrainingSet, DatasetSummary]:
    """Rows for the route head and the retry head (see the module docstring), in one process.

    `route_cost_bps` gives each route's variable cost (a layout input the log does not carry). Rows
    come in the order of their events; with `split_at` (epoch seconds), `summary.split_row` is the
    first row of an event at or after it (a time-based hold-out: every row before it is older).
    (history.backfill computes the same rows on Spark.)
    """
    raw = list(records)
    events = [events_pb2.AttemptEvent.FromString(r) for r in raw]
    # Each event's rows: its payment's (the attempts sharing its request id, in log order).
    by_payment: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        by_payment[e.outcome.request_id].append(i)
    specs: list[list[RowSpec]] = [[] for _ in events]
    for members in by_payment.values():
        for spec in payment_rows([events[i].outcome for i in members]):
            specs[members[spec.index]].append(spec)
    del by_payment

    width = len(INPUT_LAYOUT)
    xs = array.array("f")
    cols: list[int] = []
    ys: list[float] = []
    stats = ReplayStats()
    live = FeatureReplay(lateness_s=float("inf"), max_future_s=float("inf"), stats=stats)
    summary = DatasetSummary(events=len(events))
    approved = 0

    def emit(spec: RowSpec) -> None:
        xs.extend(
            encode_in_context(
                live.store, spec.attempt, spec.ctx, [(spec.route, route_cost_bps.get(spec.route, 0))]
            )
        )
        cols.append(spec.column)
        ys.append(spec.y)
        if spec.column:
            summary.retry_rows_by_bucket[spec.column - 1] = (
                summary.retry_rows_by_bucket.get(spec.column - 1, 0) + 1
            )

    for i, (record, e) in enumerate(zip(raw, events, strict=True)):
        at = _seconds(e.outcome.attempted_at)
        if split_at is not None and summary.split_row is None and at >= split_at:
            summary.split_row = len(cols)
        rows = specs[i]
        emit(rows[0])
        approved += rows[0].y == 1.0
        live.apply(record)
        for spec in rows[1:]:
            emit(spec)
        specs[i] = []
        if progress is not None:
            progress(i + 1)
    if split_at is not None and summary.split_row is None:
        summary.split_row = len(cols)
    summary.route_rows = cols.count(0)
    summary.retry_rows = len(cols) - summary.route_rows
    summary.approved_share = approved / len(events) if events else 0.0
    summary.dead_letters = dict(stats.dead)
    if events:
        summary.first_event_at = _seconds(events[0].outcome.attempted_at)
        summary.last_event_at = _seconds(events[-1].outcome.attempted_at)
    x = np.frombuffer(xs.tobytes(), dtype=np.float32).reshape(-1, width)
    data = TrainingSet(x=x, column=np.array(cols, dtype=np.int64), y=np.array(ys, dtype=np.float32))
    return data, summary
