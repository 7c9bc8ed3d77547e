"""`authopt serve --processes N`: N server processes on one port, past one Python event loop.

Each process is a whole `authopt serve` (its own event loop, batcher, model copy and replica of the
small aggregates) bound with SO_REUSEPORT, so the kernel spreads new connections over them, as
grpc's multiprocessing example does. Per-card state is shared only through the online store
(`ONLINE_STORE`); without one, each process holds every card. Each process i gets the metrics and
health ports `base + i` (when the base is above 0) and the replica id `<id>-<i>`.

The parent supervises: SIGTERM/SIGINT go to every process (each drains as a single server does); a
process that dies is started again after a backoff that doubles up to 30 s, and the parent logs it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from server.settings import ServerSettings

__all__ = ["child_env", "run_processes"]

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0


def child_env(settings: ServerSettings, index: int, port: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of process `index`: the parent's settings, its own ports and replica id."""
    env = dict(base)

    def port_of(first: int) -> int:
        return first + index if first > 0 else first

    env.update(
        {
            "AUTHOPT_SERVER_HOST": settings.host,
            "AUTHOPT_SERVER_PORT": str(port),
            "AUTHOPT_SERVER_PROCESSES": "1",
            "AUTHOPT_SERVER_REUSE_PORT": "true",
            "AUTHOPT_SERVER_DEVICE": settings.device,
            "AUTHOPT_SERVER_METRICS_PORT": str(port_of(settings.metrics_port)),
            "AUTHOPT_SERVER_HEALTH_PORT": str(port_of(settings.health_port)),
            "AUTHOPT_SERVER_REPLICA_ID": f"{settings.replica_id}-{index}",
        }
    )
    if settings.model_dir is not None:
        env["AUTHOPT_SERVER_MODEL_DIR"] = str(settings.model_dir)
    return env


def _start(env: Mapping[str, str], no_model: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cli.main", "serve"] + (["--no-model"] if no_model else [])
    return subprocess.Popen(cmd, env=dict(env))


def run_processes(settings: ServerSettings, *, no_model: bool = False) -> int:
    """Run `settings.processes` servers on one port until SIGTERM/SIGINT; returns the exit status."""
    n = settings.processes
    port = settings.port
    if port == 0:
        from streams.broker import free_port

        port = free_port()
    if not settings.online_store:
        log.warning(
            "%d server processes without AUTHOPT_SERVER_ONLINE_STORE: each holds every card's state", n
        )
    envs = [child_env(settings, i, port, os.environ) for i in range(n)]
    procs = [_start(env, no_model) for env in envs]
    log.info(
        "authopt: %d server processes on %s:%d (pids %s)", n, settings.host, port, [p.pid for p in procs]
    )
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts = _Restarts(n)
    while not stopping:
        restarts.check(procs, envs, no_model)
        time.sleep(0.2)
    deadline = time.monotonic() + settings.grace_period_s + settings.drain_delay_s + 10
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return 0 if all(c == 0 for c in codes) else 1


class _Restarts:
    """Start a process that died again, after a backoff that doubles per death up to 30 s."""

    def __init__(self, n: int) -> None:
        self.backoff = [1.0] * n
        self.due: list[float | None] = [None] * n

    def check(self, procs: list[subprocess.Popen[bytes]], envs: list[dict[str, str]], no_model: bool) -> None:
        now = time.monotonic()
        for i, p in enumerate(procs):
            code = p.poll()
            due = self.due[i]
            if code is None:
                continue
            if due is None:
                log.error(
                    "server process %d (pid %d) exited with %s; restarting in %.0fs",
                    i,
                    p.pid,
                    code,
                    self.backoff[i],
                )
                self.due[i] = now + self.backoff[i]
                self.backoff[i] = min(self.backoff[i] * 2, _MAX_BACKOFF_S)
            elif now >= due:
                procs[i] = _start(envs[i], no_model)
                self.due[i] = None
                log.info("server process %d started again (pid %d)", i, procs[i].pid)
