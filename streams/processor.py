"""The worker's core, without Faust: validate attempt events and fold them into entity states.

`FeatureProcessor.process(partition, records)` takes the raw records of one source partition, in
offset order, and returns the snapshots of every entity they changed (one per entity per call: the
coalescing) and the records that must go to the dead-letter topic, each with its reason. The Faust
agent (streams.worker) calls it once per batch and partition; the offline replay (streams.replay)
calls it with one partition for a whole log. States are read from and written to a plain mapping of
snapshot bytes by table key, which in the worker is the Faust table whose changelog is
`authopt.features.v1`.

A replayed event (a restart or rebalance reprocesses records since the last commit; a caller reports
the same outcome twice) is recognised by its event id among the card x merchant's recent attempts,
and applied to nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from google.protobuf.message import DecodeError

from authopt.v1 import attempt_pb2, events_pb2
from streams.contract import Entity
from streams.features import (
    Attempt,
    EntityState,
    aggregate_updates,
    epoch_s,
    from_snapshot,
    recent_entry,
    to_snapshot,
)

__all__ = [
    "BatchResult",
    "DeadLetter",
    "DeadReason",
    "FeatureProcessor",
    "check_event",
    "table_key",
]

DEFAULT_LATENESS_S = 3600.0
DEFAULT_MAX_FUTURE_S = 300.0


class DeadReason(StrEnum):
    """Why a record went to `authopt.attempts.dlq.v1` (the `authopt-dlq-reason` header)."""

    UNDECODABLE = "UNDECODABLE"
    MISSING_FIELD = "MISSING_FIELD"
    NEGATIVE_AMOUNT = "NEGATIVE_AMOUNT"
    EVENT_IN_FUTURE = "EVENT_IN_FUTURE"
    EVENT_TOO_LATE = "EVENT_TOO_LATE"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record refused, with its position in the batch and why."""

    index: int
    reason: DeadReason
    detail: str


def _missing(event: events_pb2.AttemptEvent) -> str | None:
    """The first required field `event` lacks, in this order; None when it has them all."""
    o = event.outcome
    a = o.attempt
    if not o.event_id:
        return "outcome.event_id"
    if not o.route_id:
        return "outcome.route_id"
    if o.status == attempt_pb2.OUTCOME_STATUS_UNSPECIFIED:
        return "outcome.status"
    if not o.HasField("attempted_at"):
        return "outcome.attempted_at"
    if not a.merchant.id:
        return "outcome.attempt.merchant.id"
    card = a.card
    if not card.fingerprint:
        return "outcome.attempt.card.fingerprint"
    if not card.bin:
        return "outcome.attempt.card.bin"
    if not a.currency:
        return "outcome.attempt.currency"
    if not event.HasField("received_at"):
        return "received_at"
    return None


