"""Micro-batcher: merging, splitting, limits, deadlines, errors and draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

from model import DELAY_BUCKETS_S, INPUT_LAYOUT, tiny_model
from server.batcher import (
    BatcherClosed,
    BatcherConfig,
    BatchStats,
    DeadlineExceeded,
    MicroBatcher,
    QueueFull,
)

D, OUT = len(INPUT_LAYOUT), 1 + len(DELAY_BUCKETS_S)
Factory = Callable[..., MicroBatcher]


class Recorder:
    """on_batch sink."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, float]] = []

    def __call__(self, rows: int, requests: int, seconds: float) -> None:
        self.batches.append((rows, requests, seconds))


class Gate:
    """An infer that blocks on a gate (so tests can pile requests up behind a running batch)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.fn = fn or (lambda x: x[:, :2] * 2)
        self.open = threading.Event()
        self.entered = threading.Event()
        self.seen_rows: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.open.wait(10)
        self.seen_rows.append(x.shape[0])
        return self.fn(x)

    async def wait_entered(self) -> None:
        for _ in range(1000):
            if self.entered.is_set():
                return
            await asyncio.sleep(0.002)
        raise AssertionError("infer never started")


@pytest.fixture
async def make_batcher() -> AsyncIterator[Factory]:
    made: list[MicroBatcher] = []

    def factory(infer: Callable[[torch.Tensor], torch.Tensor], **config: Any) -> MicroBatcher:
        on_batch = config.pop("on_batch", None)
        b = MicroBatcher(infer, BatcherConfig(**config), on_batch=on_batch)
        made.append(b)
        return b

    yield factory
    for b in made:
        await b.stop()


def _rows(req: int, k: int) -> torch.Tensor:
    """k rows of request `req`: column 0 = request id, column 1 = row index, rest random."""
    x = torch.randn(k, D)
    x[:, 0] = float(req)
    x[:, 1] = torch.arange(k, dtype=torch.float32)
    return x


async def test_results_split_per_request_under_concurrency(make_batcher: Factory) -> None:
    net = tiny_model(2)

    def infer(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)  # a forward long enough for requests to pile up behind it
        with torch.inference_mode():
            y: torch.Tensor = net(x)
        return y

    rec = Recorder()
    b = make_batcher(infer, max_batch_rows=64, on_batch=rec)
    await b.start()
    inputs = [_rows(i, 1 + i % 7) for i in range(50)]
    outs = await asyncio.gather(*(b.submit(x) for x in inputs))
    for x, y in zip(inputs, outs, strict=True):
        assert y.shape == (x.shape[0], OUT)
        with torch.inference_mode():
            alone = net(x)
        torch.testing.assert_close(y, alone, atol=1e-6, rtol=0)
    assert sum(r for r, _, _ in rec.batches) == sum(x.shape[0] for x in inputs)
    assert sum(n for _, n, _ in rec.batches) == 50
    assert max(n for _, n, _ in rec.batches) > 1, rec.batches
    assert all(s >= 0.002 for _, _, s in rec.batches)


async def test_each_request_s_queue_wait_is_reported(make_batcher: Factory) -> None:
    """on_queue_wait gets, per batch, how long each of its requests waited: behind a running batch
    a request waits for it."""
    gate = Gate()
    waits: list[list[float]] = []
    b = MicroBatcher(gate, BatcherConfig(max_batch_rows=64), on_queue_wait=waits.append)
    await b.start()
    try:
        first = asyncio.ensure_future(b.submit(_rows(0, 1)))
        await gate.wait_entered()
        behind = [asyncio.ensure_future(b.submit(_rows(i, 1))) for i in (1, 2)]
        await asyncio.sleep(0.05)  # the two wait behind the gated batch
        gate.open.set()
        await asyncio.gather(first, *behind)
    finally:
        await b.stop()
    assert [len(w) for w in waits] == [1, 2]
    assert waits[0][0] < 0.05 and all(0.04 <= w < 5 for w in waits[1])


async def test_rows_go_back_to_their_request_exactly(make_batcher: Factory) -> None:
    gate = Gate(lambda x: x[:, :2].clone())
    b = make_batcher(gate)
    await b.start()
    first = asyncio.ensure_future(b.submit(_rows(99, 1)))
    await gate.wait_entered()
    tasks = [asyncio.ensure_future(b.submit(_rows(i, 1 + i % 5))) for i in range(30)]
    await asyncio.sleep(0.01)
    gate.open.set()
    await first
    for i, t in enumerate(tasks):
        y = await t
        assert y[:, 0].tolist() == [float(i)] * (1 + i % 5)
        assert y[:, 1].tolist() == [float(j) for j in range(1 + i % 5)]
    assert gate.seen_rows == [1, sum(1 + i % 5 for i in range(30))]


async def test_list_input_accepted(make_batcher: Factory) -> None:
    b = make_batcher(lambda x: x * 2)
    await b.start()
    y = await b.submit([[1.0, 2.0], [3.0, 4.0]])
    assert y.dtype == torch.float32 and y.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    with pytest.raises(ValueError, match="non-empty"):
        await b.submit(torch.zeros(0, 2))


async def test_max_batch_rows_respected(make_batcher: Factory) -> None:
    gate = Gate()
    rec = Recorder()
    b = make_batcher(gate, max_batch_rows=16, on_batch=rec)
    await b.start()
    first = asyncio.ensure_future(b.submit(_rows(0, 1)))
    await gate.wait_entered()
    sizes = [5, 7, 3, 6, 40, 2, 9, 1, 1, 8]
    tasks = [asyncio.ensure_future(b.submit(_rows(i, k))) for i, k in enumerate(sizes)]
    await asyncio.sleep(0.01)
    assert b.queue_depth == len(sizes)
    gate.open.set()
    await first
    outs = await asyncio.gather(*tasks)
    assert [y.shape[0] for y in outs] == sizes
    # FIFO, greedy up to 16 rows; the 40-row request runs alone
    assert gate.seen_rows == [1, 15, 6, 40, 2 + 9 + 1 + 1, 8]
    assert [n for _, n, _ in rec.batches] == [1, 3, 1, 1, 4, 1]
    assert b.queue_depth == 0


async def test_queue_full_raised_immediately(make_batcher: Factory) -> None:
    gate = Gate()
    b = make_batcher(gate, queue_size=3)
    await b.start()
    running = asyncio.ensure_future(b.submit(_rows(0, 1)))
    await gate.wait_entered()
    waiting = [asyncio.ensure_future(b.submit(_rows(i, 1))) for i in range(1, 4)]
    await asyncio.sleep(0)
    assert b.queue_depth == 3
    with pytest.raises(QueueFull):
        await b.submit(_rows(9, 1))
    gate.open.set()
    await asyncio.gather(running, *waiting)
    assert (await b.submit(_rows(5, 1))).shape == (1, 2)  # room again


async def test_expired_deadline_is_not_run(make_batcher: Factory) -> None:
    gate = Gate()
    b = make_batcher(gate)
    await b.start()
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(b.submit(_rows(0, 1)))
    await gate.wait_entered()
    late = asyncio.ensure_future(b.submit(_rows(1, 3), deadline=loop.time() + 0.01))
    in_time = asyncio.ensure_future(b.submit(_rows(2, 2), deadline=loop.time() + 30))
    no_deadline = asyncio.ensure_future(b.submit(_rows(3, 4)))
    await asyncio.sleep(0.05)
    gate.open.set()
    await running
    with pytest.raises(DeadlineExceeded):
        await late
    assert (await in_time).shape == (2, 2) and (await no_deadline).shape == (4, 2)
    assert gate.seen_rows == [1, 6]  # the late request's 3 rows never reached the model
    with pytest.raises(DeadlineExceeded):
        await b.submit(_rows(4, 1), deadline=loop.time() - 1)


async def test_infer_exception_fails_the_whole_batch_only(make_batcher: Factory) -> None:
    calls = 0

    def infer(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")
        time.sleep(0.01)
        return x[:, :1]

    b = make_batcher(infer)
    await b.start()
    first = asyncio.ensure_future(b.submit(_rows(0, 1)))
    await asyncio.sleep(0.002)
    batch = [asyncio.ensure_future(b.submit(_rows(i, 2))) for i in range(5)]
    await first
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results), results
    assert (await b.submit(_rows(7, 2))).shape == (2, 1)  # the batcher survives


async def test_bad_output_shape_fails_the_batch(make_batcher: Factory) -> None:
    b = make_batcher(lambda x: x[:-1])
    await b.start()
    with pytest.raises(RuntimeError, match="cannot split per request"):
        await b.submit(_rows(0, 3))


async def test_cancelled_request_is_skipped(make_batcher: Factory) -> None:
    gate = Gate()
    b = make_batcher(gate)
    await b.start()
    running = asyncio.ensure_future(b.submit(_rows(0, 1)))
    await gate.wait_entered()
    gave_up = asyncio.ensure_future(b.submit(_rows(1, 5)))
    kept = asyncio.ensure_future(b.submit(_rows(2, 2)))
    await asyncio.sleep(0)
    gave_up.cancel()
    gate.open.set()
    await running
    assert (await kept).shape == (2, 2)
    assert gate.seen_rows == [1, 2]


async def test_queue_delay_waits_for_company(make_batcher: Factory) -> None:
    rec = Recorder()
    b = make_batcher(lambda x: x[:, :1], max_queue_delay_us=200_000, on_batch=rec)
    await b.start()

    async def later() -> torch.Tensor:
        await asyncio.sleep(0.02)
        return await b.submit(_rows(1, 1))

    t0 = time.perf_counter()
    await asyncio.gather(b.submit(_rows(0, 1)), later())
    assert [n for _, n, _ in rec.batches] == [2]
    assert time.perf_counter() - t0 >= 0.19

    # a full batch does not wait for the delay
    b2 = make_batcher(lambda x: x[:, :1], max_batch_rows=4, max_queue_delay_us=5_000_000)
    await b2.start()
    t0 = time.perf_counter()
    await asyncio.gather(b2.submit(_rows(0, 2)), b2.submit(_rows(1, 2)))
    assert time.perf_counter() - t0 < 1.0


async def test_zero_delay_does_not_wait(make_batcher: Factory) -> None:
    rec = Recorder()
    b = make_batcher(lambda x: x[:, :1], on_batch=rec)
    await b.start()
    await b.submit(_rows(0, 1))
    await asyncio.sleep(0.02)
    await b.submit(_rows(1, 1))
    assert [n for _, n, _ in rec.batches] == [1, 1]


async def test_stop_drains_queued_work_then_refuses(make_batcher: Factory) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_rows=4)
    await b.start()
    tasks = [asyncio.ensure_future(b.submit(_rows(i, 2))) for i in range(10)]
    await gate.wait_entered()
    stopping = asyncio.ensure_future(b.stop())
    await asyncio.sleep(0.01)
    assert not stopping.done()
    with pytest.raises(BatcherClosed):
        await b.submit(_rows(99, 1))
    gate.open.set()
    await stopping
    assert [y.shape for y in await asyncio.gather(*tasks)] == [(2, 2)] * 10
    assert sum(gate.seen_rows) == 20
    with pytest.raises(BatcherClosed):
        await b.submit(_rows(99, 1))


async def test_submit_before_start_refused() -> None:
    with pytest.raises(BatcherClosed):
        await MicroBatcher(lambda x: x).submit(torch.zeros(1, 2))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_rows"):
        BatcherConfig(max_batch_rows=0)
    with pytest.raises(ValueError, match="queue_size"):
        BatcherConfig(queue_size=0)
    with pytest.raises(ValueError, match="max_queue_delay_us"):
        BatcherConfig(max_queue_delay_us=-1)


async def test_submit_with_stats_reports_queueing_and_batch(make_batcher: Factory) -> None:
    gate = Gate()
    b = make_batcher(gate)
    await b.start()
    first = asyncio.ensure_future(b.submit_with_stats(_rows(0, 1)))
    await gate.wait_entered()
    second = asyncio.ensure_future(b.submit_with_stats(_rows(1, 2)))
    third = asyncio.ensure_future(b.submit(_rows(2, 3)))
    await asyncio.sleep(0.01)
    gate.open.set()
    (_, s1), (y2, s2), _ = await asyncio.gather(first, second, third)
    assert y2.shape == (2, 2)
    assert isinstance(s2, BatchStats)
    assert (s1.batch_rows, s1.batch_requests) == (1, 1)
    assert (s2.batch_rows, s2.batch_requests) == (5, 2)
    assert s2.queued_ns <= s1.finished_ns <= s2.started_ns <= s2.finished_ns
    assert s2.started_ns - s2.queued_ns >= 5_000_000  # it waited behind the first batch


async def test_flat_requests_get_their_own_rows_as_lists(make_batcher: Factory) -> None:
    import array

    gate = Gate(lambda x: x[:, :2].clone())
    rec = Recorder()
    b = make_batcher(gate, on_batch=rec)
    await b.start()
    first = asyncio.ensure_future(b.submit(_rows(99, 1)))
    await gate.wait_entered()
    flats = []
    for i in range(12):
        k = 1 + i % 4
        flats.append((i, k, b.submit_flat(array.array("f", _rows(i, k).flatten().tolist()), k)))
    tensor = asyncio.ensure_future(b.submit(_rows(50, 2)))  # tensors and flat buffers share a batch
    await asyncio.sleep(0.01)
    gate.open.set()
    await first
    for i, k, fut in flats:
        out = await fut
        assert isinstance(out, list) and len(out) == k
        assert out == [[float(i), float(j)] for j in range(k)]
    assert (await tensor)[:, 0].tolist() == [50.0, 50.0]
    assert gate.seen_rows == [1, sum(1 + i % 4 for i in range(12)) + 2]
    assert [n for _, n, _ in rec.batches] == [1, 13]
    with pytest.raises(ValueError, match="whole number of rows"):
        b.submit_flat(array.array("f", [1.0, 2.0, 3.0]), 2)


async def test_deadline_passing_mid_forward_fails_the_request_at_once(make_batcher: Factory) -> None:
    gate = Gate()
    b = make_batcher(gate)
    await b.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    slow = asyncio.ensure_future(b.submit(_rows(0, 1), deadline=t0 + 0.05))
    relaxed = asyncio.ensure_future(b.submit(_rows(1, 1), deadline=t0 + 30))
    await gate.wait_entered()  # both are in the forward, which blocks until the gate opens
    with pytest.raises(DeadlineExceeded):
        await slow
    assert loop.time() - t0 < 1.0  # failed when its deadline passed, not when the forward ended
    assert not relaxed.done()
    gate.open.set()
    assert (await relaxed).shape == (1, 2)


async def test_inline_batches_merge_what_one_loop_pass_submits(make_batcher: Factory) -> None:
    rec = Recorder()
    b = make_batcher(lambda x: x[:, :1], inline=True, on_batch=rec)
    await b.start()
    outs = await asyncio.gather(*(b.submit(_rows(i, 2)) for i in range(6)))
    assert [y[:, 0].tolist() for y in outs] == [[float(i)] * 2 for i in range(6)]
    assert [n for _, n, _ in rec.batches] == [6]
