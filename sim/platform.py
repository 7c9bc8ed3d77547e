"""A simulated payment platform that asks a live authopt server for every decision.

`authopt simulate` and `authopt up` run it. It plays the payments of a simulated world
(`sim.world`) at `rate` new payments per second of wall-clock time, in the world's order and
mix: for each payment it calls `Recommend` over gRPC, attempts the route that came first, draws the
outcome from the world's ground truth for that route, reports it with `ReportOutcomes` (so it flows
through Kafka into the features the next decisions read), and retries a decline when, and only
when, the retry advice says so: at once (`RETRY_NOW`), or at the advised time (`RETRY_AT`) when that
falls inside the payment's retry window and the run. Advice for later than the run ends is counted
as deferred, not played.

Two clocks. Every message carries wall-clock time (the server's features, windows and network
rules are about real time). The world runs as a time-lapse: a payment's first attempt happens at the
world's own time for it, so incidents, the time of day and paydays play `rate / payments_per_hour`
times faster than real time; a retry made `d` seconds after the first attempt happens `d` world
seconds after it too.

Next to authopt, a static-routing baseline plays the same payments in the same process, never
reported anywhere: each payment's first attempt on the merchant's primary route with the same draws
(common random numbers), and the fixed ladder's retries (a customer-initiated payment once, at once,
on the same route, where the network rules allow; merchant-initiated ones from day 1, so beyond any
run: deferred). The world also tells each first attempt's true P(approve) on every route, so the
expected approval of authopt's and static's choices, and of the best route (the oracle), are known.

Its settings are `sim.platform_settings.SimulateSettings` (`AUTHOPT_SIM_*`); what it counts and
reports, `sim.platform_stats.PlatformStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from authopt.v1 import attempt_pb2, optimizer_pb2, optimizer_pb2_grpc
from server import rules
from server.errors import error_info, retry_after_s
from sim.config import WorldConfig
from sim.platform_settings import SimulateSettings
from sim.platform_stats import PlatformStats, Tally
from sim.play import NETWORK_NAME, RuleCounters, add_prior_attempt, attempt_message, outcome_message
from sim.world import APPROVED, ERROR, Belief, Incident, Outcome, Payment, World

if TYPE_CHECKING:
    from authopt.v1.optimizer_pb2_grpc import AuthorizationOptimizerServiceAsyncStub as _Stub

__all__ = ["Platform"]

log = logging.getLogger(__name__)

_DAY = 86_400.0
_CLIENT_DEFAULT = "CLIENT_DEFAULT"  # the platform's own primary route when the server did not answer
_REPORT_MAX = 200  # outcomes per ReportOutcomes call (the server takes <= 500 and 64 KiB per message)
_REPORT_MAX_BYTES = 48 * 1024


@dataclass
class _Tried:
    route: int
    wall: float
    outcome: Outcome


class _Slot:
    """One payment's hold on the in-flight bound, released while it waits for a retry time."""

    def __init__(self, sem: asyncio.Semaphore) -> None:
        self.sem, self.held = sem, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.sem.release()

    async def acquire(self) -> None:
        await self.sem.acquire()
        self.held = True


_T = TypeVar("_T")
_END = object()
_UP_FRONT_DAYS = 3  # a run of at most this many simulated days builds them all before it starts


def built_ahead(items: Iterator[_T]) -> Iterator[_T]:
    """`items` in order, the first made here and each next one made on a thread while the one before
    it is used, so a consumer on an event loop never waits for one to be made (unless it uses them up
    faster than they are made)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="authopt-next-day")
    try:
        current = next(items, _END)
        while current is not _END:
            ahead = pool.submit(next, items, _END)
            yield current  # type: ignore[misc]
            current = ahead.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


async def _acquire_unless(sem: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Acquire `sem`, unless `stop` is set first (then False, holding nothing)."""
    if stop.is_set():
        return False
    if not sem.locked():
        await sem.acquire()
        return True
    acquiring = asyncio.ensure_future(sem.acquire())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not acquiring.done():
        acquiring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquiring
    got = acquiring.done() and not acquiring.cancelled()
    if got and stop.is_set():
        sem.release()
        return False
    return got


