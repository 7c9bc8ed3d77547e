"""A valid sample `RecommendRequest`: one builder for the tests, the benchmarks and examples.

The values are a typical e-commerce payment (a German merchant, a Visa credit card, EUR) that every
validation check accepts; callers override what their case is about.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from authopt.v1 import attempt_pb2, optimizer_pb2

__all__ = ["sample_attempt", "sample_request"]


def sample_attempt(**overrides: Any) -> attempt_pb2.Attempt:
    """A valid first attempt; `overrides` replace top-level fields (e.g. ``amount_minor=500``)."""
    attempt = attempt_pb2.Attempt(
        merchant=attempt_pb2.Merchant(id="m-1", mcc="5411", country="DE"),
        amount_minor=12_500,
        currency="EUR",
        card=attempt_pb2.Card(
            bin="41111111",
            last4="1111",
            network=attempt_pb2.CARD_NETWORK_VISA,
            funding=attempt_pb2.CARD_FUNDING_CREDIT,
            issuer_country="DE",
            fingerprint="fp-abc",
        ),
        channel=attempt_pb2.CHANNEL_ECOMMERCE,
        initiator=attempt_pb2.INITIATOR_CUSTOMER,
        attempt_number=1,
    )
    for key, value in overrides.items():
        if isinstance(value, attempt_pb2.Merchant | attempt_pb2.Card):
            getattr(attempt, key).CopyFrom(value)
        else:
            setattr(attempt, key, value)
    return attempt


def sample_request(
    request_id: str = "req-1",
    routes: Iterable[tuple[str, int, int]] = (("acq-a", 180, 10), ("acq-b", 150, 25), ("acq-c", 250, 0)),
    *,
    latency_budget_ms: int = 200,
    **attempt_overrides: Any,
) -> optimizer_pb2.RecommendRequest:
    """A valid request over `routes` (id, cost in basis points, fixed fee in minor units)."""
    return optimizer_pb2.RecommendRequest(
        request_id=request_id,
        attempt=sample_attempt(**attempt_overrides),
        candidates=[attempt_pb2.Route(id=r, cost_bps=b, fixed_fee_minor=f) for r, b, f in routes],
        latency_budget_ms=latency_budget_ms,
    )
