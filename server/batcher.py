"""The micro-batcher: merges concurrent requests into one model forward and splits the result.

Its configuration mirrors Triton's dynamic batcher: ``max_batch_rows`` (preferred/max batch),
``max_queue_delay_us`` (how long the oldest request may wait for company; 0 = never wait) and
``queue_size`` (pending requests before new ones are refused with `QueueFull`).

How batches form: at most one batch is in flight. A request arriving while none is schedules a
flush for the end of the current event-loop pass (or, with a queue delay, for the oldest request's
arrival + ``max_queue_delay_us``, sooner once ``max_batch_rows`` rows wait), so every request
submitted in the same pass shares it. The flush takes whatever is queued, in arrival order, up to
``max_batch_rows`` rows (a single larger request runs alone), and runs it on one dedicated worker
thread while the event loop keeps accepting requests: under concurrency the next batch fills up
while this one computes, with zero added delay. When a batch finishes, the next one starts at once.
The thread runs nothing but the forward: the loop joins the batch's buffers into one tensor and
splits the output (a few torch calls per batch, none per request), because every step a second
thread takes in Python first waits for the GIL behind the busy loop. With ``inline`` the forward
runs on the loop instead (no hand-off; batches then only merge what one pass or the queue delay
gathered).

The hot path is plain callbacks, not a collector task: a batch costs the loop one flush callback and
one completion callback (from the worker, via ``call_soon_threadsafe``), whatever its size. Deadlines
are watched by a single timer at the earliest deadline of any queued or in-flight request (not one
per request): a request whose deadline passes, queued or in flight, fails at once with
`DeadlineExceeded` and its caller answers from the fallback.

Requests come as tensors (`submit`; the result is the request's ``[k, out]`` tensor) or as flat
float32 buffers (`submit_flat`, what the server sends: ``array('f')`` rows back to back; the result is
a ``k``-long list of output rows as Python floats, split from one ``tolist()`` of the batch).

The model is not part of the batcher: ``infer`` is any ``[N, D] -> [N, out]`` callable and is
**called afresh for every batch**, so a server binds a function that reads the registry's current
model at call time (hot reload then needs nothing from the batcher). An exception from ``infer``
fails every request of that batch with that exception.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.errors import ServerError

__all__ = ["BatchStats", "BatcherClosed", "BatcherConfig", "DeadlineExceeded", "MicroBatcher", "QueueFull"]

_log = logging.getLogger(__name__)

Infer = Callable[[torch.Tensor], torch.Tensor]
OnBatch = Callable[[int, int, float], None]
OnQueueWait = Callable[[list[float]], None]  # each request of a batch: seconds it waited for it
OutputRows = list[list[float]]


class QueueFull(ServerError):
    """``queue_size`` requests are already waiting; the caller should shed load (fallback)."""


class DeadlineExceeded(ServerError):
    """The request's deadline passed before its batch had answered; its result is not used."""


class BatcherClosed(ServerError, RuntimeError):
    """`submit` on a batcher that is not started or is stopping."""


@dataclass(frozen=True)
class BatcherConfig:
    """Dynamic batching settings (Triton names in parentheses)."""

    max_batch_rows: int = 256  # (max_batch_size) rows, not requests: one request carries k routes
    max_queue_delay_us: int = 0  # (max_queue_delay_microseconds) 0: never wait for more requests
    queue_size: int = 2048  # (max_queue_size) pending requests
    # Run the forward on the event loop instead of the inference thread: no hand-off, but the loop
    # accepts nothing while it runs, so batches only merge what was queued before it started.
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
    """What happened to one request (filled in when passed to `submit_flat`, or returned by
    `submit_with_stats`), e.g. for trace spans.

    Times are wall-clock nanoseconds (``time.time_ns()``, what OpenTelemetry takes): queued from
    `queued_ns` to `started_ns`, then in the batch forward until `finished_ns`.
    """

    queued_ns: int
    started_ns: int = 0
    finished_ns: int = 0
    batch_rows: int = 0
    batch_requests: int = 0


class _Request:
    __slots__ = ("arrived", "deadline", "flat", "future", "rows", "stats", "width", "x")

    def __init__(
        self,
        x: torch.Tensor | array.array[float],
        rows: int,
        width: int,
        deadline: float | None,
        future: asyncio.Future[Any],
        arrived: float,
        stats: BatchStats | None,
    ) -> None:
        self.x = x
        self.flat = not isinstance(x, torch.Tensor)
        self.rows = rows
        self.width = width
        self.deadline = deadline
        self.future = future
        self.arrived = arrived
        self.stats = stats


