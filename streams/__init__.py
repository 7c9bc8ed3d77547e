"""Streaming features: the shared feature contract (and, later, the Faust workers that compute it)."""

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

__all__ = [
    "BY_QUALIFIED_NAME",
    "CONTRACT_HASH",
    "CONTRACT_VERSION",
    "FEATURES",
    "Entity",
    "Feature",
    "contract_hash",
    "entity_key",
]
