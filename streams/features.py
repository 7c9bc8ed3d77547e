"""Feature arithmetic: plain code over explicit event times, no Faust, no Kafka.

Every entity's state is a set of sufficient statistics:

* decayed sums (`EntityState.sums`), all as of `EntityState.as_of`, each halving every half-life
  of its accumulator. Adding an event at time t multiplies by 2^-((as_of - t) / h) when t is older
  than as_of (an out-of-order event), or decays the sums forward when it is newer. The result does
  not depend on the order events arrive in, and two states merge by decaying both to the newer
  as_of and adding. That is what lets workers split the attempts topic by partition and the
  replicas (and the offline replay) agree on the values.
* for card x merchant, the recent attempts themselves (`EntityState.recent`), from which the exact
  sliding-window counts of the network retry rules are computed, and by whose event ids a replayed
  event is recognised.

`evaluate` turns a state into the contract's feature values (streams.contract) as of its as_of.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf import timestamp_pb2

from authopt.v1 import attempt_pb2, events_pb2
from streams.contract import (
    CONTRACT_HASH,
    DECLINE_CLASSES,
    DEFAULT_APPROVAL_RATE,
    FEATURES,
    HARD_CODES,
    RATE_HALF_LIVES,
    Entity,
    decline_class,
)

__all__ = [
    "ACCUMULATORS",
    "LATENCY_EDGES_MS",
    "MAX_RECENT",
    "RECENT_WINDOW_S",
    "Attempt",
    "EntityState",
    "Recent",
    "aggregate_updates",
    "amount_key",
    "card_amount_rows",
    "epoch_s",
    "evaluate",
    "from_snapshot",
    "merge",
    "recent_entry",
    "to_snapshot",
]

_MIN, _HOUR, _DAY = 60, 3600, 86400
RECENT_WINDOW_S = 30 * _DAY
REATTEMPT_AFTER_DECLINE_S = 30 * _DAY  # an attempt counts as a reattempt within 30 d of a decline
MAX_RECENT = 64  # per card x merchant; the strictest network limit counts 15 reattempts in 30 d

# Upper edges (ms) of the route latency histogram buckets; the last bucket is open-ended.
LATENCY_EDGES_MS: tuple[float, ...] = (
    25,
    50,
    75,
    100,
    150,
    200,
    300,
    400,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    10000,
)
_LATENCY_NAMES = (*(f"latency_le_{int(e)}" for e in LATENCY_EDGES_MS), "latency_inf")

_ISSUER_SHARES = {
    "51": "declined_51_1h",
    "05": "declined_05_1h",
    "91": "declined_91_96_1h",
    "96": "declined_91_96_1h",
}


def _rate_accumulators(*tags: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for tag in tags:
        out[f"attempts_{tag}"] = RATE_HALF_LIVES[tag]
        out[f"approved_{tag}"] = RATE_HALF_LIVES[tag]
    return out


# Accumulator name -> half-life (s), per aggregate entity.
ACCUMULATORS: dict[Entity, dict[str, float]] = {
    Entity.ROUTE: {
        **_rate_accumulators("1m", "5m", "1h", "24h"),
        "errors_5m": 5 * _MIN,
        **dict.fromkeys(_LATENCY_NAMES, 5 * _MIN),
    },
    Entity.ROUTE_ISSUER: _rate_accumulators("1h", "24h"),
    Entity.ROUTE_BIN: _rate_accumulators("1h", "24h"),
    Entity.ISSUER: {
        "declined_1h": _HOUR,
        "declined_51_1h": _HOUR,
        "declined_05_1h": _HOUR,
        "declined_91_96_1h": _HOUR,
        "declined_hard_1h": _HOUR,
    },
    Entity.MERCHANT: _rate_accumulators("24h"),
    Entity.CARD_MERCHANT: {},
}


class Attempt(NamedTuple):
    """The fields of one AttemptEvent the features read, with its time in epoch seconds.

    NamedTuples here and in `Recent`: one of each is built per event, and a frozen dataclass costs
    ~3x more to build (and compares in Python, where a tuple compares in C).
    """

    event_id: str
    at: float
    route: str
    bin: str
    issuer_country: str
    merchant: str
    fingerprint: str
    amount_minor: int
    currency: str
    status: int
    response_code: str
    latency_ms: int

    @classmethod
    def from_event(cls, event: events_pb2.AttemptEvent) -> Attempt:
        o = event.outcome
        a = o.attempt
        card = a.card
        return cls(
            o.event_id,
            epoch_s(o.attempted_at),
            o.route_id,
            card.bin,
            card.issuer_country,
            a.merchant.id,
            card.fingerprint,
            a.amount_minor,
            a.currency,
            o.status,
            o.response_code,
            o.latency_ms,
        )

    @property
    def approved(self) -> bool:
        return self.status == attempt_pb2.OUTCOME_STATUS_APPROVED

    @property
    def declined(self) -> bool:
        return self.status == attempt_pb2.OUTCOME_STATUS_DECLINED

    @property
    def errored(self) -> bool:
        return self.status == attempt_pb2.OUTCOME_STATUS_ERROR


def epoch_s(ts: timestamp_pb2.Timestamp) -> float:
    """A Timestamp as epoch seconds at microsecond precision (so it round-trips through snapshots)."""
    return (ts.seconds * 1_000_000 + ts.nanos // 1000) / 1e6


def amount_key(amount_minor: int, currency: str) -> str:
    """The amount part of a card x merchant x amount key (as streams.contract.entity_key builds it)."""
    return f"{amount_minor}{currency}"


class Recent(NamedTuple):
    """One recent card x merchant attempt (ordered by time, then event id)."""

    at: float
    event_id: str
    amount_minor: int = 0
    currency: str = ""
    response_code: str = ""
    declined: bool = False
    offset: int = -1  # of the record in its source partition that carried it; -1 where unknown


# Every accumulator name means the same thing (and decays alike) in every entity that has it.
HALF_LIFE: dict[str, float] = {name: h for acc in ACCUMULATORS.values() for name, h in acc.items()}

# Sums are kept scaled to a reference time (below) so that adding an event costs one power per
# half-life, not a decay of every sum. The reference moves forward when the scale factor for the
# shortest half-life would pass 2^512 (float64 holds up to 2^1023).
_REBASE_AFTER_S = 512 * min(HALF_LIFE.values())


@dataclass(slots=True)
class EntityState:
    """Sufficient statistics of one entity (from the events of one source partition, or merged).

    `scaled[name]` is the decayed sum as of `ref`, i.e. sum of w * 2^((t_event - ref) / h); the sum
    as of `as_of` (what snapshots carry and `sums` returns) is scaled * 2^(-(as_of - ref) / h).
    """

    as_of: float = 0.0
    scaled: dict[str, float] = field(default_factory=dict)
    recent: list[Recent] = field(default_factory=list)
    events: int = 0
    ref: float = 0.0
    next_offset: int = 0  # source offset after the last record applied; 0 where unknown

    @classmethod
    def at(
        cls,
        as_of: float,
        sums: Mapping[str, float],
        recent: list[Recent],
        events: int,
        next_offset: int = 0,
    ) -> EntityState:
        """A state whose decayed sums are `sums` as of `as_of`."""
        return cls(as_of, dict(sums), recent, events, as_of, next_offset)

    @property
    def sums(self) -> dict[str, float]:
        """The decayed sums as of `as_of`."""
        dt = self.as_of - self.ref
        if not dt:
            return dict(self.scaled)
        factors: dict[float, float] = {}
        out = {}
        for name, value in self.scaled.items():
            h = HALF_LIFE[name]
            f = factors.get(h)
            if f is None:
                f = factors[h] = 2.0 ** (-dt / h)
            out[name] = value * f
        return out

    def add(self, at: float, increments: Mapping[str, float]) -> None:
        """Add one event's increments at event time `at` (any order: the result is the same)."""
        if self.events == 0:
            self.as_of = self.ref = at
        elif at > self.as_of:
            self.as_of = at
        x = at - self.ref
        if x > _REBASE_AFTER_S:
            self.scaled, self.ref, x = self.sums if self.as_of == at else self._rebased(at), at, 0.0
        scaled = self.scaled
        groups = increments.groups if isinstance(increments, Increments) else _groups(increments)
        get = scaled.get
        for h, items in groups:
            g = 2.0 ** (x / h) if x else 1.0
            for name, inc in items:
                scaled[name] = get(name, 0.0) + inc * g
        self.events += 1

    def _rebased(self, ref: float) -> dict[str, float]:
        dt = ref - self.ref
        return {name: v * 2.0 ** (-dt / HALF_LIFE[name]) for name, v in self.scaled.items()}

    def has_event(self, event_id: str) -> bool:
        return any(r.event_id == event_id for r in self.recent)

    def event_offset(self, event_id: str) -> int | None:
        """The source offset that brought `event_id` into `recent` (-1 unknown); None if absent."""
        for r in self.recent:
            if r.event_id == event_id:
                return r.offset
        return None

    def add_recent(self, entry: Recent) -> None:
        """Keep `entry` among the attempts of the last RECENT_WINDOW_S (at most MAX_RECENT, newest kept)."""
        bisect.insort(self.recent, entry)
        if entry.at > self.as_of or self.events == 0:
            self.as_of = entry.at
        horizon = self.as_of - RECENT_WINDOW_S
        recent = self.recent
        drop = 0
        while drop < len(recent) and recent[drop].at < horizon:
            drop += 1
        drop = max(drop, len(recent) - MAX_RECENT)
        if drop:
            del recent[:drop]
        self.events += 1


