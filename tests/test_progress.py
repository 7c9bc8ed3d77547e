"""streams.progress: the gap and stall arithmetic behind the worker's consumer repair."""

from __future__ import annotations

import pytest

from streams.progress import PartitionProgress


def test_dense_offsets_need_no_seek_and_record_the_next_one() -> None:
    p = PartitionProgress(stall_s=10)
    assert p.observe(0, [0, 1, 2], now=1.0) is None
    assert p.observe(0, [3, 4], now=2.0) is None
    assert p.next == {0: 5} and p.moved == {0: 2.0}


def test_a_gap_seeks_back_to_the_first_offset_never_taken() -> None:
    p = PartitionProgress(stall_s=10)
    p.observe(1, [10, 11, 12], now=1.0)
    assert p.observe(1, [14, 15], now=2.0) == 13  # 13 was skipped
    # the re-read from 13 is in order again (14 and 15 come twice: the idempotency absorbs them)
    assert p.observe(1, [13, 14, 15, 16], now=3.0) is None
    assert p.next[1] == 17


def test_a_gap_inside_one_batch_is_found_too() -> None:
    p = PartitionProgress(stall_s=10)
    assert p.observe(2, [0, 1, 3, 4], now=1.0) == 2  # no baseline before the batch, a hole inside it
    assert p.observe(2, [2, 3, 4, 5], now=2.0) is None


def test_a_first_batch_past_the_committed_offset_is_a_gap() -> None:
    """Before anything was taken, the committed offset is where the partition must start."""
    p = PartitionProgress(stall_s=10)
    assert p.observe(3, [7, 8], now=1.0, start=5) == 5
    assert p.observe(3, [5, 6, 7, 8], now=2.0, start=5) is None
    assert p.observe(4, [5, 6], now=1.0, start=5) is None  # started where committed: no gap


def test_a_hole_the_broker_really_has_is_accepted_after_max_seeks(caplog: pytest.LogCaptureFixture) -> None:
    # e.g. a transaction marker: seeking to it delivers the record after it again, every time
    p = PartitionProgress(stall_s=10, max_seeks=3)
    p.observe(0, [4], now=1.0)
    assert p.observe(0, [6], now=2.0) == 5
    assert p.observe(0, [6], now=3.0) == 5  # skipped again: sought again
    assert p.observe(0, [6], now=4.0) == 5
    assert p.observe(0, [6, 7], now=5.0) is None  # the same hole after 3 seeks: real, move on
    assert "offset 5 of partition 0 skipped again after 3 seeks" in caplog.text  # said, not silent
    assert p.next[0] == 8
    assert p.observe(0, [9], now=6.0) == 8  # a new hole is sought again


def test_a_seek_defeated_by_records_in_flight_is_sought_again() -> None:
    """The 2026-12-07 loss: after the seek to 81, the records Faust's fetch loop already held (111..)
    still come, past 81; Faust then drops the re-read's 81..110 as already read. Taking that
    re-skip for a real hole lost the events at 81..110 no worker had applied; seeking again gets them."""
    p = PartitionProgress(stall_s=10)
    assert p.observe(1, [95, 96, 110], now=1.0, start=81) == 81  # the first batch skipped 81..94
    assert p.observe(1, [111, 112], now=2.0) == 81  # in flight when the seek landed: seek again
    assert p.observe(1, [81, 82, 83], now=3.0) is None  # the re-read, in order
    assert p.next[1] == 84


def test_redelivered_older_offsets_are_not_gaps() -> None:
    p = PartitionProgress(stall_s=10)
    p.observe(0, [0, 1, 2, 3], now=1.0)
    assert p.observe(0, [1, 2, 3, 4], now=2.0) is None
    assert p.next[0] == 5


def test_a_rebalance_forgets_what_was_expected() -> None:
    p = PartitionProgress(stall_s=10)
    p.observe(0, [0, 1], now=1.0, generation=1)
    # after the rebalance another worker may have taken 2..9: starting at 10 is no gap
    assert p.observe(0, [10, 11], now=2.0, generation=2) is None
    assert p.next == {0: 12}


def test_a_partition_with_records_past_its_position_and_no_progress_is_stalled() -> None:
    p = PartitionProgress(stall_s=10)
    p.observe(0, [0, 1, 2], now=100.0)
    ends = {0: 50, 1: 30, 2: 7}
    committed = {0: None, 1: 20, 2: 7}
    assert p.stalled(ends, committed, now=101.0) == {}  # partitions 1 and 2 first seen now
    assert p.stalled(ends, committed, now=109.0) == {}
    # p0 holds records from 3 on, p1 from its committed 20; p2 is at its end: idle, not stalled
    assert p.stalled(ends, committed, now=111.0) == {0: 3, 1: 20}
    assert p.stalled(ends, committed, now=115.0) == {}  # reported once per stall_s
    assert p.stalled(ends, committed, now=121.5) == {0: 3, 1: 20}


def test_progress_resets_the_stall_clock() -> None:
    p = PartitionProgress(stall_s=10)
    p.observe(0, [0], now=0.0)
    p.observe(0, [1, 2], now=9.0)
    assert p.stalled({0: 100}, {}, now=15.0) == {}
    assert p.stalled({0: 100}, {}, now=19.5) == {0: 3}


def test_a_partition_nothing_was_committed_for_starts_at_zero() -> None:
    p = PartitionProgress(stall_s=1)
    assert p.stalled({3: 94}, {3: None}, now=0.0) == {}
    assert p.stalled({3: 94}, {3: None}, now=1.0) == {3: 0}
