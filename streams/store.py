"""Where materialized feature values live in a process: the latest row per (entity, key).

The server reads it on the hot path (never the network); the replica (streams.replica) and the
offline replay (streams.replay) write it through streams.replica.Materializer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from streams.contract import Entity

__all__ = ["FeatureRow", "FeatureStore", "InMemoryFeatureStore"]


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """Current feature values of one entity and the event time they are as of (epoch seconds)."""

    values: Mapping[str, float]
    as_of: float


class FeatureStore(Protocol):
    """Read access to the latest feature values by (entity, key)."""

    def get(self, entity: Entity, key: str) -> FeatureRow | None: ...


def _ignore(key: str) -> None:
    pass


class InMemoryFeatureStore:
    """A dict of the latest FeatureRow per (entity, key)."""

    def __init__(self) -> None:
        self._rows: dict[tuple[Entity, str], FeatureRow] = {}
        self._watched: Entity | None = None
        self._on_read: Callable[[str], None] = _ignore

    def watch_reads(self, entity: Entity, on_read: Callable[[str], None]) -> None:
        """Call `on_read(key)` each time `get` finds a row of `entity` (one watcher: the replica's
        card limit, which keeps the cards being decided on; streams.replica.Materializer)."""
        self._watched, self._on_read = entity, on_read

    def get(self, entity: Entity, key: str) -> FeatureRow | None:
        row = self._rows.get((entity, key))
        if entity is self._watched and row is not None:
            self._on_read(key)
        return row

    def put(self, entity: Entity, key: str, values: Mapping[str, float], as_of: float | None = None) -> None:
        self._rows[(entity, key)] = FeatureRow(dict(values), time.time() if as_of is None else as_of)

    def delete(self, entity: Entity, key: str) -> None:
        self._rows.pop((entity, key), None)

    def age_s(self, entity: Entity, key: str, now: float | None = None) -> float | None:
        """Seconds since the newest event behind this entity's values; None when it is unknown."""
        row = self._rows.get((entity, key))
        return None if row is None else (time.time() if now is None else now) - row.as_of

    def rows(self) -> dict[tuple[Entity, str], FeatureRow]:
        """A copy of every row (for tests, parity checks and inspection)."""
        return dict(self._rows)

    def __len__(self) -> int:
        return len(self._rows)