def check_event(
    value: bytes,
    *,
    lateness_s: float = DEFAULT_LATENESS_S,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> Attempt | tuple[DeadReason, str]:
    """The attempt in one record, or why it cannot be used.

    Event time is judged against the time the server accepted the report (`received_at`), not the
    worker's clock: the verdict is the same live, after a restart and in an offline replay.
    """
    event = events_pb2.AttemptEvent()
    try:
        event.ParseFromString(value)
    except DecodeError as exc:
        return DeadReason.UNDECODABLE, f"not an authopt.v1.AttemptEvent: {exc}"
    missing = _missing(event)
    if missing is not None:
        return DeadReason.MISSING_FIELD, f"{missing} is required"
    if event.outcome.attempt.amount_minor < 0:
        return (
            DeadReason.NEGATIVE_AMOUNT,
            f"outcome.attempt.amount_minor is {event.outcome.attempt.amount_minor}",
        )
    attempt = Attempt.from_event(event)
    received = epoch_s(event.received_at)
    if attempt.at > received + max_future_s:
        return (
            DeadReason.EVENT_IN_FUTURE,
            f"outcome.attempted_at is {attempt.at - received:.0f}s after received_at"
            f" (limit {max_future_s:g}s)",
        )
    if attempt.at < received - lateness_s:
        return (
            DeadReason.EVENT_TOO_LATE,
            f"outcome.attempted_at is {received - attempt.at:.0f}s before received_at"
            f" (limit {lateness_s:g}s)",
        )
    return attempt


def table_key(entity: Entity, key: str, partition: int) -> bytes:
    """Key of an entity's state from one source partition: "<entity>:<key>#<partition>"."""
    return f"{_PREFIX[entity]}{key}#{partition}".encode()


_PREFIX = {e: f"{e.value}:" for e in Entity}
_CARD_MERCHANT = Entity.CARD_MERCHANT


@dataclass(slots=True)
class BatchResult:
    """What one `process` call did."""

    snapshots: dict[bytes, bytes] = field(default_factory=dict)  # table key -> FeatureSnapshot bytes
    dead: list[DeadLetter] = field(default_factory=list)
    applied: list[Attempt] = field(default_factory=list)
    duplicates: int = 0


class FeatureProcessor:
    """Folds attempt records into entity states kept in `states` (table key -> snapshot bytes)."""

    def __init__(
        self,
        states: Mapping[bytes, bytes | None],
        *,
        lateness_s: float = DEFAULT_LATENESS_S,
        max_future_s: float = DEFAULT_MAX_FUTURE_S,
        decoded_max: int = 200_000,
    ) -> None:
        self._states = states
        # The decoded state behind the latest value written for hot (non-card) keys. Reused only
        # while the table still holds exactly that value, so a value recovered from another
        # worker's writes is always decoded afresh.
        self._decoded: dict[bytes, tuple[bytes, EntityState]] = {}
        self._decoded_max = decoded_max
        self.lateness_s = lateness_s
        self.max_future_s = max_future_s

    def process(
        self,
        partition: int,
        records: Sequence[bytes],
        write: Callable[[bytes, bytes], None] | None = None,
    ) -> BatchResult:
        """Apply `records` (one partition, offset order); `write(key, snapshot)` each changed state."""
        result = BatchResult()
        cache: dict[bytes, tuple[Entity, str, EntityState]] = {}
        dirty: set[bytes] = set()
        load = self._load

        def state(entity: Entity, key: str) -> tuple[bytes, EntityState]:
            tkey = table_key(entity, key, partition)
            hit = cache.get(tkey)
            if hit is None:
                hit = cache[tkey] = (entity, key, load(tkey))
            return tkey, hit[2]

        for index, value in enumerate(records):
            checked = check_event(value, lateness_s=self.lateness_s, max_future_s=self.max_future_s)
            if not isinstance(checked, Attempt):  # (reason, detail)
                result.dead.append(DeadLetter(index, *checked))
                continue
            a = checked
            ckey, card = state(_CARD_MERCHANT, f"{a.fingerprint}|{a.merchant}")
            if card.has_event(a.event_id):
                result.duplicates += 1
                continue
            card.add_recent(recent_entry(a))
            dirty.add(ckey)
            for entity, key, increments in aggregate_updates(a):
                tkey, st = state(entity, key)
                st.add(a.at, increments)
                dirty.add(tkey)
            result.applied.append(a)

        self._flush(partition, cache, dirty, result, write)
        return result

    def _load(self, tkey: bytes) -> EntityState:
        raw = self._states.get(tkey)
        known = self._decoded.get(tkey)
        if known is not None and raw is not None and known[0] == raw:
            return known[1]  # decoded from this very value before: skip the parse
        if raw:
            snap = events_pb2.FeatureSnapshot()
            snap.ParseFromString(raw)
            return from_snapshot(snap)
        return EntityState()

    def _flush(
        self,
        partition: int,
        cache: Mapping[bytes, tuple[Entity, str, EntityState]],
        dirty: set[bytes],
        result: BatchResult,
        write: Callable[[bytes, bytes], None] | None,
    ) -> None:
        decoded = self._decoded
        if len(decoded) > self._decoded_max:
            decoded.clear()
        for tkey in dirty:
            entity, key, st = cache[tkey]
            raw = to_snapshot(entity, key, partition, st).SerializeToString()
            result.snapshots[tkey] = raw
            if entity is not _CARD_MERCHANT:  # cards are rarely seen twice in a row: not worth keeping
                decoded[tkey] = (raw, st)
            if write is not None:
                write(tkey, raw)