def _groups(increments: Mapping[str, float]) -> tuple[tuple[float, tuple[tuple[str, float], ...]], ...]:
    """`increments` grouped by half-life: one power per group when an event is added."""
    by_h: dict[float, list[tuple[str, float]]] = {}
    for name, inc in increments.items():
        by_h.setdefault(HALF_LIFE[name], []).append((name, inc))
    return tuple((h, tuple(items)) for h, items in by_h.items())


class Increments(dict[str, float]):
    """One event's increments (a plain mapping of accumulator name to amount) that also carries
    their grouping by half-life, computed once: every event adds one of a few fixed sets."""

    __slots__ = ("groups",)

    def __init__(self, values: Mapping[str, float]) -> None:
        super().__init__(values)
        self.groups = _groups(values)


_ROUTE, _ROUTE_ISSUER, _ROUTE_BIN = Entity.ROUTE, Entity.ROUTE_ISSUER, Entity.ROUTE_BIN
_MERCHANT, _ISSUER = Entity.MERCHANT, Entity.ISSUER
_ROUTE_ATTEMPT = {f"attempts_{tag}": 1.0 for tag in RATE_HALF_LIVES}
_ROUTE_APPROVED = {**_ROUTE_ATTEMPT, **{f"approved_{tag}": 1.0 for tag in RATE_HALF_LIVES}}
_PAIR_ATTEMPT = Increments({"attempts_1h": 1.0, "attempts_24h": 1.0})
_PAIR_APPROVED = Increments({**_PAIR_ATTEMPT, "approved_1h": 1.0, "approved_24h": 1.0})
_MERCHANT_ATTEMPT = Increments({"attempts_24h": 1.0})
_MERCHANT_APPROVED = Increments({**_MERCHANT_ATTEMPT, "approved_24h": 1.0})
# The route's increments by (approved, "errors_5m" or the latency bucket), and the issuer's by
# (decline-share name, hard code), built once.
_ROUTE_INCREMENTS = {
    (approved, extra): Increments({**(_ROUTE_APPROVED if approved else _ROUTE_ATTEMPT), extra: 1.0})
    for approved in (True, False)
    for extra in ("errors_5m", *_LATENCY_NAMES)
}
_ISSUER_INCREMENTS = {
    (share, hard): Increments(
        {"declined_1h": 1.0, **({share: 1.0} if share else {}), **({"declined_hard_1h": 1.0} if hard else {})}
    )
    for share in (None, *set(_ISSUER_SHARES.values()))
    for hard in (False, True)
}


