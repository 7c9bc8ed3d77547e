"""The model's input layout: how one (attempt, candidate route) pair becomes a row of floats.

Training (model/) and serving (server/) both encode through this module, so the two can never
disagree. A row is the route part (rolling features of the route and of the route x issuer/BIN
entities, plus the route's cost) followed by the attempt part (request fields, issuer, merchant and
per-card counters), which is shared by every candidate of one request. Rolling-feature values come
from the feature contract (streams.contract); a missing entity takes the contract's defaults.
The manifest of every exported model lists `INPUT_LAYOUT`; the server refuses a model whose layout
differs.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from streams.contract import (
    BY_QUALIFIED_NAME,
    DECLINE_CLASSES,
    FEATURES,
    SMOOTHING_PSEUDO_ATTEMPTS,
    Entity,
    Feature,
    decline_class,
)

__all__ = [
    "ATTEMPT_FEATURES",
    "DECLINE_CLASSES",
    "DELAY_BUCKETS_S",
    "INPUT_LAYOUT",
    "LAYOUT_VERSION",
    "ROUTE_FEATURES",
    "AttemptContext",
    "Rows",
    "attempt_vector",
    "decline_class",
    "encode_flat",
    "encode_rows",
    "entity_values",
    "layout_features",
    "route_vector",
]

LAYOUT_VERSION = "1"

# Retry delay buckets (seconds) of the model's retry head: output column 1 + b is P(approve) if the
# declined payment is retried on this route after DELAY_BUCKETS_S[b]. They line up with the
# Mastercard MAC 24-30 minimum waits so a rule-imposed wait always has a matching bucket.
DELAY_BUCKETS_S: tuple[int, ...] = (0, 3600, 86400, 2 * 86400, 4 * 86400, 6 * 86400, 8 * 86400, 10 * 86400)

Rows = Mapping[Entity, Mapping[str, float] | None]

_ROUTE_ENTITIES = (Entity.ROUTE, Entity.ROUTE_ISSUER, Entity.ROUTE_BIN)
_ATTEMPT_ENTITIES = (Entity.ISSUER, Entity.MERCHANT, Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT)


def _input_names(feature: Feature) -> tuple[str, ...]:
    """The layout inputs one contract feature becomes: categories one-hot, times as ages."""
    if feature.dtype == "category":
        return tuple(f"{feature.qualified}.{c}" for c in feature.categories)
    if feature.dtype == "epoch_s":
        return (f"{feature.qualified.removesuffix('_at')}_age_s",)
    return (feature.qualified,)


ROUTE_FEATURES: tuple[str, ...] = (
    *(n for f in FEATURES if f.entity in _ROUTE_ENTITIES for n in _input_names(f)),
    "route.cost_bps",
    "route.is_last_declined_route",
)

# Proto enum numbers (authopt.v1) one-hot encoded; index 0 (UNSPECIFIED) is the all-zero case.
_NETWORKS = ("visa", "mastercard", "amex", "discover", "jcb", "unionpay", "other")
_FUNDINGS = ("credit", "debit", "prepaid")
_CHANNELS = ("ecommerce", "recurring", "moto")
_INITIATORS = ("customer", "merchant")


ATTEMPT_FEATURES: tuple[str, ...] = (
    "attempt.log_amount",
    *(f"attempt.network.{n}" for n in _NETWORKS),
    *(f"attempt.funding.{n}" for n in _FUNDINGS),
    *(f"attempt.channel.{n}" for n in _CHANNELS),
    *(f"attempt.initiator.{n}" for n in _INITIATORS),
    "attempt.recurring",
    "attempt.network_token",
    "attempt.cross_border",
    "attempt.number",
    "attempt.prior_declines",
    *(f"attempt.last_decline.{c}" for c in DECLINE_CLASSES),
    *(n for f in FEATURES if f.entity in _ATTEMPT_ENTITIES for n in _input_names(f)),
)

INPUT_LAYOUT: tuple[str, ...] = ROUTE_FEATURES + ATTEMPT_FEATURES


class AttemptContext(NamedTuple):
    """The request-level inputs of one decision (proto enums as their numbers).

    A NamedTuple, like the policy's value types: built for every request, and a frozen dataclass
    costs ~3x more to construct.
    """

    amount_minor: int
    network: int
    funding: int
    channel: int
    initiator: int
    recurring: bool
    network_token: bool
    cross_border: bool
    attempt_number: int
    prior_declines: int
    last_decline_code: str = ""
    last_route_id: str = ""
    at: float = 0.0  # decision time, epoch seconds: turns feature times into ages


def _one_hot(value: int, size: int) -> list[float]:
    out = [0.0] * size
    if 1 <= value <= size:
        out[value - 1] = 1.0
    return out


# Per entity, how each of its features becomes inputs, computed once: encoding runs on every request.
_ENTITY_FEATURES: dict[Entity, tuple[Feature, ...]] = {
    e: tuple(f for f in FEATURES if f.entity is e) for e in Entity
}
_SMOOTHING: dict[tuple[Entity, str], tuple[str, str]] = {
    (f.entity, f.name): (f.smoothed_toward.split(".", 1)[1], "attempts_" + f.name.rsplit("_", 1)[1])
    for f in FEATURES
    if f.smoothed_toward
}


def _category(value: float, size: int) -> list[float]:
    return [1.0 if float(value) == i else 0.0 for i in range(size)]


def _age(at_s: float, now: float) -> float:
    t = float(at_s)
    return -1.0 if t < 0 else max(now - t, 0.0)


def _smoothed(present: bool, rate: float, count: float, prior: float) -> float:
    n = float(count)
    approved = float(rate) * n if present else 0.0
    return (approved + SMOOTHING_PSEUDO_ATTEMPTS * float(prior)) / (n + SMOOTHING_PSEUDO_ATTEMPTS)


EntityEncoder = Callable[[Mapping[str, float] | None, float, Mapping[str, float] | None], list[float]]


def _compile_entity(entity: Entity) -> EntityEncoder:
    """One entity's features as inputs: ``f(row, at, route_row) -> list[float]``.

    Each feature, in contract order: its value from `row` (the contract default when the row or the
    value is missing); a category one-hot over its categories; an epoch time as its age at `at`
    (-1 when none); a smoothed rate as ``(rate * n + SMOOTHING_PSEUDO_ATTEMPTS * prior) / (n +
    SMOOTHING_PSEUDO_ATTEMPTS)``, n its `attempts_*` count and the prior the route's rate of the
    same window from `route_row` (no row: the prior alone). Encoding runs for every candidate of
    every request, so the steps are generated once as one straight-line expression (~4x faster
    than looping over the features; tests/test_layout.py checks it against that loop).
    """
    parts: list[str] = []
    for f in _ENTITY_FEATURES[entity]:
        name, default = repr(f.name), repr(float(f.default))
        if f.dtype == "category":
            parts.append(f"*_category(g({name}, {default}), {len(f.categories)})")
        elif f.dtype == "epoch_s":
            parts.append(f"_age(g({name}, {default}), at)")
        elif f.smoothed_toward:
            prior, count = _SMOOTHING[(entity, f.name)]
            args = f"g({name}, {default}), g({count!r}, 0.0), rg({prior!r}, {default})"
            parts.append(f"_smoothed(row is not None, {args})")
        else:
            parts.append(f"float(g({name}, {default}))")
    source = (
        "def encode(row, at, route):\n"
        "    g = (row or _EMPTY).get\n"
        "    rg = (route or _EMPTY).get\n"
        f"    return [{', '.join(parts)}]\n"
    )
    namespace: dict[str, Any] = {"_EMPTY": {}, "_category": _category, "_age": _age, "_smoothed": _smoothed}
    exec(compile(source, f"<layout encoder {entity.value}>", "exec"), namespace)  # our own text
    encode: EntityEncoder = namespace["encode"]
    return encode


_ENCODERS: dict[Entity, EntityEncoder] = {e: _compile_entity(e) for e in Entity}


def entity_values(
    entity: Entity, row: Mapping[str, float] | None, at: float, route: Mapping[str, float] | None = None
) -> list[float]:
    """`entity`'s layout inputs from its feature row (None: unknown), at time `at` (epoch s);
    `route` is the route's own row, the prior of smoothed rates."""
    return _ENCODERS[entity](row, at, route)


