"""`authopt up`: the whole loop on one machine — broker, streams worker, server, simulated platform.

Starts, in order, the local Kafka-compatible broker (Tansu), one `authopt worker`, one
`authopt serve` with the bundled model, each its own process tied to this one (they get SIGTERM if
it dies), waits until the server reports SERVING (its feature replica has caught up), then plays a
simulated payment platform against it (`sim.platform`) while a dashboard (or, in logs, a status line
every few seconds) shows what happens.
At the end of `duration_s`, or on SIGINT/SIGTERM, it stops in order: the traffic (in-flight payments
finish their step, every outcome is reported), then waits until the worker has taken every reported
outcome from the topic, then stops the server (it drains), the worker and the broker, and prints a
summary (also written as JSON). A second SIGINT skips the waiting. Logs of the three processes stay
in the work directory. What is shown — the dashboard, the status lines, the summary text — is
`cli.dashboard`.

**Supervision**: a worker or server that dies while the traffic runs is restarted with backoff
(0.5 s, doubling, at most `MAX_RESTARTS` times each), as Compose's `restart: on-failure` or
Kubernetes would, and the traffic carries on: payments decided while the server is down count as
errors, outcomes wait in the platform's report queue until it is back; a restarted worker resumes
from the consumer group's committed offsets. The dashboard and the summary show each restart. The
broker keeps its data in memory only, so its death ends the run. What the workers took is the sum
of their counters; after a restart that is an upper bound (a killed worker's uncommitted events are
taken again by the next), so "lost" is then a lower bound.
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
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.dashboard import dashboard, format_summary, incidents_line, status_line
from cli.errors import CliError
from sim.config import WorldConfig
from sim.platform import Platform
from sim.platform_settings import SimulateSettings
from streams.broker import PARENT_ENV, LocalBroker, LocalWorker, free_port, start_broker, start_worker

__all__ = ["Child", "Stack", "UpError", "UpOptions", "run_up"]

_SERVICE = "authopt.v1.AuthorizationOptimizerService"
MAX_RESTARTS = 5
SUPERVISED = ("worker", "server")


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
    shadow_model_dir: Path | None = None  # a challenger scored in the shadow (server/shadow.py)
    online_store: str = ""  # redis:// URL: card state there instead of the server's memory
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
    earlier_exits: list[int] = field(default_factory=list)  # exit codes of the processes restarted

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def restarts(self) -> int:
        return len(self.earlier_exits)

    def status(self) -> str:
        code = self.process.poll()
        again = f", restarted {self.restarts}x" if self.restarts else ""
        if code is None:
            return "up" + again
        return ("stopped" if self.stopped_by_us else f"EXITED ({code})") + again

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.process.pid,
            "address": self.address,
            "status": self.status(),
            "exit_code": self.process.poll(),
            "restarts": self.restarts,
            "earlier_exit_codes": list(self.earlier_exits),
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
    starters: dict[str, Callable[[], Child]] = field(default_factory=dict)  # how to start each again
    earlier_worker_events: int = 0  # events taken by workers that died, by their last counters
    _health: tuple[float, str] = (0.0, "")  # the worker's last /readyz answer and when it was asked

    def worker_counters(self) -> dict[str, Any]:
        path = self.worker_stats_path
        if path is None or not path.exists():
            return {}
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def worker_health(self) -> str:
        """The worker's readiness from its health endpoint (streams/health.py), asked at most once a
        second: "ready", "not ready: <why>", or "" before it serves."""
        import urllib.error
        import urllib.request

        asked, answer = self._health
        now = time.monotonic()
        if now - asked < 1.0:
            return answer
        port = self.worker_counters().get("health_port")
        if not port:
            answer = ""
        else:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.2):
                    answer = "ready"
            except urllib.error.HTTPError as err:
                try:
                    answer = "not ready: " + str(json.loads(err.read()).get("detail", ""))
                except ValueError:
                    answer = "not ready"
            except OSError:
                answer = "health: no answer"
        self._health = (now, answer)
        return answer

    def events_folded(self) -> int:
        """Events the workers have taken from the topic, by their counters: the running worker's and,
        after a restart, the last counts of those before it (events a killed worker took but had
        not committed are taken again by the next and counted twice: an upper bound then)."""
        return self.earlier_worker_events + int(self.worker_counters().get("events", 0))

    def dead_lettered(self) -> int:
        """Events the worker dead-lettered, all reasons together, by its counters."""
        return sum(self.worker_counters().get("dead_lettered", {}).values())

    def failed(self) -> list[str]:
        return [
            f"{c.name} exited with {c.process.poll()}"
            for c in self.children.values()
            if c.status().startswith("EXITED")
        ]

    def restart(self, name: str) -> Child:
        """Start `name` again as it was started; the dead process's exit code is kept."""
        old = self.children[name]
        code = old.process.poll()
        if name == "worker":  # its counters file is the next worker's: keep what this one took
            self.earlier_worker_events += int(self.worker_counters().get("events", 0))
            if self.worker_stats_path is not None:
                self.worker_stats_path.unlink(missing_ok=True)
        new = self.starters[name]()
        new.earlier_exits = [*old.earlier_exits, -1 if code is None else code]
        self.children[name] = new
        return new


