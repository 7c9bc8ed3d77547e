"""The feature contract: every rolling feature's name, entity, window, dtype and default.

This is the one module that streams/ (which computes the features), model/ (which trains on them)
and server/ (which serves them) all import. Its hash travels in model manifests and feature
snapshots; a model trained under another contract is refused by the server.

Rates are exponentially decayed with the half-life given; each rate has an event count beside it
so that "no data" is distinguishable from "0 %". Per-card counters are exact sliding windows (the
network retry limits count attempts). Defaults are what a consumer uses when the entity has never
been seen. The arithmetic lives in streams.features; this module only declares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import StrEnum

CONTRACT_VERSION = "2"

# Pseudo-attempts of the route's own rate that a route x issuer or route x BIN rate is smoothed
# toward: smoothed = (approved + K * route_rate) / (attempts + K). With no data the entity takes the
# route's rate; after ~K attempts its own evidence weighs as much as the prior. Applied where rows
# become model inputs (model.layout), from the decayed counts the contract publishes, so training
# and serving smooth identically.
SMOOTHING_PSEUDO_ATTEMPTS = 10.0

# Decline classes of ISO 8583 response codes (field 39). Hard codes are never worth retrying.
DECLINE_CLASSES: tuple[str, ...] = (
    "insufficient_funds",
    "do_not_honor",
    "issuer_unavailable",
    "hard",
    "data",
    "other",
)
HARD_CODES = frozenset(
    ["03", "04", "07", "12", "15", "41", "43", "46", "57", "62", "78", "93", "R0", "R1", "R3"]
)
DATA_CODES = frozenset(["14", "54", "55", "N7", "82", "1A"])


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
    if response_code in HARD_CODES:
        return "hard"
    if response_code in DATA_CODES:
        return "data"
    return "other"


class Entity(StrEnum):
    """What a feature is keyed by."""

    ROUTE = "route"
    ROUTE_ISSUER = "route_issuer"
    ROUTE_BIN = "route_bin"
    ISSUER = "issuer"
    MERCHANT = "merchant"
    CARD_MERCHANT = "card_merchant"
    CARD_MERCHANT_AMOUNT = "card_merchant_amount"


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature of the contract.

    `half_life_s`: an exponentially decayed quantity (counts and sums halve every half-life);
    `window_s`: an exact count over a sliding window; neither: a point value. dtype "category" holds
    the index of a value in `categories` (-1: none); "epoch_s" a UTC time in seconds (-1: none).
    `smoothed_toward` names the route feature a sparse rate is shrunk toward (see
    SMOOTHING_PSEUDO_ATTEMPTS); its count is the `attempts_*` feature of the same suffix.
    """

    name: str
    entity: Entity
    description: str
    default: float
    window_s: int | None = None
    half_life_s: int | None = None
    dtype: str = "float32"
    categories: tuple[str, ...] = ()
    smoothed_toward: str | None = None

    @property
    def qualified(self) -> str:
        """`<entity>.<name>`, the feature's name in model input layouts."""
        return f"{self.entity.value}.{self.name}"


_MIN, _HOUR, _DAY = 60, 3600, 86400

# Half-life of each rate tag. A decayed rate with half-life h weighs the last h seconds as much as
# everything before; "1h" is the rate whose evidence is mostly from the last hour.
RATE_HALF_LIVES: dict[str, int] = {"1m": _MIN, "5m": 5 * _MIN, "1h": _HOUR, "24h": _DAY}
DEFAULT_APPROVAL_RATE = 0.8


def _rate(entity: Entity, tag: str, *, smoothed: bool = False) -> tuple[Feature, Feature]:
    half_life_s = RATE_HALF_LIVES[tag]
    toward = f"route.approval_rate_{tag}" if smoothed else None
    how = f", smoothed toward {toward}" if smoothed else ""
    return (
        Feature(
            f"approval_rate_{tag}",
            entity,
            f"approved / attempts, decayed, half-life {tag}{how}",
            DEFAULT_APPROVAL_RATE,
            half_life_s=half_life_s,
            smoothed_toward=toward,
        ),
        Feature(
            f"attempts_{tag}",
            entity,
            f"attempts behind approval_rate_{tag}, decayed (0: no data)",
            0.0,
            half_life_s=half_life_s,
        ),
    )


