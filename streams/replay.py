"""Offline replay: the point-in-time features the server would have seen for every event of a log.

An event log is a file of length-delimited `authopt.v1.AttemptEvent` records (a varint byte count,
then the message: protobuf's usual delimited framing), in the order the server accepted them.
`replay` walks it through the same FeatureProcessor and Materializer the worker and the replica run
and, before applying each event, yields the feature store as it stood: only events earlier in the
log are in it, so a training row never sees its own outcome or anything after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from authopt.v1 import events_pb2
from streams.processor import DEFAULT_LATENESS_S, DEFAULT_MAX_FUTURE_S, BatchResult, FeatureProcessor
from streams.replica import Materializer
from streams.store import InMemoryFeatureStore

__all__ = [
    "FeatureReplay",
    "ReplayStats",
    "append_record",
    "iter_records",
    "read_log",
    "replay",
    "replay_final",
    "write_log",
]


def _write_varint(out: BinaryIO, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.write(bytes((byte | 0x80,)))
        else:
            out.write(bytes((byte,)))
            return


def append_record(out: BinaryIO, raw: bytes) -> None:
    """Append one serialized record to an open delimited log."""
    _write_varint(out, len(raw))
    out.write(raw)


def write_log(path: Path, events: Iterable[events_pb2.AttemptEvent | bytes]) -> int:
    """Write events as a delimited log; returns how many were written."""
    n = 0
    with path.open("wb") as out:
        for event in events:
            append_record(out, event if isinstance(event, bytes) else event.SerializeToString())
            n += 1
    return n


def read_log(path: Path) -> Iterator[bytes]:
    """The raw records of a delimited log file, in order."""
    return iter_records(path.read_bytes(), str(path))


def iter_records(data: bytes, name: str = "log") -> Iterator[bytes]:
    """The raw records of a delimited log held in memory, in order (`name` for error messages)."""
    pos, end = 0, len(data)
    while pos < end:
        size = shift = 0
        while True:
            if pos >= end:
                raise ValueError(f"{name}: truncated length prefix at byte {pos}")
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        if pos + size > end:
            raise ValueError(f"{name}: record at byte {pos} runs past the end of the file")
        yield data[pos : pos + size]
        pos += size


class ReplayStats:
    """Counts of a replay, filled as it goes."""

    def __init__(self) -> None:
        self.applied = 0
        self.duplicates = 0
        self.dead: dict[str, int] = {}

    def add(self, result: BatchResult) -> None:
        self.applied += len(result.applied)
        self.duplicates += result.duplicates
        for d in result.dead:
            self.dead[d.reason.value] = self.dead.get(d.reason.value, 0) + 1


class FeatureReplay:
    """Events in, features out, in one process: the worker's FeatureProcessor feeding the replica's
    Materializer, with no broker in between. `store` is what a caught-up server would read."""

    def __init__(
        self,
        *,
        lateness_s: float | None = None,
        max_future_s: float | None = None,
        store: InMemoryFeatureStore | None = None,
        stats: ReplayStats | None = None,
    ) -> None:
        self.store = store if store is not None else InMemoryFeatureStore()
        self._states: dict[bytes, bytes | None] = {}
        self._processor = FeatureProcessor(
            self._states,
            lateness_s=DEFAULT_LATENESS_S if lateness_s is None else lateness_s,
            max_future_s=DEFAULT_MAX_FUTURE_S if max_future_s is None else max_future_s,
        )
        self._materializer = Materializer(self.store)
        self._stats = stats

    def apply(self, record: bytes) -> BatchResult:
        """Apply one serialized AttemptEvent; a refused record (DeadReason) changes nothing."""
        result = self._processor.process(0, [record], self._states.__setitem__)
        for raw in result.snapshots.values():
            self._materializer.apply_bytes(raw)
        if self._stats is not None:
            self._stats.add(result)
        return result


def replay(
    records: Iterable[bytes],
    *,
    lateness_s: float | None = None,
    max_future_s: float | None = None,
    store: InMemoryFeatureStore | None = None,
    stats: ReplayStats | None = None,
) -> Iterator[tuple[bytes, InMemoryFeatureStore]]:
    """For each record: (record, the store as the server would have seen it just before it).

    The store is live: read it before advancing the iterator. Refused records (see
    streams.processor.DeadReason) are yielded too, and then change nothing.
    """
    live = FeatureReplay(lateness_s=lateness_s, max_future_s=max_future_s, store=store, stats=stats)
    for record in records:
        yield record, live.store
        live.apply(record)


def replay_final(
    records: Iterable[bytes], *, lateness_s: float | None = None, max_future_s: float | None = None
) -> InMemoryFeatureStore:
    """The store after every record (what a caught-up replica holds)."""
    store = InMemoryFeatureStore()
    for _ in replay(records, store=store, lateness_s=lateness_s, max_future_s=max_future_s):
        pass
    return store
