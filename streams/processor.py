"""The worker's core, without Faust: validate attempt events and fold them into entity states.

`FeatureProcessor.process(partition, records)` takes the raw records of one source partition, in
offset order, and returns the snapshots of every entity they changed (one per entity per call: the
coalescing) and the records that must go to the dead-letter topic, each with its reason. The Faust
agent (streams.worker) calls it once per batch and partition; the offline replay (streams.replay)
calls it with one partition for a whole log. States are read from and written to a plain mapping of
snapshot bytes by table key, which in the worker is the Faust table whose changelog is
`authopt.features.v1`.

A record is applied to each state at most once, even when a batch's states reached the changelog
only in part (a worker killed between two of their writes; a later one then replays what was not
committed). Given the records' offsets and the offset expected next, every state keeps the offset
after the last record applied to it (`next_offset`): all records below it that touch the state are
in it, because records are applied in offset order from where the partition's consumer started
(its committed offset: everything below is on the changelog). A replayed record then goes only to
the states that missed it. The card x merchant keeps the offset of each recent event, so the same
event id at another offset (a caller reporting one outcome twice) is a duplicate, applied to
nothing.

A record past a gap (offsets skipped, streams.progress: the worker seeks back for them) and every
record given without offsets (the offline replay) is applied the older way, which does not claim
the skipped offsets: an event id already among the card's recent attempts is a duplicate, and no
`next_offset` moves. Only a partial write of such records can still count one twice.
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
    cards: dict[str, EntityState] = field(default_factory=dict)  # changed card x merchant states by key


_State = Callable[[Entity, str], tuple[bytes, EntityState]]


def _apply_unordered(a: Attempt, ckey: bytes, card: EntityState, state: _State, dirty: set[bytes]) -> bool:
    """Apply `a` unless the card already holds its event id (no offsets moved); True if applied."""
    if card.has_event(a.event_id):
        return False
    card.add_recent(recent_entry(a))
    dirty.add(ckey)
    for entity, key, increments in aggregate_updates(a):
        tkey, st = state(entity, key)
        st.add(a.at, increments)
        dirty.add(tkey)
    return True


def _apply_at(
    offset: int, a: Attempt, ckey: bytes, card: EntityState, state: _State, dirty: set[bytes]
) -> bool:
    """Apply `a`, read in order at `offset`, to each state that does not hold it; True if any did."""
    seen_at = card.event_offset(a.event_id)
    if seen_at is not None and seen_at != offset:  # a second report of the event
        return False
    applied = seen_at is None
    if applied:
        card.add_recent(recent_entry(a, offset))
        card.next_offset = offset + 1
        dirty.add(ckey)
    for entity, key, increments in aggregate_updates(a):
        tkey, st = state(entity, key)
        if offset < st.next_offset and a.at <= st.as_of:  # holds it already (a replay)
            continue
        st.add(a.at, increments)
        st.next_offset = offset + 1
        dirty.add(tkey)
        applied = True
    return applied


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
        offsets: Sequence[int] | None = None,
        expected: int | None = None,
    ) -> BatchResult:
        """Apply `records` (one partition, offset order); `write(key, snapshot)` each changed state.

        `offsets`: each record's offset in `partition`; `expected`: the offset the partition's
        consumer is known to stand at (all below it processed or committed; None: the first
        record's). With them a replay after a partial write is applied only where it is missing,
        up to the first gap (module docstring).
        """
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

        offset = -1
        for index, value in enumerate(records):
            if offsets is not None:
                offset = offsets[index]
                if expected is None or offset == expected:
                    expected = offset + 1
                elif offset > expected:  # past a gap: the rest of this call the older way
                    offsets = None
            checked = check_event(value, lateness_s=self.lateness_s, max_future_s=self.max_future_s)
            if not isinstance(checked, Attempt):  # (reason, detail)
                result.dead.append(DeadLetter(index, *checked))
                continue
            a = checked
            ckey, card = state(_CARD_MERCHANT, f"{a.fingerprint}|{a.merchant}")
            if offsets is None:
                applied = _apply_unordered(a, ckey, card, state, dirty)
            else:
                applied = _apply_at(offset, a, ckey, card, state, dirty)
            if applied:
                result.applied.append(a)
            else:
                result.duplicates += 1

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
            else:
                result.cards[key] = st
            if write is not None:
                write(tkey, raw)
