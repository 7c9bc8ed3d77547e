"""The micro-batcher: merges concurrent requests into one model forward and splits the result.

Its configuration mirrors Triton's dynamic batcher: ``max_batch_rows`` (preferred/max batch),
``max_queue_delay_us`` (how long the oldest request may wait for company; 0 = never wait) and
``queue_size`` (pending requests before new ones are refused with `QueueFull`).

How batches form: one collector task waits for the first pending request, optionally waits up to
``max_queue_delay_us`` (from that request's arrival) for more, then greedily takes whatever is queued,
in arrival order, up to ``max_batch_rows`` rows (a single larger request runs alone). The forward runs
on one dedicated worker thread (`run_in_executor`) while the event loop keeps accepting requests, so
under concurrency the next batch fills up naturally while this one computes — with zero added delay.
One executor call per batch: concatenation, the forward and the split all happen on the worker.

The model is not part of the batcher: ``infer`` is any ``[N, D] -> [N, out]`` callable and is
**called afresh for every batch**, so a server binds a function that reads the registry's current
model at call time (hot reload then needs nothing from the batcher). An exception from ``infer``
fails every request of that batch with that exception.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = ["BatchStats", "BatcherClosed", "BatcherConfig", "DeadlineExceeded", "MicroBatcher", "QueueFull"]

_log = logging.getLogger(__name__)

Infer = Callable[[torch.Tensor], torch.Tensor]
OnBatch = Callable[[int, int, float], None]


class QueueFull(Exception):
    """``queue_size`` requests are already waiting; the caller should shed load (fallback)."""


class DeadlineExceeded(Exception):
    """The request's deadline had passed when its batch was formed; its rows were not run."""


class BatcherClosed(RuntimeError):
    """`submit` on a batcher that is not started or is stopping."""


@dataclass(frozen=True)
class BatcherConfig:
    """Dynamic batching settings (Triton names in parentheses)."""

    max_batch_rows: int = 256  # (max_batch_size) rows, not requests: one request carries k routes
    max_queue_delay_us: int = 0  # (max_queue_delay_microseconds) 0: never wait for more requests
    queue_size: int = 2048  # (max_queue_size) pending requests
    # Run the forward on the event loop instead of the inference thread. For a small CPU model the
    # forward (~0.1 ms) is cheaper than the thread hand-off, and with two threads wanting the GIL
    # every hand-off can wait out the interpreter's 5 ms switch interval (measured: 2.5 requests per
    # forward at 16 in flight, p50 29 ms). A GPU forward blocks on the device: keep the thread there.
    inline: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")


@dataclass(slots=True)
class BatchStats:
    """What happened to one request (from `MicroBatcher.submit_with_stats`), e.g. for trace spans.

    Times are wall-clock nanoseconds (``time.time_ns()``, what OpenTelemetry takes): queued from
    `queued_ns` to `started_ns`, then in the batch forward until `finished_ns`.
    """

    queued_ns: int
    started_ns: int = 0
    finished_ns: int = 0
    batch_rows: int = 0
    batch_requests: int = 0


class _Request:
    __slots__ = ("arrived", "deadline", "future", "rows", "stats", "x")

    def __init__(
        self,
        x: torch.Tensor,
        deadline: float | None,
        future: asyncio.Future[torch.Tensor],
        arrived: float,
        stats: BatchStats | None,
    ) -> None:
        self.x = x
        self.rows = x.shape[0]
        self.deadline = deadline
        self.future = future
        self.arrived = arrived
        self.stats = stats


class _SplitMismatch(RuntimeError):
    pass


def _run_batch(
    infer: Infer, xs: Sequence[torch.Tensor], sizes: Sequence[int]
) -> tuple[list[torch.Tensor], float]:
    """Worker-thread side of one batch: concatenate, forward, check and split."""
    t0 = time.perf_counter()
    x = xs[0] if len(xs) == 1 else torch.cat(list(xs), dim=0)
    y = infer(x)
    total = x.shape[0]
    if y.dim() < 1 or y.shape[0] != total:
        raise _SplitMismatch(f"batch of {total} rows returned {list(y.shape)}; cannot split per request")
    parts = list(torch.split(y, list(sizes), dim=0))
    if len(parts) != len(sizes) or any(p.shape[0] != n for p, n in zip(parts, sizes, strict=True)):
        raise _SplitMismatch(f"split of {list(y.shape)} does not match request rows {list(sizes)}")
    return parts, time.perf_counter() - t0


def _fail(batch: Sequence[_Request], exc: BaseException) -> None:
    for r in batch:
        if not r.future.done():
            r.future.set_exception(exc)


