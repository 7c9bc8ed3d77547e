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
    """The latest feature values per (entity, key): per entity, a dict of each key's values and a
    dict of each key's as-of time.

    Held so that CPython's garbage collector does not track them: a dict of floats is untracked, a
    FeatureRow instance, an (entity, key) tuple or a tuple holding a dict never is. A server holds a
    row per card, up to millions, and a full collection that walked them all paused every request
    (docs/reliability.md). FeatureRow is made on read.
    """

    def __init__(self) -> None:
        self._values: dict[Entity, dict[str, dict[str, float]]] = {e: {} for e in Entity}
        self._as_of: dict[Entity, dict[str, float]] = {e: {} for e in Entity}
        self._watched: Entity | None = None
        self._on_read: Callable[[str], None] = _ignore

    def watch_reads(self, entity: Entity, on_read: Callable[[str], None]) -> None:
        """Call `on_read(key)` each time `get` finds a row of `entity` (one watcher: the replica's
        card limit, which keeps the cards being decided on; streams.replica.Materializer)."""
        self._watched, self._on_read = entity, on_read

    def get(self, entity: Entity, key: str) -> FeatureRow | None:
        values = self._values[entity].get(key)
        if values is None:
            return None
        if entity is self._watched:
            self._on_read(key)
        return FeatureRow(values, self._as_of[entity][key])

    def put(self, entity: Entity, key: str, values: Mapping[str, float], as_of: float | None = None) -> None:
        self._values[entity][key] = dict(values)
        self._as_of[entity][key] = time.time() if as_of is None else as_of

    def delete(self, entity: Entity, key: str) -> None:
        if self._values[entity].pop(key, None) is not None:
            del self._as_of[entity][key]

    def age_s(self, entity: Entity, key: str, now: float | None = None) -> float | None:
        """Seconds since the newest event behind this entity's values; None when it is unknown."""
        as_of = self._as_of[entity].get(key)
        return None if as_of is None else (time.time() if now is None else now) - as_of

    def rows(self) -> dict[tuple[Entity, str], FeatureRow]:
        """A copy of every row (for tests, parity checks and inspection)."""
        return {
            (e, k): FeatureRow(values, self._as_of[e][k])
            for e, rows in self._values.items()
            for k, values in rows.items()
        }

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._values.values())
