"""The generated per-entity encoders against the definition they compile: a plain loop over the contract."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from model.layout import ATTEMPT_FEATURES, ROUTE_FEATURES, entity_values
from streams.contract import FEATURES, SMOOTHING_PSEUDO_ATTEMPTS, Entity


def _reference(
    entity: Entity, row: Mapping[str, float] | None, at: float, route: Mapping[str, float] | None
) -> list[float]:
    out: list[float] = []
    get = (row or {}).get
    for f in (f for f in FEATURES if f.entity is entity):
        value = float(get(f.name, f.default))
        if f.dtype == "category":
            out += [1.0 if value == i else 0.0 for i in range(len(f.categories))]
        elif f.dtype == "epoch_s":
            out.append(-1.0 if value < 0 else max(at - value, 0.0))
        elif f.smoothed_toward:
            prior = float((route or {}).get(f.smoothed_toward.split(".", 1)[1], f.default))
            n = float(get("attempts_" + f.name.rsplit("_", 1)[1], 0.0))
            approved = value * n if row is not None else 0.0
            out.append((approved + SMOOTHING_PSEUDO_ATTEMPTS * prior) / (n + SMOOTHING_PSEUDO_ATTEMPTS))
        else:
            out.append(value)
    return out


def _random_row(rng: random.Random, entity: Entity) -> dict[str, float]:
    row: dict[str, float] = {}
    for f in FEATURES:
        if f.entity is not entity or rng.random() < 0.2:  # some values missing
            continue
        if f.dtype == "category":
            row[f.name] = rng.choice([*map(float, range(-1, len(f.categories) + 1)), 2.5])  # and out of range
        elif f.dtype == "epoch_s":
            row[f.name] = rng.choice([-1.0, 1_700_000_000.0 + rng.uniform(-1e5, 1e5)])
        elif f.name.startswith("attempts_"):
            row[f.name] = float(rng.randrange(0, 500))
        else:
            row[f.name] = rng.random()
    return row


@pytest.mark.parametrize("entity", list(Entity))
def test_generated_encoder_matches_the_contract_loop(entity: Entity) -> None:
    rng = random.Random(7)
    at = 1_700_000_000.0
    for _ in range(300):
        row = _random_row(rng, entity) if rng.random() < 0.8 else None
        route = _random_row(rng, Entity.ROUTE) if rng.random() < 0.8 else None
        assert entity_values(entity, row, at, route) == _reference(entity, row, at, route)


def test_encoder_widths_add_up_to_the_layout() -> None:
    at = 1_700_000_000.0
    route_width = sum(
        len(entity_values(e, None, at)) for e in (Entity.ROUTE, Entity.ROUTE_ISSUER, Entity.ROUTE_BIN)
    )
    assert route_width + 2 == len(ROUTE_FEATURES)  # + cost and is-last-declined-route
    attempt_width = sum(
        len(entity_values(e, None, at))
        for e in (Entity.ISSUER, Entity.MERCHANT, Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT)
    )
    assert attempt_width == sum(1 for n in ATTEMPT_FEATURES if not n.startswith("attempt."))


def test_encode_flat_equals_encode_rows_with_rows_reused_and_replaced() -> None:
    """The flat encoder keeps each route-level row triple's encoding: a reused row must give the
    same values, a replacing row (the feed's update) its own."""
    import array

    from model.layout import AttemptContext, encode_flat, encode_rows

    rng = random.Random(11)
    at = 1_700_000_000.0
    routes = {r: _random_row(rng, Entity.ROUTE) for r in ("a", "b", "c")}
    by_issuer = {r: _random_row(rng, Entity.ROUTE_ISSUER) for r in ("a", "b")}
    for step in range(200):
        if step % 7 == 0:  # the feed replaces a row: a new object with other values
            r = rng.choice(list(routes))
            routes[r] = _random_row(rng, Entity.ROUTE)
        ctx = AttemptContext(1000 + step, 1, 2, 1, 1, False, True, step % 2 == 0, 2, 1, "51", "b", at=at)
        cands = [
            (
                r,
                100 + i,
                {Entity.ROUTE: routes[r], Entity.ROUTE_ISSUER: by_issuer.get(r), Entity.ROUTE_BIN: None},
            )
            for i, r in enumerate(routes)
        ]
        attempt_rows = {Entity.CARD_MERCHANT: _random_row(rng, Entity.CARD_MERCHANT)}
        flat = encode_flat(ctx, cands, attempt_rows)
        want = array.array("f", [v for row in encode_rows(ctx, cands, attempt_rows) for v in row])
        assert flat == want
