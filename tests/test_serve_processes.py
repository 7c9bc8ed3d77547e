"""`authopt serve --processes N`: N processes on one port (SO_REUSEPORT), supervised by the parent."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.v1 import optimizer_pb2_grpc
from server.processes import child_env
from server.settings import ServerSettings
from streams.broker import free_port
from tests.conftest import make_request

pytestmark = pytest.mark.timeout(120)


def _decisions(metrics_port: int) -> float:
    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("authopt_decisions_total{")
    )


def _serving(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("not SERVING in time")


def test_each_process_gets_its_ports_and_replica_id() -> None:
    s = ServerSettings(port=7000, metrics_port=9400, health_port=-1, processes=3, replica_id="srv")
    env = child_env(s, 2, 7000, {"PATH": "/bin"})
    assert env["AUTHOPT_SERVER_PORT"] == "7000" and env["AUTHOPT_SERVER_REUSE_PORT"] == "true"
    assert env["AUTHOPT_SERVER_METRICS_PORT"] == "9402" and env["AUTHOPT_SERVER_HEALTH_PORT"] == "-1"
    assert env["AUTHOPT_SERVER_PROCESSES"] == "1" and env["AUTHOPT_SERVER_REPLICA_ID"] == "srv-2"


def test_two_processes_share_the_port_survive_a_kill_and_stop_together(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    while metrics + 1 == port:
        metrics = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        parent = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--processes", "2", "--no-model",
             "--port", str(port), "--metrics-port", str(metrics)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "AUTHOPT_SERVER_GRACE_PERIOD_S": "1"},
        )  # fmt: skip
    try:
        _serving(port, time.monotonic() + 60)
        time.sleep(1.0)  # both children bound (the first SERVING answer may come from one)
        for i in range(40):  # a new connection each: the kernel spreads them over the processes
            with grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as ch:
                optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(ch).Recommend(
                    make_request(f"p-{i}"), timeout=5
                )
        counts = [_decisions(metrics), _decisions(metrics + 1)]
        assert sum(counts) == 40 and min(counts) > 0, counts
        pids = [
            int(p) for p in re.findall(r"\d+", re.search(r"pids \[([\d, ]+)\]", log.read_text()).group(1))
        ]  # type: ignore[union-attr]
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "started again" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        while True:  # the new process 0 is up when its metrics port answers (it binds it last)
            try:
                assert _decisions(metrics) == 0  # a new process: counts from zero
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        _serving(port, time.monotonic() + 30)
        time.sleep(1.0)  # its signal handlers come just after it starts serving
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
