"""The chaos lab: real processes on 127.0.0.1 — the broker, streams workers, `authopt serve` servers —
the simulated platform's traffic against them, faults injected while it plays, and the ledger each
scenario is judged by (every payment answered; every outcome the servers accepted counted exactly once
in the features, read back from the features topic).

Short by default (CI); `AUTHOPT_CHAOS_LONG=1` (bench/chaos.py) multiplies durations and load.
A scenario's row is appended as JSON to `AUTHOPT_CHAOS_REPORT` when set: bench/chaos.py prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.v1 import optimizer_pb2
from sim.config import load_world
from sim.platform import Platform
from sim.platform_settings import SimulateSettings
from streams.broker import LocalBroker, LocalWorker, free_port, start_broker, start_worker, stop_process
from streams.contract import Entity
from streams.kafka import KafkaSettings
from streams.replica import FeatureReplica
from streams.store import InMemoryFeatureStore

# Read at import: the suite's autouse fixture clears AUTHOPT_* variables before each test.
LONG = os.environ.get("AUTHOPT_CHAOS_LONG") == "1"
REPORT = os.environ.get("AUTHOPT_CHAOS_REPORT")
SCALE = 5.0 if LONG else 1.0
SERVICE = "authopt.v1.AuthorizationOptimizerService"


def scaled(seconds: float) -> float:
    return seconds * SCALE


@dataclass
class ServerProc:
    """One `authopt serve` process."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    health_port: int  # the plaintext health-only listener, up for the whole drain (as probes see it)
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_mib(self) -> float:
        return rss_mib(self.process.pid)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Timeline:
    """Every answer's (monotonic time, latency ms, decision source), for p99 by phase."""

    points: list[tuple[float, float, str, float]] = field(default_factory=list)  # + the server's own ms
    marks: dict[str, float] = field(default_factory=dict)
    # (monotonic time, ms) the platform's own event loop was late to wake a 50 ms sleep: a pause
    # of the process that plays the traffic, which its calls' latencies include
    lags: list[tuple[float, float]] = field(default_factory=list)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def between(self, start: str | None, end: str | None) -> list[tuple[float, float, str, float]]:
        lo = self.marks[start] if start else -1.0
        hi = self.marks[end] if end else float("inf")
        return [p for p in self.points if lo <= p[0] < hi]

    def p99(self, start: str | None, end: str | None) -> float | None:
        lat = sorted(p[1] for p in self.between(start, end))
        return round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None

    def phases(self) -> list[float | None]:
        """p99 before the fault, while it lasted, and after it ("fault" and "recovered" marks)."""
        return [self.p99("start", "fault"), self.p99("fault", "recovered"), self.p99("recovered", "end")]

    def sources(self, start: str | None, end: str | None) -> Counter[str]:
        return Counter(p[2] for p in self.between(start, end))