def aggregate_updates(a: Attempt) -> list[tuple[Entity, str, Increments]]:
    """(entity, key, increments) of every decayed-sum entity one attempt updates."""
    # Zero increments are left out: a missing name adds nothing.
    approved = a.approved
    pair, merchant = (_PAIR_APPROVED, _MERCHANT_APPROVED) if approved else (_PAIR_ATTEMPT, _MERCHANT_ATTEMPT)
    if a.errored:
        route = _ROUTE_INCREMENTS[(approved, "errors_5m")]
    else:
        route = _ROUTE_INCREMENTS[
            (approved, _LATENCY_NAMES[bisect.bisect_left(LATENCY_EDGES_MS, a.latency_ms)])
        ]
    bin6, bin8 = a.bin[:6], a.bin[:8]
    updates = [
        (_ROUTE, a.route, route),
        (_ROUTE_ISSUER, f"{a.route}|{a.issuer_country}|{bin6}", pair),
        (_ROUTE_BIN, f"{a.route}|{bin8}", pair),
        (_MERCHANT, a.merchant, merchant),
    ]
    if a.declined:
        code = a.response_code
        issuer = _ISSUER_INCREMENTS[(_ISSUER_SHARES.get(code) or None, code in HARD_CODES)]
        updates.append((_ISSUER, f"{a.issuer_country}|{bin6}", issuer))
    return updates


