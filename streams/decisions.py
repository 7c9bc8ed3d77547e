"""Decisions joined to their outcomes: the one join that export, training and evaluation share.

A decision (`DecisionRecord` on `authopt.decisions.v1`) and the outcome of the attempt that followed
it (`AttemptEvent` on `authopt.attempts.v1`) share the Recommend `request_id`. Nothing is dropped
silently: a decision whose outcome never came, an outcome that came later than `late_after_s` after
its decision, an outcome whose decision is not in the data, and repeated records (Kafka delivers at
least once; the same `event_id` or `request_id` twice) are all counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from authopt.v1 import events_pb2

__all__ = ["DecisionJoin", "join_decisions"]


@dataclass
class DecisionJoin:
    """What `join_decisions` found."""

    pairs: list[tuple[events_pb2.DecisionRecord, events_pb2.AttemptEvent]] = field(default_factory=list)
    """Each decision with the outcome that followed it, in the decisions' order."""
    unanswered: list[events_pb2.DecisionRecord] = field(default_factory=list)
    """Decisions with no outcome in the data (the attempt was not reported, or not yet)."""
    late: int = 0
    """Pairs whose outcome was received more than `late_after_s` after the decision (kept in `pairs`)."""
    orphan_outcomes: int = 0
    """Outcomes naming a request id that no decision in the data has (or none at all)."""
    duplicate_decisions: int = 0
    duplicate_outcomes: int = 0

    @property
    def decisions(self) -> int:
        return len(self.pairs) + len(self.unanswered)


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def join_decisions(
    decisions: Iterable[events_pb2.DecisionRecord],
    outcomes: Iterable[events_pb2.AttemptEvent],
    *,
    late_after_s: float = 3600.0,
) -> DecisionJoin:
    """Join `decisions` to `outcomes` by request id; the first of repeated records counts."""
    out = DecisionJoin()
    by_request: dict[str, events_pb2.AttemptEvent] = {}
    seen_events: set[str] = set()
    for event in outcomes:
        outcome = event.outcome
        if outcome.event_id in seen_events:
            out.duplicate_outcomes += 1
            continue
        seen_events.add(outcome.event_id)
        if not outcome.request_id:
            out.orphan_outcomes += 1
        elif outcome.request_id in by_request:
            out.duplicate_outcomes += 1  # a second attempt reported against one decision
        else:
            by_request[outcome.request_id] = event
    seen_decisions: set[str] = set()
    for decision in decisions:
        request_id = decision.request.request_id
        if request_id in seen_decisions:
            out.duplicate_decisions += 1
            continue
        seen_decisions.add(request_id)
        answer = by_request.pop(request_id) if request_id in by_request else None
        if answer is None:
            out.unanswered.append(decision)
            continue
        if _seconds(answer.received_at) - _seconds(decision.decided_at) > late_after_s:
            out.late += 1
        out.pairs.append((decision, answer))
    out.orphan_outcomes += len(by_request)
    return out
