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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from streams.contract import BY_QUALIFIED_NAME, FEATURES, Entity

LAYOUT_VERSION = "1"

# Retry delay buckets (seconds) of the model's retry head: output column 1 + b is P(approve) if the
# declined payment is retried on this route after DELAY_BUCKETS_S[b]. They line up with the
# Mastercard MAC 24-30 minimum waits so a rule-imposed wait always has a matching bucket.
DELAY_BUCKETS_S: tuple[int, ...] = (0, 3600, 86400, 2 * 86400, 4 * 86400, 6 * 86400, 8 * 86400, 10 * 86400)

Rows = Mapping[Entity, Mapping[str, float] | None]

_ROUTE_ENTITIES = (Entity.ROUTE, Entity.ROUTE_ISSUER, Entity.ROUTE_BIN)
_ATTEMPT_ENTITIES = (Entity.ISSUER, Entity.MERCHANT, Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT)

ROUTE_FEATURES: tuple[str, ...] = (
    *(f.qualified for f in FEATURES if f.entity in _ROUTE_ENTITIES),
    "route.cost_bps",
    "route.is_last_declined_route",
)

# Proto enum numbers (authopt.v1) one-hot encoded; index 0 (UNSPECIFIED) is the all-zero case.
_NETWORKS = ("visa", "mastercard", "amex", "discover", "jcb", "unionpay", "other")
_FUNDINGS = ("credit", "debit", "prepaid")
_CHANNELS = ("ecommerce", "recurring", "moto")
_INITIATORS = ("customer", "merchant")
# Decline classes of the last declined attempt (none when this is the first attempt).
DECLINE_CLASSES = ("insufficient_funds", "do_not_honor", "issuer_unavailable", "hard", "data", "other")
_HARD = frozenset(["03", "04", "07", "12", "15", "41", "43", "46", "57", "62", "78", "93", "R0", "R1", "R3"])
_DATA = frozenset(["14", "54", "55", "N7", "82", "1A"])

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
    *(f.qualified for f in FEATURES if f.entity in _ATTEMPT_ENTITIES),
)

INPUT_LAYOUT: tuple[str, ...] = ROUTE_FEATURES + ATTEMPT_FEATURES


def decline_class(response_code: str) -> str:
    """The decline class of an ISO 8583 response code ("" for none)."""
    if not response_code:
        return ""
    if response_code == "51":
        return "insufficient_funds"
    if response_code == "05":
        return "do_not_honor"
    if response_code in ("91", "96", "19"):
        return "issuer_unavailable"
    if response_code in _HARD:
        return "hard"
    if response_code in _DATA:
        return "data"
    return "other"


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """The request-level inputs of one decision (proto enums as their numbers)."""

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


def _one_hot(value: int, size: int) -> list[float]:
    out = [0.0] * size
    if 1 <= value <= size:
        out[value - 1] = 1.0
    return out


# Per entity, its features' (name, default) pairs in contract order, computed once: encoding runs
# on every request.
_ENTITY_FIELDS: dict[Entity, tuple[tuple[str, float], ...]] = {
    e: tuple((f.name, f.default) for f in FEATURES if f.entity is e) for e in Entity
}
_ENTITY_DEFAULTS: dict[Entity, list[float]] = {e: [d for _, d in fs] for e, fs in _ENTITY_FIELDS.items()}


def _entity_values(entity: Entity, row: Mapping[str, float] | None) -> list[float]:
    if row is None:
        return _ENTITY_DEFAULTS[entity].copy()
    get = row.get
    return [float(get(name, default)) for name, default in _ENTITY_FIELDS[entity]]


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
    for entity in _ATTEMPT_ENTITIES:
        out += _entity_values(entity, rows.get(entity))
    return out


def route_vector(route_id: str, cost_bps: int, ctx: AttemptContext, rows: Rows) -> list[float]:
    """The route part of a row, from the route's rolling features (`rows`, keyed by entity)."""
    out: list[float] = []
    for entity in _ROUTE_ENTITIES:
        out += _entity_values(entity, rows.get(entity))
    out += [float(cost_bps), 1.0 if ctx.last_route_id and route_id == ctx.last_route_id else 0.0]
    return out


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

    The server wraps it with ``torch.frombuffer`` without a copy: building a tensor from nested lists
    costs ~3x more per request.
    """
    shared = attempt_vector(ctx, attempt_rows)
    out = array.array("f")
    for rid, bps, rows in routes:
        out.extend(route_vector(rid, bps, ctx, rows))
        out.extend(shared)
    return out


def layout_features(name: str) -> bool:
    """True when `name` is a layout input backed by the feature contract."""
    return name in BY_QUALIFIED_NAME


assert len(set(INPUT_LAYOUT)) == len(INPUT_LAYOUT), "duplicate names in INPUT_LAYOUT"
assert len(ROUTE_FEATURES) + len(ATTEMPT_FEATURES) == len(INPUT_LAYOUT)