_ATTEMPT_ENCODERS = tuple((e, _ENCODERS[e]) for e in _ATTEMPT_ENTITIES)
_encode_route, _encode_route_issuer, _encode_route_bin = (_ENCODERS[e] for e in _ROUTE_ENTITIES)


def attempt_vector(ctx: AttemptContext, rows: Rows) -> list[float]:
    """The attempt part of a row (shared by all candidates of one request)."""
    cls = decline_class(ctx.last_decline_code)
    out = [math.log1p(max(ctx.amount_minor, 0))]
    out += _one_hot(ctx.network, len(_NETWORKS))
    out += _one_hot(ctx.funding, len(_FUNDINGS))
    out += _one_hot(ctx.channel, len(_CHANNELS))
    out += _one_hot(ctx.initiator, len(_INITIATORS))
    out += [
        float(ctx.recurring),
        float(ctx.network_token),
        float(ctx.cross_border),
        float(ctx.attempt_number),
        float(ctx.prior_declines),
    ]
    out += [1.0 if cls == c else 0.0 for c in DECLINE_CLASSES]
    at = ctx.at
    for entity, encode in _ATTEMPT_ENCODERS:
        out += encode(rows.get(entity), at, None)
    return out


def route_vector(route_id: str, cost_bps: int, ctx: AttemptContext, rows: Rows) -> list[float]:
    """The route part of a row, from the route's rolling features (`rows`, keyed by entity)."""
    out = _route_values(rows.get(Entity.ROUTE), rows.get(Entity.ROUTE_ISSUER), rows.get(Entity.ROUTE_BIN))
    out += [float(cost_bps), 1.0 if ctx.last_route_id and route_id == ctx.last_route_id else 0.0]
    return out


