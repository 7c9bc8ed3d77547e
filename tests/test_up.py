"""`authopt up` end to end: real broker, worker and server processes, real traffic, then nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too (its parent has not reaped it yet); anything else is still running.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z")


def _up(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "authopt.cli", "up", "--no-dashboard", *args,
         "--summary-json", str(tmp_path / "summary.json"), "--workdir", str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _assert_nothing_left(doc: dict[str, Any]) -> None:
    for name in ("broker", "worker", "server"):
        proc = doc["processes"][name]
        assert proc["status"] == "stopped", (name, proc)
        assert _gone(proc["pid"]), f"{name} (pid {proc['pid']}) is still running"


@pytest.mark.timeout(240)
def test_up_runs_the_whole_loop_and_authopt_beats_static(tmp_path: Path) -> None:
    proc = _up(tmp_path, "--duration", "30", "--rate", "200")
    out, _ = proc.communicate(timeout=220)
    assert proc.returncode == 0, out[-4000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    p = doc["platform"]
    assert doc["problems"] == [] and doc["exit_code"] == 0
    # It ran for real: thousands of decisions over gRPC.
    assert p["payments"] >= 2000 and p["requests"] >= p["payments"], p
    # Most decisions came from the model (the first ones, before any feature exists, cannot).
    assert p["model_share"] > 0.5, p["decision_sources"]
    # The feature feed kept up: at the end the route features were under 2 s old.
    assert p["feature_age_ms"]["p50"] is not None and p["feature_age_ms"]["p50"] < 2000, p["feature_age_ms"]
    # authopt approved more than static routing on the same payments (same draws).
    assert p["authopt"]["payments"] == p["static"]["payments"] == p["payments"]
    assert p["authopt"]["first_attempt_approval"] > p["static"]["first_attempt_approval"], (
        p["authopt"], p["static"],
    )  # fmt: skip
    # Every reported outcome reached the worker: produced = consumed, none lost.
    o = doc["outcomes"]
    assert o["produced"] > p["payments"] and o["produced"] == p["outcomes_reported"]
    assert o["consumed"] == o["produced"] and o["lost"] == 0, o
    assert p["outcomes_unreported"] == 0 and o["dead_lettered"] == 0
    _assert_nothing_left(doc)
    assert "authopt up:" in out and "0 lost" in out  # the printed summary


@pytest.mark.timeout(180)
def test_ctrl_c_stops_everything_in_order(tmp_path: Path) -> None:
    proc = _up(tmp_path, "--rate", "50")
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the traffic is flowing (the first status line)
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "payments/s" in line:
            break
    assert any("payments/s" in line for line in lines), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, ("".join(lines) + out)[-4000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["duration_s"] is None and doc["platform"]["payments"] > 0
    assert doc["outcomes"]["lost"] == 0
    _assert_nothing_left(doc)
    order = [out.index(s) for s in ("traffic stopped", "stopping server, worker, broker", "authopt up:")]
    assert order == sorted(order)


def test_up_refuses_bad_options(tmp_path: Path) -> None:
    for args, needle in (
        (["--rate", "0"], "--rate"),
        (["--duration", "-5"], "--duration"),
        (["--world", str(tmp_path / "nope.toml")], "nope.toml"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "authopt.cli", "up", "--no-dashboard", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 if needle.startswith("--") else run.returncode != 0
        assert needle in run.stderr, run.stderr
