"""`authopt up`: the whole loop on one machine — broker, streams worker, server, simulated platform.

Starts, in order, the local Kafka-compatible broker (Tansu), one `authopt worker`, one
`authopt serve` with the bundled model, each its own process tied to this one (they get SIGTERM if
it dies), waits until the server reports SERVING (its feature replica has caught up), then plays a
simulated payment platform against it (`sim.platform`) while a dashboard shows what happens.
At the end of `duration_s`, or on SIGINT/SIGTERM, it stops in order: the traffic (in-flight payments
finish their step, every outcome is reported), then waits until the worker has taken every reported
outcome from the topic, then stops the server (it drains), the worker and the broker, and prints a
summary (also written as JSON). A second SIGINT skips the waiting. Logs of the three processes stay
in the work directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.errors import CliError
from sim.config import WorldConfig
from sim.platform import Platform
from sim.platform_settings import SimulateSettings
from sim.platform_stats import PlatformStats
from streams.broker import LocalBroker, LocalWorker, die_with_parent, free_port, start_broker, start_worker

__all__ = ["UpError", "UpOptions", "format_platform", "platform_line", "run_up"]

_SERVICE = "authopt.v1.AuthorizationOptimizerService"


class UpError(CliError, RuntimeError):
    """A component could not be started."""


@dataclass(frozen=True)
class UpOptions:
    world: WorldConfig
    world_ref: str
    seed: int = 1
    rate: float = 100.0
    duration_s: float | None = None
    dashboard: bool = True
    summary_json: Path | None = None
    workdir: Path | None = None
    port: int = 0  # the server's gRPC port; 0 picks a free one
    status_interval_s: float = 5.0  # plain mode: one line this often
    model_dir: Path | None = None
    ready_timeout_s: float = 90.0
    consume_timeout_s: float = 30.0


@dataclass
class Child:
    """A process `up` started: what the dashboard and the summary say about it."""

    name: str
    process: subprocess.Popen[bytes]
    address: str = ""
    log_path: Path | None = None
    stopped_by_us: bool = False
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "up"
        return "stopped" if self.stopped_by_us else f"EXITED ({code})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.process.pid,
            "address": self.address,
            "status": self.status(),
            "exit_code": self.process.poll(),
            "log": str(self.log_path) if self.log_path else None,
        }

    def log_tail(self, n: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]


@dataclass
class Stack:
    broker: LocalBroker | None = None
    worker: LocalWorker | None = None
    children: dict[str, Child] = field(default_factory=dict)
    worker_stats_path: Path | None = None

    def worker_counters(self) -> dict[str, Any]:
        path = self.worker_stats_path
        if path is None or not path.exists():
            return {}
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def failed(self) -> list[str]:
        return [
            f"{c.name} exited with {c.process.poll()}"
            for c in self.children.values()
            if c.status().startswith("EXITED")
        ]


def _start_server(bootstrap: str, port: int, log_path: Path, seed: int, model_dir: Path | None) -> Child:
    env = {
        **os.environ,
        "AUTHOPT_KAFKA_BOOTSTRAP": bootstrap,
        "AUTHOPT_SERVER_HOST": "127.0.0.1",
        "AUTHOPT_SERVER_SEED": str(seed),
    }
    cmd = [sys.executable, "-m", "cli.main", "serve", "--port", str(port)]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir)]
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    return Child("server", proc, f"127.0.0.1:{port}", log_path)


def _wait_serving(stack: Stack, target: str, timeout_s: float, say: Callable[[str], None]) -> None:
    """Until the server's health says SERVING (model loaded, features caught up), watching the others."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        last = ""
        while time.monotonic() < deadline:
            for child in stack.children.values():
                if not child.alive:
                    raise UpError(
                        f"{child.name} exited with {child.process.poll()} during start:\n{child.log_tail()}"
                    )
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=_SERVICE), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                state = err.code().name  # type: ignore[attr-defined]
            if state != last:
                say(f"waiting for the server on {target}: {state}")
                last = state
            time.sleep(0.2)
    raise UpError(
        f"the server on {target} was not SERVING within {timeout_s:g}s:\n"
        + stack.children["server"].log_tail()
    )