class _SplitMismatch(ServerError, RuntimeError):
    pass


def _batch_input(batch: Sequence[_Request]) -> torch.Tensor:
    """The batch's rows as one ``[N, D]`` float32 tensor (on the event loop: no thread waits on it)."""
    if all(r.flat for r in batch):
        total = sum(r.rows for r in batch)
        # One writable buffer (torch.frombuffer warns on read-only ones), one tensor for the batch.
        joined = bytearray().join(r.x for r in batch)  # type: ignore[misc]
        return torch.frombuffer(joined, dtype=torch.float32).view(total, batch[0].width)
    parts = [_as_tensor(r) for r in batch]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _split(y: torch.Tensor, batch: Sequence[_Request]) -> list[Any]:
    """One output part per request: a tensor for a tensor request, a list of rows for a flat one."""
    sizes = [r.rows for r in batch]
    total = sum(sizes)
    if y.dim() < 1 or y.shape[0] != total:
        raise _SplitMismatch(f"batch of {total} rows returned {list(y.shape)}; cannot split per request")
    out: list[Any] = []
    listed: list[Any] | None = None
    tensors: list[torch.Tensor] | None = None
    start = 0
    for i, r in enumerate(batch):
        end = start + r.rows
        if r.flat:
            if listed is None:
                listed = y.tolist()
            out.append(listed[start:end])
        else:
            if tensors is None:
                tensors = list(torch.split(y, sizes, dim=0))
            out.append(tensors[i])
        start = end
    if len(out) != len(batch) or any(len(p) != n for p, n in zip(out, sizes, strict=True)):
        raise _SplitMismatch(f"split of {list(y.shape)} does not match request rows {sizes}")
    return out


def _as_tensor(r: _Request) -> torch.Tensor:
    if isinstance(r.x, torch.Tensor):
        return r.x
    return torch.frombuffer(bytearray(r.x), dtype=torch.float32).view(r.rows, r.width)


_Done = Callable[[torch.Tensor | None, BaseException | None, float], None]