class MicroBatcher:
    """Merges concurrent `submit` calls into batched ``infer`` calls; see the module docstring."""

    def __init__(
        self,
        infer: Infer,
        config: BatcherConfig | None = None,
        *,
        on_batch: OnBatch | None = None,
        inline_when: Callable[[], bool] | None = None,
    ) -> None:
        """`inline_when`, if given, decides per batch instead of ``config.inline`` (e.g. by the
        current model's device and measured latency, which change on hot reload)."""
        self._infer = infer
        self._inline_when = inline_when
        self.config = config or BatcherConfig()
        self._on_batch = on_batch
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_rows = 0
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def start(self) -> None:
        """Start the collector task and the inference thread (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="authopt-infer")
        self._task = self._loop.create_task(self._collect(), name="micro-batcher")

    async def stop(self) -> None:
        """Refuse new requests, finish everything already queued, then end the task and the thread."""
        self._closing = True
        self._wake()
        task, self._task = self._task, None
        if task is not None:
            await task
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def submit(
        self, rows: torch.Tensor | list[list[float]], deadline: float | None = None
    ) -> torch.Tensor:
        """Run `rows` ``[k, D]`` in the next batch; returns this request's ``[k, out]``.

        `deadline` is absolute, on the event loop's clock (``loop.time()``). Raises `QueueFull` at
        once when ``queue_size`` requests are waiting, `DeadlineExceeded` if the deadline had passed
        when the batch formed, or whatever ``infer`` raised for the batch.
        """
        return await self._submit(rows, deadline, None)

    async def submit_with_stats(
        self, rows: torch.Tensor | list[list[float]], deadline: float | None = None
    ) -> tuple[torch.Tensor, BatchStats]:
        """`submit`, also returning when the request was queued / batched and how big its batch was."""
        stats = BatchStats(queued_ns=time.time_ns())
        return await self._submit(rows, deadline, stats), stats

    async def _submit(
        self, rows: torch.Tensor | list[list[float]], deadline: float | None, stats: BatchStats | None
    ) -> torch.Tensor:
        if not self.running or self._loop is None:
            raise BatcherClosed("micro-batcher is not running")
        if len(self._pending) >= self.config.queue_size:
            raise QueueFull(f"{len(self._pending)} requests waiting for inference (queue_size)")
        x = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.float32)
        if x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"rows must be a non-empty [k, D] batch, got shape {list(x.shape)}")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        loop = self._loop
        fut: asyncio.Future[torch.Tensor] = loop.create_future()
        self._pending.append(_Request(x, deadline, fut, loop.time(), stats))
        self._pending_rows += x.shape[0]
        if self._pending_rows >= self.config.max_batch_rows or len(self._pending) == 1:
            self._wake()
        return await fut

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, timeout: float | None = None) -> None:
        assert self._loop is not None
        self._waiter = self._loop.create_future()
        handle = self._loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def _collect(self) -> None:
        try:
            await self._collect_loop()
        finally:  # normally empty; non-empty only if the task was cancelled
            _fail(list(self._pending), BatcherClosed("micro-batcher stopped"))
            self._pending.clear()
            self._pending_rows = 0

    async def _collect_loop(self) -> None:
        assert self._loop is not None
        loop = self._loop
        delay_s = self.config.max_queue_delay_us / 1e6
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wait()
                continue
            if delay_s > 0 and not self._closing:
                # Triton semantics: the oldest request waits at most max_queue_delay for company.
                until = self._pending[0].arrived + delay_s
                while self._pending_rows < self.config.max_batch_rows and not self._closing:
                    remaining = until - loop.time()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
            batch = self._take()
            if batch:
                inline = await self._execute(batch)
                if inline:
                    await asyncio.sleep(0)  # let callers resume and new requests queue up

    def _take(self) -> list[_Request]:
        """Pop the next batch: FIFO, up to max_batch_rows; drop cancelled and expired requests."""
        assert self._loop is not None
        now = self._loop.time()
        limit = self.config.max_batch_rows
        pending = self._pending
        batch: list[_Request] = []
        rows = 0
        width = -1
        while pending:
            req = pending[0]
            if req.future.done():  # the caller gave up (cancelled)
                pending.popleft()
                self._pending_rows -= req.rows
                continue
            if req.deadline is not None and req.deadline <= now:
                pending.popleft()
                self._pending_rows -= req.rows
                req.future.set_exception(DeadlineExceeded("deadline passed before inference"))
                continue
            if batch and (rows + req.rows > limit or req.x.shape[1] != width):
                break  # a request of another width (a malformed one) waits for its own batch
            pending.popleft()
            self._pending_rows -= req.rows
            batch.append(req)
            rows += req.rows
            width = req.x.shape[1]
        return batch

    def _inline(self) -> bool:
        return self._inline_when() if self._inline_when is not None else self.config.inline

    async def _execute(self, batch: list[_Request]) -> bool:
        """Run one batch; returns whether it ran inline on the event loop."""
        assert self._loop is not None
        inline = self._inline()
        xs = [r.x for r in batch]
        sizes = [r.rows for r in batch]
        started_ns = time.time_ns()
        try:
            if inline:
                parts, seconds = _run_batch(self._infer, xs, sizes)
            else:
                parts, seconds = await self._loop.run_in_executor(
                    self._executor, _run_batch, self._infer, xs, sizes
                )
        except asyncio.CancelledError:
            _fail(batch, BatcherClosed("micro-batcher cancelled during inference"))
            raise
        except Exception as exc:
            _fail(batch, exc)
            return inline
        total = sum(sizes)
        finished_ns = time.time_ns()
        for r, part in zip(batch, parts, strict=True):
            st = r.stats
            if st is not None:
                st.started_ns, st.finished_ns = started_ns, finished_ns
                st.batch_rows, st.batch_requests = total, len(batch)
            if not r.future.done():
                r.future.set_result(part)
        if self._on_batch is not None:
            try:
                self._on_batch(total, len(batch), seconds)
            except Exception:
                _log.exception("micro-batcher on_batch callback failed")
        return inline