def start_stack(opts: UpOptions, workdir: Path, say: Callable[[str], None]) -> tuple[Stack, str]:
    """Broker, worker, server; returns the stack and the server's address once it is SERVING."""
    stack = Stack()
    try:
        broker = start_broker(tie_to_parent=True)
        stack.broker = broker
        stack.children["broker"] = Child("broker", broker.process, broker.bootstrap)
        say(f"broker  pid {broker.pid} on {broker.bootstrap}")
        stack.worker_stats_path = workdir / "worker-stats.json"
        worker = start_worker(
            broker.bootstrap,
            workdir / "worker.log",
            env={
                "AUTHOPT_WORKER_STATS_FILE": str(stack.worker_stats_path),
                "AUTHOPT_WORKER_STATS_INTERVAL_S": "0.5",
                "AUTHOPT_WORKER_DATA_DIR": str(workdir / "worker-data"),
            },
            tie_to_parent=True,
        )
        stack.worker = worker
        stack.children["worker"] = Child("worker", worker.process, "", worker.log_path)
        say(f"worker  pid {worker.pid}, log {worker.log_path}")
        port = opts.port or free_port()
        server = _start_server(broker.bootstrap, port, workdir / "server.log", opts.seed, opts.model_dir)
        stack.children["server"] = server
        say(f"server  pid {server.process.pid} on {server.address}, log {server.log_path}")
        _wait_serving(stack, server.address, opts.ready_timeout_s, say)
        return stack, server.address
    except BaseException:
        stop_stack(stack)
        raise


def stop_stack(stack: Stack, *, timeout_s: float = 15.0) -> None:
    """Server (it drains), then worker, then broker: SIGTERM, SIGKILL after `timeout_s`."""
    from streams.broker import stop_process

    for name in ("server", "worker", "broker"):
        child = stack.children.get(name)
        if child is None:
            continue
        child.stopped_by_us = child.alive or child.stopped_by_us
        if name == "broker" and stack.broker is not None:
            stack.broker.stop(timeout_s)
        else:
            stop_process(child.process, timeout_s)
        child.exit_code = child.process.returncode


async def _wait_consumed(stack: Stack, produced: int, timeout_s: float) -> int:
    """Until the worker has taken `produced` events from the topic (or the timeout); returns its count."""
    deadline = time.monotonic() + timeout_s
    events = 0
    while time.monotonic() < deadline:
        events = int(stack.worker_counters().get("events", 0))
        if events >= produced or not stack.children["worker"].alive:
            break
        await asyncio.sleep(0.25)
    return events