class Platform:
    """Plays a world's payments against a server; `await run(stop)` until the duration or `stop`."""

    def __init__(self, settings: SimulateSettings, world: WorldConfig, *, run_id: str | None = None) -> None:
        self.settings = settings
        self.config = world
        self.run_id = run_id or "run" + uuid.uuid4().hex[:6]
        self.stats = PlatformStats(settings.rate)
        self._counters = RuleCounters()  # the static baseline's retry counters (the world's clock)
        self._reports: asyncio.Queue[attempt_pb2.AttemptOutcome] | None = None
        self._end_wall = math.inf
        self._no_broker = False  # the server said it has no Kafka: outcomes are counted, not sent
        self.world: World | None = None  # the day being played
        self._incidents: dict[int, list[Incident]] = {}  # per day: every incident of its world
        self._spans: dict[int, list[float]] = {}  # per day: first and last world time played

    def _id(self, day: int, p: Payment, number: int) -> str:
        """`<run>.d<day>.p<payment>.a<attempt>`: letters between the numbers, because digits joined
        by dashes ("1234-5678-...") can pass Luhn and the server refuses anything like a card number."""
        return f"{self.run_id}.d{day}.p{p.index}.a{number}"

    # --- payments -----------------------------------------------------------------------------

    def worlds(self) -> Iterator[World]:
        """World `seed`, then `seed + 1`, ...: each a fresh day of the world when a run outlasts one.

        A bounded run only simulates the hours it needs (the population and incidents are the
        world's whatever its length).
        """
        cfg = self.config
        s = self.settings
        need_h = self._hours_needed()
        if need_h < cfg.traffic.hours:
            cfg = cfg.model_copy(update={"traffic": cfg.traffic.model_copy(update={"hours": need_h})})
        k = 0
        while True:
            yield World(cfg, s.seed + k)
            k += 1

    def _hours_needed(self) -> float:
        """World hours the run plays (with a margin); infinite for a run without an end."""
        s = self.settings
        if s.duration_s is None:
            return math.inf
        return s.rate * s.duration_s * 1.1 / self.config.traffic.payments_per_hour + 0.1

    def payments(self) -> Iterator[tuple[int, World, Payment]]:
        """Every payment of day 0, then of day 1, ...: never a day built in the event loop that
        plays the payments (a day of the default world takes ~1 s to build: it stalled every payment
        in flight once a simulated day). A run of a few days builds them all before its clock starts
        (`run` takes the first payment up front); a longer one builds each next day on a thread
        while the one before is played."""
        days: Iterator[tuple[World, list[Payment]]] = ((w, w.payments()) for w in self.worlds())
        need_h, day_h = self._hours_needed(), self.config.traffic.hours
        if need_h <= _UP_FRONT_DAYS * day_h:  # a few days: all of them before the clock starts
            days = itertools.chain(list(itertools.islice(days, math.ceil(need_h / day_h))), built_ahead(days))
        else:  # a long run: each next day on a thread while the one before is played
            days = built_ahead(days)
        for k, (world, payments) in enumerate(days):
            self.world = world
            self._incidents[k] = world.incidents(-math.inf, math.inf)
            # A new day is a new population: the baseline's per-card counters start afresh (this
            # also bounds their memory to one day's payments in a long run).
            self._counters = RuleCounters()
            for p in payments:
                yield k, world, p

    def incidents_now(self) -> list[Incident]:
        """The incidents of the world at its clock now (the newest first attempt)."""
        t = self.stats.sim_time
        return [] if self.world is None or not t else self.world.incidents(t, t + 1e-9)

    def incidents_played(self) -> list[dict[str, Any]]:
        """Every incident that overlapped the world time played, as JSON-ready dicts."""
        out = []
        for day, (first, last) in sorted(self._spans.items()):
            for i in self._incidents.get(day, []):
                if i.start <= last and i.end > first:
                    out.append(
                        {
                            "day": day,
                            "kind": i.kind,
                            "id": i.id,
                            "start": datetime.fromtimestamp(i.start, UTC).isoformat(),
                            "end": datetime.fromtimestamp(i.end, UTC).isoformat(),
                            "severity": i.severity,
                        }
                    )
        return out

    # --- the run ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, channel: grpc.aio.Channel | None = None) -> PlatformStats:
        """Play until `duration_s` has passed or `stop` is set; then let in-flight payments finish
        their current step (retries scheduled later are deferred) and flush the outcome reports."""
        s = self.settings
        own = channel is None
        chan = channel or grpc.aio.insecure_channel(
            s.target, options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)]
        )
        stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(chan)
        self._reports = asyncio.Queue(s.report_queue)
        reporter = asyncio.create_task(self._report_loop(stub))
        slots = asyncio.Semaphore(s.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        halt = asyncio.Event()
        source = self.payments()
        pending: tuple[int, World, Payment] | None = next(source)  # builds the first world up front
        self._end_wall = time.time() + (s.duration_s if s.duration_s is not None else math.inf)
        start = time.monotonic()
        self.stats.started = start
        try:
            k = 0
            while not stop.is_set():
                due = start + k / s.rate
                if s.duration_s is not None and max(due, time.monotonic()) - start >= s.duration_s:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
                    if stop.is_set():
                        break
                else:
                    await asyncio.sleep(0)  # behind schedule: catch up, but let the payments run too
                if slots.locked():
                    self.stats.throttled += 1
                if not await _acquire_unless(slots, stop):
                    break
                day, world, payment = pending or next(source)
                pending = None
                task = asyncio.create_task(self._payment(stub, day, world, payment, _Slot(slots), halt))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
        finally:
            self.stats.end_live = self.stats.live()
            halt.set()  # retries waiting for a later time give up (deferred)
            if tasks:
                await asyncio.wait(tasks, timeout=s.timeout_s * 4 + 5)
                for t in tasks:
                    t.cancel()
            self.stats.stopped = time.monotonic()
            self.stats.incidents = self.incidents_played()
            await self._drain_reports(reporter)
            if own:
                await chan.close(None)
        return self.stats

    async def _payment(
        self,
        stub: _Stub,
        day: int,
        world: World,
        p: Payment,
        slot: _Slot,
        halt: asyncio.Event,
    ) -> None:
        try:
            await self._play(stub, day, world, p, slot, halt)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not stop the traffic; it is counted and logged
            log.exception("payment %d-%d failed in the simulator", day, p.index)
            self.stats.request_errors["SIMULATOR"] += 1
        finally:
            slot.release()

    async def _recommend(
        self, stub: _Stub, req: optimizer_pb2.RecommendRequest
    ) -> optimizer_pb2.RecommendResponse | None:
        t0 = time.perf_counter()
        try:
            resp: optimizer_pb2.RecommendResponse = await stub.Recommend(req, timeout=self.settings.timeout_s)
        except grpc.aio.AioRpcError as err:
            self.stats.request_errors[err.code().name] += 1
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the simulator's bug, not the server's
                log.error("Recommend refused request %s: %s", req.request_id, err.details())
            return None
        self.stats.note_response((time.perf_counter() - t0) * 1000, resp)
        return resp

    def _request(
        self, day: int, world: World, p: Payment, number: int, history: list[_Tried], window_s: float
    ) -> optimizer_pb2.RecommendRequest:
        req = optimizer_pb2.RecommendRequest(request_id=self._id(day, p, number))
        req.attempt.CopyFrom(attempt_message(world, p, number))
        for r in world.eligible_routes(p):
            req.candidates.add(
                id=world.route_ids[r],
                cost_bps=int(world.route_cost_bps[r]),
                fixed_fee_minor=int(world.route_fixed[r]),
            )
        for tried in history:
            add_prior_attempt(req, world, tried.route, tried.outcome, tried.wall)
        if history:
            req.retry_window_s = max(1, int(history[0].wall + window_s - time.time()))
        return req

    async def _play(
        self,
        stub: _Stub,
        day: int,
        world: World,
        p: Payment,
        slot: _Slot,
        halt: asyncio.Event,
    ) -> None:
        st = self.stats
        tc = world.config.traffic
        window = tc.mit_patience_days * _DAY if p.recurring else float(tc.cit_patience_s)
        routes = world.eligible_routes(p)
        primary = world.merchant_primary[p.merchant]
        primary = primary if primary in routes else routes[0]
        st.payments_started += 1
        st.starts.append(time.monotonic())
        st.sim_time = max(st.sim_time, p.at)
        span = self._spans.setdefault(day, [p.at, p.at])
        span[0], span[1] = min(span[0], p.at), max(span[1], p.at)
        first_wall = time.time()
        belief = world.prior_belief(p)
        truth = world.p_approve(p, routes, p.at, belief)
        base = self._play_static(world, p, routes, primary, truth)

        resp = await self._recommend(stub, self._request(day, world, p, 1, [], window))
        route = primary if resp is None else world.route_index[resp.routes[0].route_id]
        # echoed with the first attempt's outcome, so that any replica can judge the route by it
        expected = None if resp is None else resp.routes[0].approval_probability
        if resp is None:
            st.sources[_CLIENT_DEFAULT] += 1
        # Both policies' results count once this payment is done: the same payments on both sides.
        a = Tally(payments=1, p_first=truth[routes.index(route)])
        history: list[_Tried] = []
        number = 1
        while True:
            wall = time.time()
            outcome = world.attempt(p, route, p.at + (wall - first_wall), world.draws(p, number), belief)
            history.append(_Tried(route, wall, outcome))
            st.outcomes_made += 1
            a.attempted(number, world.cost_minor(route, p.amount_minor), world.config.retry_fee_minor)
            await self._report(day, world, p, number, route, wall, outcome, expected if number == 1 else None)
            if outcome.status == APPROVED:
                a.approved_at(number, p.amount_minor)
                break
            if number >= tc.max_attempts:
                break
            resp = await self._recommend(stub, self._request(day, world, p, number + 1, history, window))
            if resp is None or not resp.HasField("retry"):
                break
            advice = resp.retry
            if advice.action == optimizer_pb2.RETRY_ACTION_RETRY_AT:
                at = advice.retry_at.ToNanoseconds() / 1e9
                if at - first_wall > window:  # the advice never does this; the platform would not wait
                    break
                wait = at - time.time()
                if at > self._end_wall or wait > self.settings.max_retry_wait_s or halt.is_set():
                    a.deferred += 1
                    break
                slot.release()  # a payment waiting for its retry time is not in progress
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), max(0.0, wait))
                if halt.is_set():
                    a.deferred += 1
                    break
                await slot.acquire()
            elif advice.action != optimizer_pb2.RETRY_ACTION_RETRY_NOW:
                break
            route = world.route_index[advice.route_id]
            number += 1
        st.payments_done += 1
        st.authopt.merge(a)
        st.static.merge(base)
        st.oracle_p_first += max(truth)

    def _play_static(
        self, world: World, p: Payment, routes: list[int], primary: int, truth: list[float]
    ) -> Tally:
        """The static baseline on the same payment: primary route, the ladder's retries."""
        t = Tally(payments=1, p_first=truth[routes.index(primary)])
        belief = Belief(p_persist_ok=world.prior_belief(p).p_persist_ok)
        tc = world.config.traffic
        for number in (1, 2):
            o = world.attempt(p, primary, p.at, world.draws(p, number), belief)
            self._counters.add(p, number, p.at)
            t.attempted(number, world.cost_minor(primary, p.amount_minor), world.config.retry_fee_minor)
            if o.status == APPROVED:
                t.approved_at(number, p.amount_minor)
                return t
            if number >= tc.max_attempts:
                return t
            if p.recurring:  # the ladder's first merchant-initiated retry is a day later
                t.deferred += 1
                return t
            if number == 1 and o.status != ERROR:
                network = NETWORK_NAME.get(int(world.card_network[p.card]), "other")
                c = rules.evaluate_retry(
                    network,
                    rules.Decline(o.response_code, o.mastercard_mac, 0, p.at),
                    self._counters.at(p, p.at),
                    p.at,
                )
                if not c.allowed or c.earliest_at > p.at:
                    return t
        return t

    # --- outcome reports ----------------------------------------------------------------------

    async def _report(
        self,
        day: int,
        world: World,
        p: Payment,
        number: int,
        route: int,
        wall: float,
        o: Outcome,
        expected: float | None,
    ) -> None:
        assert self._reports is not None
        if self._no_broker:
            self.stats.unreported += 1
            return
        msg = outcome_message(
            world,
            p,
            number,
            route,
            wall,
            o,
            event_id=self._id(day, p, number),
            request_id=self._id(day, p, number),
        )
        if expected is not None:
            msg.expected_approval = expected
        self.stats.report_backlog = self._reports.qsize()
        await self._reports.put(msg)  # waits (slows the traffic) when the server cannot keep up

    async def _report_loop(self, stub: _Stub) -> None:
        """Send queued outcomes in batches; a failed batch is retried (with backoff), never dropped."""
        assert self._reports is not None
        queue = self._reports
        batch: list[attempt_pb2.AttemptOutcome] = []
        backoff = 0.1
        while True:
            if not batch:
                batch.append(await queue.get())
                await asyncio.sleep(self.settings.report_interval_s)
                size = batch[0].ByteSize()
                while not queue.empty() and len(batch) < _REPORT_MAX and size < _REPORT_MAX_BYTES:
                    item = queue.get_nowait()
                    size += item.ByteSize() + 4
                    batch.append(item)
            self.stats.report_backlog = queue.qsize() + len(batch)
            try:
                resp = await stub.ReportOutcomes(
                    optimizer_pb2.ReportOutcomesRequest(outcomes=batch), timeout=10.0
                )
            except grpc.aio.AioRpcError as err:
                self.stats.report_errors[err.code().name] += 1
                info = error_info(err)
                if info is not None and info.reason == "BROKER_NOT_CONFIGURED":
                    # A server without Kafka will never take them: count them all, once, and say so.
                    log.warning("the server has no Kafka: outcomes are not reported (%s)", err.details())
                    self._no_broker = True
                    self.stats.unreported += len(batch) + queue.qsize()
                    while not queue.empty():
                        queue.get_nowait()
                    batch = []
                    continue
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:  # a bug in the simulator: say so loudly
                    log.error("ReportOutcomes refused a batch of %d: %s", len(batch), err.details())
                    self.stats.unreported += len(batch)
                    batch = []
                    continue
                # A server whose broker is behind says when to come back (RetryInfo): no sooner.
                await asyncio.sleep(max(backoff, retry_after_s(err) or 0.0))
                backoff = min(backoff * 2, 2.0)
                continue
            self.stats.reported += resp.accepted
            batch, backoff = [], 0.1

    async def _drain_reports(self, reporter: asyncio.Task[None], timeout_s: float = 15.0) -> None:
        """Wait (bounded) until every outcome made is reported; what is left is counted, not hidden."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not reporter.done():
            if self.stats.reported + self.stats.unreported >= self._outcomes_made():
                break
            await asyncio.sleep(0.05)
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        self.stats.unreported += max(0, self._outcomes_made() - self.stats.reported - self.stats.unreported)
        self.stats.report_backlog = 0

    def _outcomes_made(self) -> int:
        return self.stats.outcomes_made