def _start_server(
    bootstrap: str,
    port: int,
    log_path: Path,
    seed: int,
    model_dir: Path | None,
    shadow_model_dir: Path | None = None,
    online_store: str = "",
) -> Child:
    env = {
        **os.environ,
        "AUTHOPT_KAFKA_BOOTSTRAP": bootstrap,
        "AUTHOPT_SERVER_HOST": "127.0.0.1",
        "AUTHOPT_SERVER_SEED": str(seed),
        PARENT_ENV: str(os.getpid()),  # the server ties itself to us (streams.broker.tie_to_parent)
    }
    if online_store:
        env["AUTHOPT_SERVER_ONLINE_STORE"] = online_store
    if shadow_model_dir is not None:
        env["AUTHOPT_SERVER_SHADOW_MODEL_DIR"] = str(shadow_model_dir)
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

        def worker_child() -> Child:
            worker = start_worker(
                broker.bootstrap,
                workdir / "worker.log",
                env={
                    "AUTHOPT_WORKER_STATS_FILE": str(stack.worker_stats_path),
                    "AUTHOPT_WORKER_STATS_INTERVAL_S": "0.5",
                    "AUTHOPT_WORKER_HEALTH_PORT": "0",  # a free port; the stats file names it
                    "AUTHOPT_WORKER_DATA_DIR": str(workdir / "worker-data"),
                    **({"AUTHOPT_WORKER_ONLINE_STORE": opts.online_store} if opts.online_store else {}),
                },
                tie_to_parent=True,
            )
            stack.worker = worker
            return Child("worker", worker.process, "", worker.log_path)

        stack.starters["worker"] = worker_child
        stack.children["worker"] = worker_child()
        say(f"worker  pid {stack.children['worker'].process.pid}, log {workdir / 'worker.log'}")
        port = opts.port or free_port()

        def server_child() -> Child:
            return _start_server(
                broker.bootstrap,
                port,
                workdir / "server.log",
                opts.seed,
                opts.model_dir,
                opts.shadow_model_dir,
                opts.online_store,
            )

        stack.starters["server"] = server_child
        server = server_child()
        stack.children["server"] = server
        say(f"server  pid {server.process.pid} on {server.address}, log {server.log_path}")
        _wait_serving(stack, server.address, opts.ready_timeout_s, say)
        return stack, server.address
    except BaseException:
        stop_stack(stack)
        raise


def stop_stack(
    stack: Stack, *, timeout_s: float = 15.0, names: tuple[str, ...] = ("server", "worker", "broker")
) -> None:
    """Server (it drains), then worker, then broker (those of `names`): SIGTERM, SIGKILL after `timeout_s`."""
    from streams.broker import stop_process

    for name in names:
        child = stack.children.get(name)
        if child is None:
            continue
        child.stopped_by_us = child.alive or child.stopped_by_us
        if name == "broker" and stack.broker is not None:
            stack.broker.stop(timeout_s)
        else:
            stop_process(child.process, timeout_s)
        child.exit_code = child.process.returncode


async def _supervise(stack: Stack, stop: asyncio.Event, echo: Callable[[str], None]) -> None:
    """Restart a dead worker or server (with backoff, at most MAX_RESTARTS each); a dead broker, or
    a process past its restarts, stops the run."""
    broker = stack.children.get("broker")
    if broker is not None and not broker.alive and not broker.stopped_by_us:
        echo(f"broker exited with {broker.process.poll()}: its in-memory data is gone; stopping")
        stop.set()
        return
    for name in SUPERVISED:
        child = stack.children.get(name)
        if child is None or child.alive or child.stopped_by_us or name not in stack.starters:
            continue
        code = child.process.poll()
        if child.restarts >= MAX_RESTARTS:
            echo(f"{name} exited with {code} after {child.restarts} restarts: stopping")
            stop.set()
            return
        delay = 0.5 * 2**child.restarts
        echo(f"{name} exited with {code}: restarting in {delay:g}s ({child.restarts + 1} of {MAX_RESTARTS})")
        await asyncio.sleep(delay)
        if stop.is_set():
            return
        new = stack.restart(name)
        echo(f"{name} restarted: pid {new.process.pid}")


async def _wait_consumed(stack: Stack, produced: int, timeout_s: float) -> int:
    """Until the workers have taken `produced` events from the topic (or the timeout); returns their count."""
    deadline = time.monotonic() + timeout_s
    events = 0
    while time.monotonic() < deadline:
        events = stack.events_folded()
        if events >= produced or not stack.children["worker"].alive:
            break
        await asyncio.sleep(0.25)
    return events


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
            if not stop.is_set():
                await _supervise(stack, stop, echo)
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        await _show(task, platform, stack, opts, started, echo)
        await task
        produced = platform.stats.reported
        echo(f"traffic stopped; waiting for the worker to take all {produced:,} reported outcomes")
        waiting = asyncio.create_task(_wait_consumed(stack, produced, opts.consume_timeout_s))
        await asyncio.wait([waiting, asyncio.create_task(hurry.wait())], return_when=asyncio.FIRST_COMPLETED)
        consumed = waiting.result() if waiting.done() else stack.events_folded()
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
    consumed = 0
    try:
        # SIGINT/SIGTERM from here on stop the traffic (a second one skips the waiting).
        platform, consumed = asyncio.run(_session(opts, target, stack, echo))
    finally:
        problems += stack.failed()
        echo("stopping server, worker, broker")
        stop_stack(stack)
    worker = stack.worker_counters()  # the final counters, written at the worker's exit
    consumed = max(consumed, stack.events_folded())
    stats = platform.stats.summary()
    produced = int(stats.get("outcomes_reported", 0))
    dead = stack.dead_lettered()
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
