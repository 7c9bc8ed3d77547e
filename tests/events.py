"""Builders of AttemptEvent records for the streams tests (real protobuf, real bytes)."""

from __future__ import annotations

import random

from authopt.v1 import attempt_pb2, events_pb2
from streams.features import EntityState

T0 = 1_790_000_000.0  # a fixed event time (2026-09-21) so tests never depend on the clock

_STATUS = {
    "approved": attempt_pb2.OUTCOME_STATUS_APPROVED,
    "declined": attempt_pb2.OUTCOME_STATUS_DECLINED,
    "error": attempt_pb2.OUTCOME_STATUS_ERROR,
}


def event(
    event_id: str,
    at: float = T0,
    *,
    status: str = "approved",
    code: str = "",
    route: str = "acq-a",
    fingerprint: str = "fp-1",
    merchant: str = "m-1",
    amount_minor: int = 1000,
    currency: str = "EUR",
    bin_: str = "41111111",
    country: str = "DE",
    latency_ms: int = 120,
    received_at: float | None = None,
) -> events_pb2.AttemptEvent:
    ev = events_pb2.AttemptEvent(producer="test")
    o = ev.outcome
    o.event_id = event_id
    o.route_id = route
    o.status = _STATUS[status]
    o.response_code = code
    o.latency_ms = latency_ms
    o.attempted_at.FromMicroseconds(round(at * 1e6))
    a = o.attempt
    a.merchant.id = merchant
    a.merchant.country = "DE"
    a.amount_minor = amount_minor
    a.currency = currency
    a.card.bin = bin_
    a.card.issuer_country = country
    a.card.fingerprint = fingerprint
    ev.received_at.FromMicroseconds(round((at if received_at is None else received_at) * 1e6))
    return ev


def random_events(
    n: int, seed: int = 7, start: float = T0, span_s: float = 7200.0
) -> list[events_pb2.AttemptEvent]:
    """`n` varied events over `span_s` seconds, a little out of order, some repeated cards."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = start + span_s * i / n + rng.uniform(-30, 30)
        r = rng.random()
        status = "approved" if r < 0.7 else ("declined" if r < 0.95 else "error")
        out.append(
            event(
                f"ev-{seed}-{i}",
                at,
                status=status,
                code=rng.choice(["51", "05", "91", "96", "14", "57"]) if status == "declined" else "",
                route=rng.choice(["acq-a", "acq-b", "acq-c"]),
                fingerprint=f"fp-{rng.randrange(40)}",
                merchant=f"m-{rng.randrange(5)}",
                amount_minor=rng.choice([500, 1000, 2500]),
                bin_=rng.choice(["41111111", "52000000", "37828224"]),
                country=rng.choice(["DE", "FR"]),
                latency_ms=rng.randrange(20, 2500),
                received_at=at + rng.uniform(0, 5),
            )
        )
    return out


def card_state(fingerprint: str, merchant: str, now: float, n: int = 8) -> EntityState:
    """A card x merchant state folded from `n` attempts at 3 amounts (declines among them), the last
    a minute before `now`, as the worker folds them (offsets 0..n-1)."""
    from streams.processor import FeatureProcessor

    records = [
        event(
            f"{fingerprint}-{merchant}-{i}",
            now - 60 * (n - i),
            fingerprint=fingerprint,
            merchant=merchant,
            amount_minor=(12500, 999, 4200)[i % 3],
            status="declined" if i % 3 == 0 else "approved",
            code="51" if i % 3 == 0 else "",
            received_at=now,
        ).SerializeToString()
        for i in range(n)
    ]
    states: dict[bytes, bytes | None] = {}
    result = FeatureProcessor(states).process(0, records, None, list(range(n)), 0)
    assert len(result.applied) == n
    return next(iter(result.cards.values()))
