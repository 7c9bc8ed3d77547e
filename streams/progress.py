"""Where the worker's consumer stands on each attempts partition, and when it must seek to repair it.

Two failures have been seen with Faust 0.15 on the local broker, both after a crash-restart and the
rebalance that follows it (docs/streams.md, "Consumer repair"):

- a **gap**: offsets taken from a partition skip some (an event dropped inside Faust's fetch loop
  around the rebalance). Faust then counts the skipped offsets as done and commits past them, so
  nothing would ever deliver those events again;
- a **stall**: the broker holds records past the consumer's position and no event arrives for
  minutes while the agent waits.

Both are repaired the same way: seek the partition back to the first offset not yet taken, and let
the per-event-id idempotency absorb whatever is delivered twice. The attempts topic is not
compacted, so its offsets are dense; a broker that leaves holes (transaction markers) gets
`max_seeks` seeks per hole: when the re-reads skip the same offset that many times, the hole is
accepted as real. One re-skip is not enough to tell: records Faust's fetch loop already holds when
the seek lands are still delivered after it, past the offset sought, and they move Faust's read
offset past it again, so the re-read's records below them are dropped inside Faust (most likely how
a CI run of 2026-12-07 lost one event, when the first re-skip was taken for a real hole).

Plain data and arithmetic, no Faust: the worker feeds it offsets and clock readings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["PartitionProgress"]

log = logging.getLogger(__name__)


@dataclass
class PartitionProgress:
    """Per partition of one consumer generation: the next offset expected and when it last moved."""

    stall_s: float
    max_seeks: int = 5  # seeks to one offset before a hole there is taken as the broker's own
    next: dict[int, int] = field(default_factory=dict)
    moved: dict[int, float] = field(default_factory=dict)
    sought: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (offset, seeks)
    generation: int | None = None

    def _generation(self, generation: int | None) -> None:
        # A rebalance restarts every partition from its committed offset (possibly handled by
        # another worker in between): what was expected before says nothing about what follows.
        if generation != self.generation:
            self.next.clear()
            self.moved.clear()
            self.sought.clear()
            self.generation = generation

    def observe(
        self,
        partition: int,
        offsets: Sequence[int],
        now: float,
        generation: int | None = None,
        start: int | None = None,
    ) -> int | None:
        """Record the offsets of one partition taken in a batch, in order.

        `start`: where the partition's consumer started in this generation (its committed offset),
        used while nothing was taken from it yet. Returns the offset to seek back to when they
        skipped offsets never taken (a gap), else None.
        """
        self._generation(generation)
        expected = self.next.get(partition, start)
        seek: int | None = None
        seeks = 0
        for offset in offsets:
            if expected is not None and offset > expected and seek is None:
                at, seeks = self.sought.get(partition, (expected, 0))
                if at == expected and seeks >= self.max_seeks:
                    self.sought.pop(partition, None)  # sought there max_seeks times, skipped each time
                    log.warning(
                        "worker: offset %d of partition %d skipped again after %d seeks: taken as a "
                        "hole the broker has; an event there, if any, is not applied",
                        expected, partition, seeks,
                    )  # fmt: skip
                else:
                    seek, seeks = expected, (seeks if at == expected else 0) + 1
            if expected is None or offset >= expected:
                expected = offset + 1
        if expected is None:
            return None
        if seek is not None:
            self.sought[partition] = (seek, seeks)
            self.next[partition] = seek  # what is re-delivered from there on is in order again
        elif expected != self.next.get(partition):
            self.next[partition] = expected
            self.moved[partition] = now
        return seek

    def stalled(
        self,
        ends: Mapping[int, int],
        committed: Mapping[int, int | None],
        now: float,
        generation: int | None = None,
    ) -> dict[int, int]:
        """Partitions with records past the position and no progress for `stall_s`: {partition: seek to}.

        `ends` are the broker's end offsets, `committed` the group's committed offsets (the position of a
        partition nothing was taken from yet). A partition is reported at most once per `stall_s`.
        """
        self._generation(generation)
        out: dict[int, int] = {}
        for partition, end in ends.items():
            position = self.next.get(partition)
            if position is None:
                position = committed.get(partition) or 0
            since = self.moved.setdefault(partition, now)
            if end > position and now - since >= self.stall_s:
                out[partition] = position
                self.moved[partition] = now  # back off: next report after another stall_s
        return out
