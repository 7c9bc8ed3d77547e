"""Streaming features: the shared feature contract, its arithmetic, the Faust worker that keeps the
features, the server-side replica that follows them and the offline replay (streams.replay)."""

from streams.contract import (
    BY_QUALIFIED_NAME,
    CONTRACT_HASH,
    CONTRACT_VERSION,
    FEATURES,
    Entity,
    Feature,
    contract_hash,
    entity_key,
)
from streams.errors import StreamsError

__all__ = [
    "BY_QUALIFIED_NAME",
    "CONTRACT_HASH",
    "CONTRACT_VERSION",
    "FEATURES",
    "Entity",
    "Feature",
    "StreamsError",
    "contract_hash",
    "entity_key",
]
