"""The server's view of rolling features: a FeatureStore read on the hot path, never the network.

The streams replica (streams.replica, the authopt.features.v1 consumer) fills an
InMemoryFeatureStore; tests fill one directly. A missing entity is normal (a new card, a new
issuer): the contract defaults apply. What makes a decision fall back is missing or stale *route*
features, the signal the model depends on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from authopt.v1 import attempt_pb2
from model.layout import AttemptContext, Rows
from streams.contract import Entity
from streams.online import CardRows
from streams.store import FeatureRow, FeatureStore, InMemoryFeatureStore

__all__ = [
    "FeatureLookup",
    "FeatureRow",
    "FeatureStore",
    "InMemoryFeatureStore",
    "attempt_context",
    "card_key",
    "lookup_features",
]


@dataclass(frozen=True, slots=True)
class FeatureLookup:
    """The rows one decision reads, and what they say about freshness."""

    attempt_rows: Rows
    route_rows: list[Rows]
    oldest_as_of: float | None  # None: no row at all
    routes_known: int  # candidates with route-level features
    routes_as_of: float | None = None  # newest route-level row (None: none): how fresh the feed is
    card_state_known: bool = True  # False: the online store did not answer for the card

    def age_ms(self, now: float) -> int:
        """Age of the oldest row used, in milliseconds; -1 when none was found."""
        return -1 if self.oldest_as_of is None else max(0, int((now - self.oldest_as_of) * 1000))

    def route_age_ms(self, now: float) -> int:
        """Age of the newest route-level row, in milliseconds (the feed's lag); -1 when none."""
        return -1 if self.routes_as_of is None else max(0, int((now - self.routes_as_of) * 1000))


def card_key(attempt: attempt_pb2.Attempt) -> str:
    """The attempt's card x merchant key (as `streams.entity_key` builds it)."""
    return f"{attempt.card.fingerprint}|{attempt.merchant.id}"


def lookup_features(
    store: FeatureStore,
    attempt: attempt_pb2.Attempt,
    route_ids: Sequence[str],
    card_rows: tuple[bool, CardRows | None] | None = None,
) -> FeatureLookup:
    """Read every entity row a decision over `route_ids` needs (keys as `streams.entity_key` builds).

    `card_rows`: the card x merchant rows read from the online store beforehand, as (known, rows);
    None reads them from `store` like the others.
    """
    card, merchant = attempt.card, attempt.merchant
    fp_merchant = f"{card.fingerprint}|{merchant.id}"
    bin_ = card.bin
    bin6, country = bin_[:6], card.issuer_country
    issuer = f"{country}|{bin6}"
    get: Callable[[Entity, str], FeatureRow | None] = store.get
    oldest: float | None = None
    attempt_rows: dict[Entity, Mapping[str, float] | None] = {}
    amount = f"{attempt.amount_minor}{attempt.currency}"
    if card_rows is not None:  # the card's rows from the online store, the rest from `store`
        rows = card_rows[1]
        online = {
            Entity.CARD_MERCHANT: None if rows is None else rows.card,
            Entity.CARD_MERCHANT_AMOUNT: None if rows is None else rows.amount_row(amount),
        }
        store_get = store.get

        def get(entity: Entity, key: str) -> FeatureRow | None:
            return online[entity] if entity in online else store_get(entity, key)

    for entity, key in (
        (Entity.ISSUER, issuer),
        (Entity.MERCHANT, merchant.id),
        (Entity.CARD_MERCHANT, fp_merchant),
        (Entity.CARD_MERCHANT_AMOUNT, f"{fp_merchant}|{amount}"),
    ):
        row = get(entity, key)
        if row is None:
            attempt_rows[entity] = None
        else:
            attempt_rows[entity] = row.values
            if oldest is None or row.as_of < oldest:
                oldest = row.as_of
    route_rows: list[Rows] = []
    known = 0
    newest: float | None = None
    bin8 = bin_[:8]
    for rid in route_ids:
        route = get(Entity.ROUTE, rid)
        by_issuer = get(Entity.ROUTE_ISSUER, f"{rid}|{issuer}")
        by_bin = get(Entity.ROUTE_BIN, f"{rid}|{bin8}")
        if route is not None:
            known += 1
            if newest is None or route.as_of > newest:
                newest = route.as_of
        for row in (route, by_issuer, by_bin):
            if row is not None and (oldest is None or row.as_of < oldest):
                oldest = row.as_of
        route_rows.append(
            {
                Entity.ROUTE: None if route is None else route.values,
                Entity.ROUTE_ISSUER: None if by_issuer is None else by_issuer.values,
                Entity.ROUTE_BIN: None if by_bin is None else by_bin.values,
            }
        )
    return FeatureLookup(attempt_rows, route_rows, oldest, known, newest, card_rows is None or card_rows[0])


def attempt_context(
    attempt: attempt_pb2.Attempt, prior: Sequence[attempt_pb2.PriorAttempt], at: float | None = None
) -> AttemptContext:
    """The request-level model inputs of an attempt and its payment's prior attempts at time `at`."""
    last = prior[-1] if prior else None
    return AttemptContext(
        amount_minor=attempt.amount_minor,
        network=attempt.card.network,
        funding=attempt.card.funding,
        channel=attempt.channel,
        initiator=attempt.initiator,
        recurring=attempt.recurring,
        network_token=attempt.card.network_token,
        cross_border=attempt.card.issuer_country != attempt.merchant.country,
        attempt_number=attempt.attempt_number or len(prior) + 1,
        prior_declines=len(prior),
        last_decline_code=last.response_code if last else "",
        last_route_id=last.route_id if last else "",
        at=time.time() if at is None else at,
    )