# The route part's rolling features depend on the three route-level rows alone (no epoch-time
# feature, so not on the decision time), and one route row serves every request until the feed
# replaces it: their encoding is kept per (route, route x issuer, route x BIN) row triple, found by
# the rows' identities. Rows are never changed in place once stored (FeatureStore.put copies), and
# an entry keeps its rows alive, so an id can never point at another row while its entry lives.
assert not any(f.dtype == "epoch_s" for f in FEATURES if f.entity in _ROUTE_ENTITIES)
_ROUTE_MEMO_SIZE = 8192


def _route_values(
    route: Mapping[str, float] | None,
    by_issuer: Mapping[str, float] | None,
    by_bin: Mapping[str, float] | None,
) -> list[float]:
    """The route-level entities' inputs (the decision time does not enter: see the assert above)."""
    return (
        _encode_route(route, 0.0, route)
        + _encode_route_issuer(by_issuer, 0.0, route)
        + _encode_route_bin(by_bin, 0.0, route)
    )


_route_memo: dict[tuple[int, int, int], tuple[object, object, object, array.array[float]]] = {}


def _route_entities(
    route: Mapping[str, float] | None,
    by_issuer: Mapping[str, float] | None,
    by_bin: Mapping[str, float] | None,
) -> array.array[float]:
    key = (id(route), id(by_issuer), id(by_bin))
    hit = _route_memo.get(key)
    if hit is not None and hit[0] is route and hit[1] is by_issuer and hit[2] is by_bin:
        return hit[3]
    values = array.array("f", _route_values(route, by_issuer, by_bin))
    if len(_route_memo) >= _ROUTE_MEMO_SIZE:
        _route_memo.clear()
    _route_memo[key] = (route, by_issuer, by_bin, values)
    return values


def encode_rows(
    ctx: AttemptContext, routes: Sequence[tuple[str, int, Rows]], attempt_rows: Rows
) -> list[list[float]]:
    """One input row per candidate route: `routes` holds (route_id, cost_bps, route entity rows)."""
    shared = attempt_vector(ctx, attempt_rows)
    return [route_vector(rid, bps, ctx, rows) + shared for rid, bps, rows in routes]


def encode_flat(
    ctx: AttemptContext, routes: Sequence[tuple[str, int, Rows]], attempt_rows: Rows
) -> array.array[float]:
    """`encode_rows` as one row-major float32 buffer (``len(routes) x len(INPUT_LAYOUT)``).

    The server batches these buffers and wraps them with ``torch.frombuffer`` without a copy:
    building a tensor from nested lists costs ~3x more per request.
    """
    # float32 buffers extend each other by a copy; from a list, value by value (~8x slower).
    shared = array.array("f", attempt_vector(ctx, attempt_rows))
    last = ctx.last_route_id
    out = array.array("f")
    for rid, bps, rows in routes:
        out.extend(
            _route_entities(rows.get(Entity.ROUTE), rows.get(Entity.ROUTE_ISSUER), rows.get(Entity.ROUTE_BIN))
        )
        out.append(float(bps))
        out.append(1.0 if last and rid == last else 0.0)
        out.extend(shared)
    return out


def layout_features(name: str) -> bool:
    """True when `name` is a layout input backed by the feature contract."""
    return name in _CONTRACT_INPUTS


_CONTRACT_INPUTS = frozenset(n for f in BY_QUALIFIED_NAME.values() for n in _input_names(f))


assert len(set(INPUT_LAYOUT)) == len(INPUT_LAYOUT), "duplicate names in INPUT_LAYOUT"
assert len(ROUTE_FEATURES) + len(ATTEMPT_FEATURES) == len(INPUT_LAYOUT)