# --- presentation -------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def _ms(x: float | None) -> str:
    return "—" if x is None else (f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms")


def _world_clock(stats: PlatformStats) -> str:
    if not stats.sim_time:
        return "—"
    return datetime.fromtimestamp(stats.sim_time, UTC).strftime("%Y-%m-%d %H:%M")


def platform_line(stats: PlatformStats, elapsed: float) -> str:
    """One status line about the traffic (for logs)."""
    live = stats.live()
    decided = max(sum(stats.sources.values()), 1)
    a, s = stats.authopt, stats.static
    n = max(a.payments, 1)
    return (
        f"[{elapsed:5.0f}s] {live['payments_per_s']:.0f} payments/s, {live['requests_per_s']:.0f} req/s "
        f"p50 {_ms(live['latency_p50_ms'])} "
        f"p99 {_ms(live['latency_p99_ms'])} | model {_pct(stats.sources.get('MODEL', 0) / decided).strip()} "
        f"explored {_pct(stats.explored / decided).strip()} | feature age {_ms(live['feature_age_p50_ms'])} "
        f"| first-try approval authopt {_pct(a.first_approved / n).strip()} "
        f"static {_pct(s.first_approved / n).strip()} | {stats.reported:,} outcomes reported"
    )


def status_line(stats: PlatformStats, stack: Stack, elapsed: float) -> str:
    """One line for logs (--no-dashboard): the traffic, the worker, the processes."""
    worker = stack.worker_counters()
    return f"{platform_line(stats, elapsed)}, {int(worker.get('events', 0)):,} folded | " + " ".join(
        f"{c.name} {c.status()}" for c in stack.children.values()
    )


def incidents_line(platform: Platform) -> str:
    """The world's incidents at its clock now, in words."""
    now = platform.incidents_now()
    if not now:
        return "no incident in the world now"
    return "incidents now: " + ", ".join(
        f"{i.kind} {i.id} {'outage' if i.kind == 'issuer' else 'degraded'} ({100 * i.severity:.0f} %, "
        f"until {datetime.fromtimestamp(i.end, UTC):%H:%M})"
        for i in now
    )


def dashboard(platform: Platform, stack: Stack, opts: UpOptions, elapsed: float) -> Any:
    """The rich renderable of the live dashboard."""
    stats = platform.stats
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    live = stats.live()
    decided = max(sum(stats.sources.values()), 1)
    a, s = stats.authopt, stats.static
    n = max(a.payments, 1)
    of = f" of {opts.duration_s:g}s" if opts.duration_s else " (Ctrl-C stops)"
    speed = opts.rate * 3600 / opts.world.traffic.payments_per_hour
    head = (
        f"[b]authopt up[/b] · world [b]{opts.world_ref}[/b] seed {opts.seed} · "
        f"{opts.rate:g} payments/s · {elapsed:.0f}s{of} · world clock {_world_clock(stats)} "
        f"({speed:,.0f}x real time)"
    )
    traffic = Table.grid(padding=(0, 2))
    traffic.add_column(style="dim")
    traffic.add_column(justify="right")
    fallback = sum(v for k, v in stats.sources.items() if k != "MODEL") / decided
    for label, value in (
        ("payments/s", f"{live['payments_per_s']:,.0f} of {opts.rate:g}"),
        ("requests/s", f"{live['requests_per_s']:,.0f}"),
        ("latency p50", _ms(live["latency_p50_ms"])),
        ("latency p99", _ms(live["latency_p99_ms"])),
        ("from the model", _pct(stats.sources.get("MODEL", 0) / decided)),
        ("fallback", _pct(fallback)),
        ("exploration", _pct(stats.explored / decided)),
        ("feature age", _ms(live["feature_age_p50_ms"])),
        ("payments", f"{a.payments:,}"),
        ("errors", f"{sum(stats.request_errors.values()):,}"),
    ):
        traffic.add_row(label, value)
    results = Table(box=None, padding=(0, 2))
    results.add_column("same payments", style="dim")
    results.add_column("authopt", justify="right", style="bold green")
    results.add_column("static", justify="right")
    results.add_column("oracle", justify="right", style="dim")
    results.add_row("first-try approval", _pct(a.first_approved / n), _pct(s.first_approved / n), "")
    results.add_row(
        "expected (true P)", _pct(a.p_first / n), _pct(s.p_first / n), _pct(stats.oracle_p_first / n)
    )
    results.add_row("approved in the run", _pct(a.approved / n), _pct(s.approved / n), "")
    results.add_row("net revenue (minor)", f"{a.net_minor:,.0f}", f"{s.net_minor:,.0f}", "")
    results.add_row("retries", f"{a.retries:,}", f"{s.retries:,}", "")
    results.add_row("retries deferred", f"{a.deferred:,}", f"{s.deferred:,}", "")
    procs = Table(box=None, padding=(0, 2))
    for col in ("process", "pid", "status", "detail"):
        procs.add_column(col, style="dim" if col == "pid" else None)
    worker = stack.worker_counters()
    details = {
        "broker": stack.children["broker"].address,
        "worker": f"{int(worker.get('events', 0)):,} events folded, "
        f"{sum(worker.get('dead_lettered', {}).values()):,} dead-lettered",
        "server": f"{stack.children['server'].address}, {stats.reported:,} outcomes reported",
    }
    for c in stack.children.values():
        style = "green" if c.alive else "red"
        procs.add_row(c.name, str(c.process.pid), f"[{style}]{c.status()}[/{style}]", details.get(c.name, ""))
    from rich.columns import Columns

    incidents = incidents_line(platform)
    return Group(
        head,
        f"[yellow]{incidents}[/yellow]" if incidents.startswith("incidents") else f"[dim]{incidents}[/dim]",
        Columns(
            [Panel(traffic, title="traffic", expand=False), Panel(results, title="approval", expand=False)]
        ),
        Panel(procs, title="processes", expand=False),
    )


def _incidents_text(incidents: list[dict[str, Any]]) -> str:
    if not incidents:
        return "none"
    shown = [
        f"{i['kind']} {i['id']} {i['start'][11:16]}-{i['end'][11:16]} ({100 * i['severity']:.0f} %)"
        for i in incidents[:6]
    ]
    more = f" and {len(incidents) - 6} more" if len(incidents) > 6 else ""
    return ", ".join(shown) + more


def format_platform(doc: dict[str, Any]) -> str:
    """The traffic part of a summary, as text."""
    p, a, s = doc["platform"], doc["platform"]["authopt"], doc["platform"]["static"]
    return "\n".join(
        [
            f"{p['payments']:,} payments, {p['requests']:,} decisions in {p['elapsed_s']:.1f}s "
            f"({p['requests_per_s']:.0f}/s; latency p50 {_ms(p['latency_ms']['p50'])}, "
            f"p99 {_ms(p['latency_ms']['p99'])}); world {doc['world']} seed {doc['seed']}",
            f"  decisions: model {_pct(p['model_share']).strip()}, "
            f"fallback {_pct(p['fallback_share']).strip()}, explored {_pct(p['exploration_share']).strip()}; "
            f"errors {sum(p['request_errors'].values())}",
            f"  first-try approval: authopt {_pct(a['first_attempt_approval']).strip()}, "
            f"static {_pct(s['first_attempt_approval']).strip()} (expected: authopt "
            f"{_pct(a['expected_first_attempt_approval']).strip()}, static "
            f"{_pct(s['expected_first_attempt_approval']).strip()}, oracle "
            f"{_pct(p['oracle_expected_first_attempt_approval']).strip()})",
            f"  approved in the run: authopt {_pct(a['approval']).strip()} with {a['retries']:,} retries "
            f"({a['retries_deferred']:,} deferred past the end), static {_pct(s['approval']).strip()} "
            f"with {s['retries']:,}; net revenue (minor units, all currencies) authopt "
            f"{a['net_revenue_minor']:,.0f}, static {s['net_revenue_minor']:,.0f}",
            f"  world incidents played through: {_incidents_text(p.get('incidents', []))}",
            f"  feature age at the end: p50 {_ms(p['feature_age_ms']['p50'])}, "
            f"max {_ms(p['feature_age_ms']['max'])}; outcomes reported {p['outcomes_reported']:,}, "
            f"not reported {p['outcomes_unreported']:,}",
        ]
    )


def format_summary(doc: dict[str, Any]) -> str:
    """The final summary of `authopt up`, as text."""
    o = doc["outcomes"]
    lines = [
        "authopt up: " + format_platform(doc),
        f"  outcomes: {o['produced']:,} reported, {o['consumed']:,} taken by the worker, "
        f"{o['lost']:,} lost, {o['dead_lettered']:,} dead-lettered",
        "  processes: "
        + ", ".join(
            f"{k} pid {v['pid']} {v['status']} (exit {v['exit_code']})" for k, v in doc["processes"].items()
        ),
    ]
    if doc["problems"]:
        lines.append("  PROBLEMS: " + "; ".join(doc["problems"]))
    lines.append(f"  logs: {doc['workdir']}")
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------


async def _show(
    task: asyncio.Task[Any],
    platform: Platform,
    stack: Stack,
    opts: UpOptions,
    started: float,
    echo: Callable[[str], None],
) -> None:
    """The dashboard (4 frames/s), or a status line every `status_interval_s`, until `task` ends."""
    if opts.dashboard:
        from rich.live import Live

        with Live(dashboard(platform, stack, opts, 0), refresh_per_second=4) as view:
            while not task.done():
                await asyncio.wait([task], timeout=0.25)
                view.update(dashboard(platform, stack, opts, time.monotonic() - platform.stats.started))
        return
    next_line = started + opts.status_interval_s
    while not task.done():
        await asyncio.wait([task], timeout=max(0.0, next_line - time.monotonic()))
        if time.monotonic() >= next_line:
            echo(status_line(platform.stats, stack, time.monotonic() - platform.stats.started))
            if platform.incidents_now():
                echo("        " + incidents_line(platform))
            next_line += opts.status_interval_s


async def _session(
    opts: UpOptions, target: str, stack: Stack, echo: Callable[[str], None]
) -> tuple[Platform, int]:
    """Play with the dashboard (or status lines) until the duration or a signal, then wait until the
    worker has taken every reported outcome; returns the platform and the worker's event count."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    settings = SimulateSettings(  # type: ignore[call-arg]  # the rest from AUTHOPT_SIM_* or defaults
        target=target, world=opts.world_ref, seed=opts.seed, rate=opts.rate, duration_s=opts.duration_s
    )
    platform = Platform(settings, opts.world)
    started = time.monotonic()
    task = asyncio.create_task(platform.run(stop))

    async def watch() -> None:
        while not task.done():
            if stack.failed() and not stop.is_set():
                echo("a process exited: stopping (" + "; ".join(stack.failed()) + ")")
                stop.set()
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        await _show(task, platform, stack, opts, started, echo)
        await task
        produced = platform.stats.reported
        echo(f"traffic stopped; waiting for the worker to take all {produced:,} reported outcomes")
        waiting = asyncio.create_task(_wait_consumed(stack, produced, opts.consume_timeout_s))
        await asyncio.wait([waiting, asyncio.create_task(hurry.wait())], return_when=asyncio.FIRST_COMPLETED)
        consumed = waiting.result() if waiting.done() else int(stack.worker_counters().get("events", 0))
        waiting.cancel()
        return platform, consumed
    finally:
        watcher.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_up(opts: UpOptions, echo: Callable[[str], None]) -> tuple[int, dict[str, Any]]:
    """Start everything, play, stop everything; returns the exit code and the summary document."""
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="authopt-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    echo(f"authopt up: logs in {workdir}")
    stack, target = start_stack(opts, workdir, echo)
    problems: list[str] = []
    try:
        # SIGINT/SIGTERM from here on stop the traffic (a second one skips the waiting).
        platform, consumed = asyncio.run(_session(opts, target, stack, echo))
    finally:
        problems += stack.failed()
        echo("stopping server, worker, broker")
        stop_stack(stack)
    worker = stack.worker_counters()  # the final counters, written at the worker's exit
    consumed = max(consumed, int(worker.get("events", 0)))
    stats = platform.stats.summary()
    produced = int(stats.get("outcomes_reported", 0))
    dead = sum(worker.get("dead_lettered", {}).values())
    if consumed < produced:
        problems.append(f"{produced - consumed} reported outcomes were not taken by the worker")
    if stats.get("outcomes_unreported"):
        problems.append(f"{stats['outcomes_unreported']} outcomes could not be reported")
    leftover = [c.name for c in stack.children.values() if c.alive]
    if leftover:
        problems.append("still running: " + ", ".join(leftover))
    doc: dict[str, Any] = {
        "world": opts.world_ref,
        "seed": opts.seed,
        "rate": opts.rate,
        "duration_s": opts.duration_s,
        "platform": stats,
        "outcomes": {
            "produced": produced,
            "consumed": consumed,
            "lost": max(0, produced - consumed),
            "dead_lettered": dead,
            "worker": worker,
        },
        "processes": {name: c.as_dict() for name, c in stack.children.items()},
        "problems": problems,
        "workdir": str(workdir),
    }
    code = 1 if problems else 0
    doc["exit_code"] = code
    if opts.summary_json is not None:
        opts.summary_json.parent.mkdir(parents=True, exist_ok=True)
        opts.summary_json.write_text(json.dumps(doc, indent=2, sort_keys=True))
    echo(format_summary(doc))
    return code, doc