FEATURES: tuple[Feature, ...] = (
    *_rate(Entity.ROUTE, "1m"),
    *_rate(Entity.ROUTE, "5m"),
    *_rate(Entity.ROUTE, "1h"),
    *_rate(Entity.ROUTE, "24h"),
    Feature(
        "error_rate_5m",
        Entity.ROUTE,
        "timeouts and route errors / attempts, decayed, half-life 5 min (count: attempts_5m)",
        0.0,
        half_life_s=5 * _MIN,
    ),
    Feature(
        "latency_p95_ms_5m",
        Entity.ROUTE,
        "route latency p95 in ms from a decayed histogram, half-life 5 min (count: attempts_5m)",
        0.0,
        half_life_s=5 * _MIN,
    ),
    *_rate(Entity.ROUTE_ISSUER, "1h", smoothed=True),
    *_rate(Entity.ROUTE_ISSUER, "24h", smoothed=True),
    *_rate(Entity.ROUTE_BIN, "1h", smoothed=True),
    *_rate(Entity.ROUTE_BIN, "24h", smoothed=True),
    Feature("share_51_1h", Entity.ISSUER, "share of declines with code 51, 1 h", 0.0, half_life_s=_HOUR),
    Feature("share_05_1h", Entity.ISSUER, "share of declines with code 05, 1 h", 0.0, half_life_s=_HOUR),
    Feature(
        "share_91_96_1h", Entity.ISSUER, "share of declines with code 91 or 96, 1 h", 0.0, half_life_s=_HOUR
    ),
    Feature(
        "share_hard_1h",
        Entity.ISSUER,
        "share of declines with a never-retry code, 1 h",
        0.0,
        half_life_s=_HOUR,
    ),
    Feature("declines_1h", Entity.ISSUER, "declines behind the shares, decayed, 1 h", 0.0, half_life_s=_HOUR),
    *_rate(Entity.MERCHANT, "24h"),
    Feature(
        "reattempts_24h",
        Entity.CARD_MERCHANT,
        "attempts of this card here within 30 days after one of its declines here, last 24 h",
        0.0,
        window_s=_DAY,
    ),
    Feature(
        "reattempts_30d",
        Entity.CARD_MERCHANT,
        "attempts of this card here within 30 days after one of its declines here, last 30 days",
        0.0,
        window_s=30 * _DAY,
    ),
    Feature(
        "last_decline_at",
        Entity.CARD_MERCHANT,
        "time of this card's last decline here (model inputs use its age at decision time)",
        -1.0,
        dtype="epoch_s",
    ),
    Feature(
        "last_decline_class",
        Entity.CARD_MERCHANT,
        "decline class of this card's last decline here",
        -1.0,
        dtype="category",
        categories=DECLINE_CLASSES,
    ),
    Feature(
        "attempts_30d",
        Entity.CARD_MERCHANT_AMOUNT,
        "attempts of this card at this merchant for this amount, 30 days",
        0.0,
        window_s=30 * _DAY,
    ),
)

BY_QUALIFIED_NAME: dict[str, Feature] = {f.qualified: f for f in FEATURES}


def contract_hash() -> str:
    """A stable hash of the whole contract (version and every feature's definition)."""
    doc = {"version": CONTRACT_VERSION, "features": [asdict(f) for f in FEATURES]}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


CONTRACT_HASH = contract_hash()


def entity_key(
    entity: Entity,
    *,
    route: str = "",
    bin_: str = "",
    issuer_country: str = "",
    merchant: str = "",
    fingerprint: str = "",
    amount_minor: int = 0,
    currency: str = "",
) -> str:
    """The key under which an entity's snapshot is stored (and published on Kafka)."""
    match entity:
        case Entity.ROUTE:
            return route
        case Entity.ROUTE_ISSUER:
            return f"{route}|{issuer_country}|{bin_[:6]}"
        case Entity.ROUTE_BIN:
            return f"{route}|{bin_[:8]}"
        case Entity.ISSUER:
            return f"{issuer_country}|{bin_[:6]}"
        case Entity.MERCHANT:
            return merchant
        case Entity.CARD_MERCHANT:
            return f"{fingerprint}|{merchant}"
        case Entity.CARD_MERCHANT_AMOUNT:
            return f"{fingerprint}|{merchant}|{amount_minor}{currency}"