class Lab:
    """Processes started for one scenario, all stopped at the end (workers before the broker)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker: LocalBroker | None = None
        self.workers: list[LocalWorker] = []
        self.servers: list[ServerProc] = []

    # --- processes ------------------------------------------------------------------------------

    def start_broker(self, port: int | None = None) -> LocalBroker:
        self.broker = start_broker(port)
        return self.broker

    @property
    def bootstrap(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap

    def start_worker(self, **env: str) -> LocalWorker:
        n = len(self.workers)
        w = start_worker(
            self.bootstrap,
            self.workdir / f"worker{n}.log",
            env={
                "AUTHOPT_WORKER_HEALTH_PORT": "0",
                "AUTHOPT_WORKER_STATS_INTERVAL_S": "1",
                "AUTHOPT_WORKER_DATA_DIR": str(self.workdir / f"worker-data{n}"),
                **env,
            },
        )
        self.workers.append(w)
        return w

    def start_server(self, **env: str) -> ServerProc:
        port, metrics, health = free_port(), free_port(), free_port()
        log_path = self.workdir / f"server{len(self.servers)}.log"
        full_env = {
            **os.environ,
            "AUTHOPT_KAFKA_BOOTSTRAP": self.bootstrap,
            "AUTHOPT_SERVER_HOST": "127.0.0.1",
            "AUTHOPT_SERVER_METRICS_PORT": str(metrics),
            "AUTHOPT_SERVER_HEALTH_PORT": str(health),
            "AUTHOPT_SERVER_SEED": str(len(self.servers)),
            **env,
        }
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        srv = ServerProc(proc, port, metrics, health, log_path)
        self.servers.append(srv)
        return srv

    def close(self) -> None:
        for s in self.servers:
            stop_process(s.process, 10)
        for w in self.workers:
            w.stop(10)
        if self.broker is not None:
            self.broker.stop()

    # --- waiting --------------------------------------------------------------------------------

    async def serving(self, srv: ServerProc, timeout_s: float = 60.0) -> None:
        """Until the server's health says SERVING (model loaded, features caught up)."""
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if srv.process.poll() is not None:
                    raise AssertionError(f"server exited {srv.process.returncode}:\n{srv.log_text()[-3000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise AssertionError(f"server not SERVING in {timeout_s:g}s:\n{srv.log_text()[-3000:]}")

    # --- traffic --------------------------------------------------------------------------------

    async def play(
        self,
        targets: list[ServerProc],
        *,
        rate: float,
        duration_s: float,
        faults: Callable[[Timeline], Coroutine[Any, Any, None]] | None = None,
        timeout_s: float = 1.0,
        seed: int = 1,
    ) -> tuple[dict[str, Any], Timeline]:
        """The simulated platform's traffic for `duration_s` over a round-robin channel to `targets`
        (a call refused with UNAVAILABLE is retried on the next server, as a platform's client
        would), with `faults(timeline)` running beside it; returns its summary and the timeline."""
        settings = SimulateSettings(rate=rate, duration_s=duration_s, seed=seed, timeout_s=timeout_s)
        platform = Platform(settings, load_world(settings.world))
        timeline = Timeline()
        note = platform.stats.note_response

        def noted(latency_ms: float, resp: Any) -> None:
            note(latency_ms, resp)
            now = time.monotonic()
            source = optimizer_pb2.DecisionSource.Name(resp.decision_source)
            timeline.points.append((now, latency_ms, source, resp.server_time_us / 1000))

        platform.stats.note_response = noted  # type: ignore[method-assign]
        config = {
            "loadBalancingConfig": [{"round_robin": {}}],
            # grpc's client-side health checking: a draining server (NOT_SERVING) gets no new calls.
            "healthCheckConfig": {"serviceName": SERVICE},
            "methodConfig": [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.01s",
                        "maxBackoff": "0.1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
        target = "ipv4:" + ",".join(s.target for s in targets)
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
        ) as channel:
            timeline.mark("start")
            fault_task = asyncio.create_task(faults(timeline)) if faults else None
            lag_task = asyncio.create_task(_loop_lag(timeline.lags))
            try:
                stats = await platform.run(asyncio.Event(), channel=channel)
            finally:
                lag_task.cancel()
            timeline.mark("end")
            if fault_task is not None:
                await fault_task
        return stats.summary(), timeline


async def _loop_lag(lags: list[tuple[float, float]], period_s: float = 0.05) -> None:
    while True:
        asked = time.monotonic()
        await asyncio.sleep(period_s)
        now = time.monotonic()
        lags.append((now, 1000 * (now - asked - period_s)))


async def features_folded(bootstrap: str, expected: int, timeout_s: float = 60.0) -> int:
    """Attempts counted in the features (the routes' event counts, every source partition merged),
    read back from the features topic; waits until they reach `expected` or settle."""
    replica = FeatureReplica(KafkaSettings.for_bootstrap(bootstrap), InMemoryFeatureStore())
    replica.start()
    try:
        deadline = time.monotonic() + timeout_s
        last, steady = -1, 0.0
        while time.monotonic() < deadline:
            keys = [k for (e, k) in replica.store.rows() if e is Entity.ROUTE]
            n = sum(replica.materializer.events_for(Entity.ROUTE, k) for k in keys)
            if n >= expected:
                return n
            if n != last:
                last, steady = n, time.monotonic()
            elif time.monotonic() - steady > 15:
                return n  # nothing new for 15 s: what is there is all there is
            await asyncio.sleep(0.5)
        return last
    finally:
        await replica.stop()


def kill(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)


def report(row: dict[str, Any]) -> None:
    """Append the scenario's row to AUTHOPT_CHAOS_REPORT (bench/chaos.py's table), when set."""
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def lab(workdir: Path) -> Iterator[Lab]:
    the_lab = Lab(workdir)
    try:
        yield the_lab
    finally:
        the_lab.close()


COUNTS = ("authopt_decisions_total{", "authopt_shed_total{", "authopt_late_answers_total ")


def server_counts(srv: ServerProc, *prefixes: str) -> dict[str, float]:
    """The server's Prometheus samples starting with `prefixes` (by default its decisions by source,
    shed and late answers)."""
    import urllib.request

    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(prefixes or COUNTS):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def decided(counts: dict[str, float]) -> float:
    return sum(v for k, v in counts.items() if k.startswith("authopt_decisions_total{"))


def h2load_body(seed: int = 1) -> bytes:
    """One of the simulated platform's Recommend requests, gRPC-framed, for h2load (`-d`)."""
    import struct

    settings = SimulateSettings(seed=seed, duration_s=1)
    platform = Platform(settings, load_world(settings.world))
    day, world, payment = next(platform.payments())
    req = platform._request(day, world, payment, 0, [], 0.0)  # the platform's own request, as it sends it
    msg = req.SerializeToString()
    return struct.pack(">BI", 0, len(msg)) + msg


def h2load(
    srv: ServerProc, body: Path, *, duration_s: float, connections: int, streams: int, rps: float | None
) -> subprocess.Popen[str]:
    """h2load against the server: `connections` x `streams` in flight, each connection sending at most
    `rps` requests a second (open loop) when given; 50 ms gRPC deadlines."""
    cmd = [
        "h2load",
        f"-c{connections}",
        "-t1",
        f"-m{streams}",
        f"-D{duration_s:g}",
        f"-d{body}",
        "-Hcontent-type: application/grpc",
        "-Hte: trailers",
        "-Hgrpc-timeout: 50m",
    ]
    if rps is not None:
        cmd.append(f"--rps={rps:g}")
    cmd.append(f"http://{srv.target}/authopt.v1.AuthorizationOptimizerService/Recommend")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _answered_windows(
    tl: Timeline, start: float, end: float, width_s: float
) -> Iterator[tuple[float, list[tuple[float, float, str, float]]]]:
    """Each `width_s` window between `start` and `end` (monotonic) that has answers: (its start, them)."""
    t = start
    while t + width_s <= end:
        points = [p for p in tl.points if t <= p[0] < t + width_s]
        if points:
            yield t, points
        t += width_s


def window_p99s(
    tl: Timeline, start: float, end: float, width_s: float = 5.0, *, server: bool = False
) -> list[float]:
    """The p99 latency of each `width_s` window of answers between `start` and `end` (monotonic): as
    the platform waited for them, or (`server`) as the server reports its own time."""
    column = 3 if server else 1
    out = []
    for _, points in _answered_windows(tl, start, end, width_s):
        lat = sorted(p[column] for p in points)
        out.append(lat[min(len(lat) - 1, int(0.99 * len(lat)))])
    return out


def window_lags(tl: Timeline, start: float, end: float, width_s: float = 5.0) -> list[float]:
    """The platform's longest event-loop lag (ms) in each `width_s` window that has answers, the
    same windows as `window_p99s`."""
    return [
        max((lag for at, lag in tl.lags if t <= at < t + width_s), default=0.0)
        for t, _ in _answered_windows(tl, start, end, width_s)
    ]
