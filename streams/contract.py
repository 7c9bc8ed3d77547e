"""The feature contract: every rolling feature's name, entity, window, dtype and default.

This is the one module that streams/ (which computes the features), model/ (which trains on them)
and server/ (which serves them) all import. Its hash travels in model manifests and feature
snapshots; a model trained under another contract is refused by the server.

Rates are exponentially decayed with the half-life given; each rate has an event count beside it
so that "no data" is distinguishable from "0 %". Defaults are what a consumer uses when the entity
has never been seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import StrEnum

CONTRACT_VERSION = "1"


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
    """One feature of the contract."""

    name: str
    entity: Entity
    description: str
    default: float
    window_s: int | None = None
    half_life_s: int | None = None
    dtype: str = "float32"

    @property
    def qualified(self) -> str:
        """`<entity>.<name>`, the feature's name in model input layouts."""
        return f"{self.entity.value}.{self.name}"


_MIN, _HOUR, _DAY = 60, 3600, 86400


def _rate(entity: Entity, tag: str, half_life_s: int, default: float) -> tuple[Feature, Feature]:
    return (
        Feature(
            f"approval_rate_{tag}",
            entity,
            f"approved / attempts, decayed, half-life {tag}",
            default,
            half_life_s=half_life_s,
        ),
        Feature(
            f"attempts_{tag}",
            entity,
            f"attempts behind approval_rate_{tag}, decayed",
            0.0,
            half_life_s=half_life_s,
        ),
    )


FEATURES: tuple[Feature, ...] = (
    *_rate(Entity.ROUTE, "1m", _MIN, 0.8),
    *_rate(Entity.ROUTE, "5m", 5 * _MIN, 0.8),
    *_rate(Entity.ROUTE, "1h", _HOUR, 0.8),
    *_rate(Entity.ROUTE, "24h", _DAY, 0.8),
    Feature(
        "error_rate_5m",
        Entity.ROUTE,
        "timeouts and route errors / attempts, 5 min",
        0.0,
        half_life_s=5 * _MIN,
    ),
    Feature("latency_p95_ms_5m", Entity.ROUTE, "route latency p95 over 5 min, ms", 0.0, window_s=5 * _MIN),
    *_rate(Entity.ROUTE_ISSUER, "1h", _HOUR, 0.8),
    *_rate(Entity.ROUTE_ISSUER, "24h", _DAY, 0.8),
    *_rate(Entity.ROUTE_BIN, "1h", _HOUR, 0.8),
    *_rate(Entity.ROUTE_BIN, "24h", _DAY, 0.8),
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
    Feature("declines_1h", Entity.ISSUER, "declines behind the shares, 1 h", 0.0, half_life_s=_HOUR),
    *_rate(Entity.MERCHANT, "24h", _DAY, 0.8),
    Feature(
        "reattempts_24h",
        Entity.CARD_MERCHANT,
        "reattempts of this card at this merchant, 24 h",
        0.0,
        window_s=_DAY,
    ),
    Feature(
        "reattempts_30d",
        Entity.CARD_MERCHANT,
        "reattempts of this card at this merchant, 30 days",
        0.0,
        window_s=30 * _DAY,
    ),
    Feature("last_decline_age_s", Entity.CARD_MERCHANT, "seconds since this card's last decline here", -1.0),
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