def recent_entry(a: Attempt, offset: int = -1) -> Recent:
    return Recent(a.at, a.event_id, a.amount_minor, a.currency, a.response_code, a.declined, offset)


def merge(entity: Entity, states: Iterable[EntityState]) -> EntityState:
    """One state equal to the states of disjoint event sets combined."""
    parts = [s for s in states if s.events]
    if len(parts) == 1:
        return parts[0]
    out = EntityState()
    if not parts:
        return out
    as_of = max(s.as_of for s in parts)
    sums: dict[str, float] = {}
    for s in parts:
        dt = as_of - s.as_of
        for name, value in s.sums.items():
            sums[name] = sums.get(name, 0.0) + (value * 2.0 ** (-dt / HALF_LIFE[name]) if dt else value)
    recent = sorted(r for s in parts for r in s.recent)
    return EntityState.at(as_of, sums, recent[-MAX_RECENT:], sum(s.events for s in parts))


def _ratio(num: float, den: float, default: float) -> float:
    return num / den if den > 1e-12 else default


def _latency_p95(sums: Mapping[str, float]) -> float:
    counts = [sums.get(n, 0.0) for n in _LATENCY_NAMES]
    total = sum(counts)
    if total <= 1e-12:
        return 0.0
    target, seen, lower = 0.95 * total, 0.0, 0.0
    for i, c in enumerate(counts):
        if i == len(LATENCY_EDGES_MS):
            return lower  # the open-ended bucket: report its lower edge
        upper = LATENCY_EDGES_MS[i]
        if c > 0 and seen + c >= target:
            return lower + (upper - lower) * (target - seen) / c
        seen += c
        lower = upper
    return lower


def _reattempts(recent: list[Recent], since: float) -> int:
    count, last_decline = 0, None
    for r in recent:  # oldest first
        if r.at > since and last_decline is not None and r.at - last_decline <= REATTEMPT_AFTER_DECLINE_S:
            count += 1
        if r.declined:
            last_decline = r.at
    return count