class _InferenceThread:
    """The one thread forwards run on: it takes ``(infer, x, done)`` jobs and posts
    ``done(y, error, seconds)`` back to the event loop.

    It runs nothing but the forward. Every other step of a batch (building the input, checking and
    splitting the output) runs on the event loop, because a second thread must win the GIL back for
    each step it takes in Python, and while the loop is busy that wait lasts up to the interpreter's
    switch interval (5 ms), stalling the whole batch. The thread stays in inference mode for life.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Infer, torch.Tensor, _Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="authopt-infer", daemon=True)
        self._thread.start()

    def submit(self, infer: Infer, x: torch.Tensor, done: _Done) -> None:
        self._jobs.put((infer, x, done))

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        perf = time.perf_counter
        post = self._loop.call_soon_threadsafe
        with torch.inference_mode():
            while (job := self._jobs.get()) is not None:
                infer, x, done = job
                t0 = perf()
                try:
                    y, err = infer(x), None
                except BaseException as exc:  # handed to the batch's requests, never lost here
                    y, err = None, exc
                try:
                    post(done, y, err, perf() - t0)
                except RuntimeError:  # a closed loop: nobody is waiting any more
                    return


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
        on_queue_wait: OnQueueWait | None = None,
    ) -> None:
        self._infer = infer
        self.config = config or BatcherConfig()
        self._on_batch = on_batch
        self._on_queue_wait = on_queue_wait
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_rows = 0
        self._inflight: list[_Request] | None = None  # the batch being computed
        self._flush_handle: asyncio.Handle | None = None
        self._flush_at: float | None = None  # when the scheduled flush runs (None: this pass)
        self._watch_handle: asyncio.TimerHandle | None = None
        self._watch_at = float("inf")
        self._thread: _InferenceThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing = False
        self._idle: asyncio.Event | None = None

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._started and not self._closing

    async def start(self) -> None:
        """Start the inference thread (idempotent)."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._idle = asyncio.Event()
        if self._thread is None:
            self._thread = _InferenceThread(self._loop)
        self._started = True

    async def stop(self) -> None:
        """Refuse new requests, finish everything already queued, then end the inference thread."""
        if not self._started:
            return
        self._closing = True
        if self._pending or self._inflight is not None:
            assert self._idle is not None
            self._idle.clear()
            self._schedule_flush(now=True)
            await self._idle.wait()
        self._cancel_timers()
        self._started = False
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    async def submit(
        self, rows: torch.Tensor | list[list[float]], deadline: float | None = None
    ) -> torch.Tensor:
        """Run `rows` ``[k, D]`` in the next batch; returns this request's ``[k, out]``.

        `deadline` is absolute, on the event loop's clock (``loop.time()``). Raises `QueueFull` at
        once when ``queue_size`` requests are waiting, `DeadlineExceeded` once the deadline passes
        before the result is there, or whatever ``infer`` raised for the batch.
        """
        result: torch.Tensor = await self._enqueue_tensor(rows, deadline, None)
        return result

    async def submit_with_stats(
        self, rows: torch.Tensor | list[list[float]], deadline: float | None = None
    ) -> tuple[torch.Tensor, BatchStats]:
        """`submit`, also returning when the request was queued / batched and how big its batch was."""
        stats = BatchStats(queued_ns=time.time_ns())
        result: torch.Tensor = await self._enqueue_tensor(rows, deadline, stats)
        return result, stats

    def submit_flat(
        self,
        flat: array.array[float],
        rows: int,
        deadline: float | None = None,
        stats: BatchStats | None = None,
    ) -> asyncio.Future[OutputRows]:
        """Queue `rows` rows given as one row-major float32 buffer; await the returned future for
        the ``rows`` output rows (lists of floats). Errors as `submit`; `QueueFull`, `BatcherClosed`
        and a bad shape are raised here, at once."""
        if rows < 1 or len(flat) % rows:
            raise ValueError(f"a flat request needs a whole number of rows: {len(flat)} values, {rows} rows")
        return self._enqueue(flat, rows, len(flat) // rows, deadline, stats)

    def _enqueue_tensor(
        self, rows: torch.Tensor | list[list[float]], deadline: float | None, stats: BatchStats | None
    ) -> asyncio.Future[Any]:
        x = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.float32)
        if x.dim() != 2 or x.shape[0] < 1:
            raise ValueError(f"rows must be a non-empty [k, D] batch, got shape {list(x.shape)}")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return self._enqueue(x, x.shape[0], x.shape[1], deadline, stats)

    def _enqueue(
        self,
        x: torch.Tensor | array.array[float],
        rows: int,
        width: int,
        deadline: float | None,
        stats: BatchStats | None,
    ) -> asyncio.Future[Any]:
        loop = self._loop
        if not self.running or loop is None:
            raise BatcherClosed("micro-batcher is not running")
        pending = self._pending
        if len(pending) >= self.config.queue_size:
            raise QueueFull(f"{len(pending)} requests waiting for inference (queue_size)")
        now = loop.time()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("deadline passed before the request was queued")
        fut: asyncio.Future[Any] = loop.create_future()
        pending.append(_Request(x, rows, width, deadline, fut, now, stats))
        self._pending_rows += rows
        if deadline is not None and deadline < self._watch_at:
            self._watch(deadline)
        if self._inflight is None:
            delay = self.config.max_queue_delay_us
            if not delay or self._pending_rows >= self.config.max_batch_rows:
                self._schedule_flush(now=True)
            elif self._flush_handle is None:
                self._schedule_flush(at=pending[0].arrived + delay / 1e6)
        return fut

    # --- flushing ----------------------------------------------------------------------------------

    def _schedule_flush(self, *, now: bool = False, at: float | None = None) -> None:
        loop = self._loop
        assert loop is not None
        handle = self._flush_handle
        if handle is not None:
            if self._flush_at is None or (at is not None and at >= self._flush_at):
                return  # already due at least as soon
            handle.cancel()
        if now or at is None:
            self._flush_handle, self._flush_at = loop.call_soon(self._flush), None
        else:
            self._flush_handle, self._flush_at = loop.call_at(at, self._flush), at

    def _flush(self) -> None:
        self._flush_handle = self._flush_at = None
        if self._inflight is not None:
            return  # the running batch starts the next one when it finishes
        batch = self._take()
        if not batch:
            self._maybe_idle()
            return
        self._inflight = batch
        started_ns = time.time_ns()
        if self._on_queue_wait is not None:
            assert self._loop is not None
            now = self._loop.time()
            try:
                self._on_queue_wait([now - r.arrived for r in batch])
            except Exception:
                _log.exception("micro-batcher on_queue_wait callback failed")
        try:
            x = _batch_input(batch)
        except Exception as exc:
            self._complete(batch, started_ns, None, exc, 0.0)
            return
        if self.config.inline or self._thread is None:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    y = self._infer(x)
            except Exception as exc:
                self._complete(batch, started_ns, None, exc, 0.0)
            else:
                self._complete(batch, started_ns, y, None, time.perf_counter() - t0)
            return

        def done(y: torch.Tensor | None, exc: BaseException | None, seconds: float) -> None:
            self._complete(batch, started_ns, y, exc, seconds)

        self._thread.submit(self._infer, x, done)

    def _complete(
        self,
        batch: list[_Request],
        started_ns: int,
        y: torch.Tensor | None,
        exc: BaseException | None,
        seconds: float,
    ) -> None:
        self._inflight = None
        parts: list[Any] | None = None
        if y is not None:
            try:
                parts = _split(y, batch)
            except Exception as split_exc:
                exc = split_exc
        if parts is None:
            _fail(batch, exc if exc is not None else RuntimeError("batch produced no result"))
        else:
            total = 0
            finished_ns = time.time_ns()
            n = len(batch)
            for r in batch:
                total += r.rows
            for r, part in zip(batch, parts, strict=True):
                st = r.stats
                if st is not None:
                    st.started_ns, st.finished_ns = started_ns, finished_ns
                    st.batch_rows, st.batch_requests = total, n
                if not r.future.done():
                    r.future.set_result(part)
            if self._on_batch is not None:
                try:
                    self._on_batch(total, n, seconds)
                except Exception:
                    _log.exception("micro-batcher on_batch callback failed")
        if self._pending:
            delay = self.config.max_queue_delay_us
            oldest = self._pending[0].arrived + delay / 1e6
            if not delay or self._closing or self._pending_rows >= self.config.max_batch_rows:
                self._schedule_flush(now=True)
            else:
                self._schedule_flush(at=oldest)
        else:
            self._maybe_idle()

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
            if req.future.done():  # the caller gave up (cancelled), or its deadline failed it
                pending.popleft()
                self._pending_rows -= req.rows
                continue
            if req.deadline is not None and req.deadline <= now:
                pending.popleft()
                self._pending_rows -= req.rows
                req.future.set_exception(DeadlineExceeded("deadline passed before inference"))
                continue
            if batch and (rows + req.rows > limit or req.width != width):
                break  # a request of another width (a malformed one) waits for its own batch
            pending.popleft()
            self._pending_rows -= req.rows
            batch.append(req)
            rows += req.rows
            width = req.width
        return batch

    def _maybe_idle(self) -> None:
        if self._idle is not None and not self._pending and self._inflight is None:
            self._idle.set()
            self._cancel_watch()

    # --- deadlines ---------------------------------------------------------------------------------

    def _watch(self, at: float) -> None:
        assert self._loop is not None
        if self._watch_handle is not None:
            self._watch_handle.cancel()
        self._watch_at = at
        self._watch_handle = self._loop.call_at(at, self._expire)

    def _cancel_watch(self) -> None:
        if self._watch_handle is not None:
            self._watch_handle.cancel()
        self._watch_handle, self._watch_at = None, float("inf")

    def _cancel_timers(self) -> None:
        self._cancel_watch()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = self._flush_at = None

    def _expire(self) -> None:
        """Fail every queued or in-flight request whose deadline has passed; re-arm for the next."""
        assert self._loop is not None
        self._watch_handle, self._watch_at = None, float("inf")
        now = self._loop.time()
        earliest = float("inf")
        for reqs in (self._pending, self._inflight or ()):
            for r in reqs:
                if r.deadline is None or r.future.done():
                    continue
                if r.deadline <= now:
                    r.future.set_exception(DeadlineExceeded("deadline passed before inference answered"))
                elif r.deadline < earliest:
                    earliest = r.deadline
        if earliest != float("inf"):
            self._watch(earliest)