def evaluate(entity: Entity, state: EntityState) -> dict[str, float]:
    """The contract's feature values of `entity` from its (merged) state, as of state.as_of."""
    s = state.sums
    match entity:
        case Entity.ROUTE | Entity.ROUTE_ISSUER | Entity.ROUTE_BIN | Entity.MERCHANT:
            out: dict[str, float] = {}
            for name in ACCUMULATORS[entity]:
                if name.startswith("attempts_"):
                    tag = name.removeprefix("attempts_")
                    n = s.get(name, 0.0)
                    out[name] = n
                    out[f"approval_rate_{tag}"] = _ratio(
                        s.get(f"approved_{tag}", 0.0), n, DEFAULT_APPROVAL_RATE
                    )
            if entity is Entity.ROUTE:
                out["error_rate_5m"] = _ratio(s.get("errors_5m", 0.0), s.get("attempts_5m", 0.0), 0.0)
                out["latency_p95_ms_5m"] = _latency_p95(s)
            return out
        case Entity.ISSUER:
            d = s.get("declined_1h", 0.0)
            return {
                "share_51_1h": _ratio(s.get("declined_51_1h", 0.0), d, 0.0),
                "share_05_1h": _ratio(s.get("declined_05_1h", 0.0), d, 0.0),
                "share_91_96_1h": _ratio(s.get("declined_91_96_1h", 0.0), d, 0.0),
                "share_hard_1h": _ratio(s.get("declined_hard_1h", 0.0), d, 0.0),
                "declines_1h": d,
            }
        case Entity.CARD_MERCHANT:
            recent, now = state.recent, state.as_of
            declines = [r for r in recent if r.declined]
            last = declines[-1] if declines else None
            return {
                "reattempts_24h": float(_reattempts(recent, now - _DAY)),
                "reattempts_30d": float(_reattempts(recent, now - 30 * _DAY)),
                "last_decline_at": last.at if last else -1.0,
                "last_decline_class": (
                    float(DECLINE_CLASSES.index(decline_class(last.response_code) or "other"))
                    if last
                    else -1.0
                ),
            }
        case Entity.CARD_MERCHANT_AMOUNT:
            raise ValueError("card_merchant_amount rows come from card_amount_rows(card_merchant state)")


def card_amount_rows(state: EntityState) -> dict[str, dict[str, float]]:
    """card x merchant x amount rows derived from a card x merchant state, by amount key."""
    horizon = state.as_of - 30 * _DAY
    counts: dict[str, float] = {}
    for r in state.recent:
        if r.at > horizon:
            key = amount_key(r.amount_minor, r.currency)
            counts[key] = counts.get(key, 0.0) + 1.0
    return {k: {"attempts_30d": v} for k, v in counts.items()}


def to_snapshot(entity: Entity, key: str, partition: int, state: EntityState) -> events_pb2.FeatureSnapshot:
    us = round(state.as_of * 1e6)
    snap = events_pb2.FeatureSnapshot(
        entity=entity.value,
        key=key,
        contract_hash=CONTRACT_HASH,
        source_partition=partition,
        sums=state.sums,
        events=state.events,
        next_offset=state.next_offset,
    )
    as_of = snap.as_of
    as_of.seconds, as_of.nanos = us // 1_000_000, (us % 1_000_000) * 1000
    if state.recent:
        add = snap.recent.add
        for r in state.recent:
            add(
                event_id=r.event_id,
                attempted_at_us=round(r.at * 1e6),
                amount_minor=r.amount_minor,
                currency=r.currency,
                response_code=r.response_code,
                declined=r.declined,
                source_offset=r.offset if r.offset >= 0 else None,
            )
    return snap


def from_snapshot(snap: events_pb2.FeatureSnapshot) -> EntityState:
    return EntityState.at(
        epoch_s(snap.as_of),
        snap.sums,
        [
            Recent(
                r.attempted_at_us / 1e6,
                r.event_id,
                r.amount_minor,
                r.currency,
                r.response_code,
                r.declined,
                r.source_offset if r.HasField("source_offset") else -1,
            )
            for r in snap.recent
        ],
        snap.events,
        snap.next_offset,
    )


# Every contract feature is produced by evaluate()/card_amount_rows(): checked at import so the
# contract and the arithmetic cannot drift apart silently.
def _produced() -> set[str]:
    names: set[str] = set()
    for entity in ACCUMULATORS:
        names |= {f"{entity.value}.{n}" for n in evaluate(entity, EntityState())}
    names |= {f"card_merchant_amount.{n}" for n in ("attempts_30d",)}
    return names


assert _produced() == {f.qualified for f in FEATURES}, sorted(_produced() ^ {f.qualified for f in FEATURES})
