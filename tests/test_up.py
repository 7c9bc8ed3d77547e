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
        [sys.executable, "-m", "cli.main", "up", "--no-dashboard", *args,
         "--summary-json", str(tmp_path / "summary.json"), "--workdir", str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _until_traffic(proc: subprocess.Popen[str], timeout_s: float = 150) -> list[str]:
    """`up`'s output lines until the first status line (the traffic is flowing)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "payments/s" in line:
            return lines
    raise AssertionError("no traffic: " + "".join(lines)[-3000:])


def _assert_nothing_left(doc: dict[str, Any]) -> None:
    for name in ("broker", "worker", "server"):
        proc = doc["processes"][name]
        assert proc["status"].startswith("stopped"), (name, proc)
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
    assert "worker up (ready)" in out  # the worker's health endpoint, in the status lines


@pytest.mark.timeout(240)
def test_a_sigkilled_up_takes_its_processes_with_it(tmp_path: Path) -> None:
    """The broker (prctl before exec) and the worker and server (which tie themselves to `up` from
    their own side, streams.broker.tie_to_parent) get SIGTERM when `up` dies without a word."""
    proc = _up(tmp_path, "--rate", "50")
    lines = _until_traffic(proc, timeout_s=120)
    pids = {
        name: int(next(x for x in lines if x.startswith(f"{name} ")).split("pid")[1].split()[0].rstrip(","))
        for name in ("broker", "worker", "server")
    }
    proc.kill()
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids.values()):
        time.sleep(0.2)
    assert {name: _gone(pid) for name, pid in pids.items()} == dict.fromkeys(pids, True)


@pytest.mark.timeout(180)
def test_ctrl_c_stops_everything_in_order(tmp_path: Path) -> None:
    proc = _up(tmp_path, "--rate", "50")
    lines = _until_traffic(proc, timeout_s=120)
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
            [sys.executable, "-m", "cli.main", "up", "--no-dashboard", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 if needle.startswith("--") else run.returncode != 0
        assert needle in run.stderr, run.stderr


def test_dashboard_renders_every_panel(tmp_path: Path) -> None:
    """The live view (the e2e tests run --no-dashboard): traffic, the comparison, the processes."""
    from rich.console import Console

    from cli.dashboard import dashboard, status_line
    from cli.up import Child, Stack, UpOptions
    from sim.config import load_world
    from sim.platform import Platform
    from sim.platform_settings import SimulateSettings
    from sim.platform_stats import Tally

    world = load_world("default")
    platform = Platform(SimulateSettings(target="unused:1", duration_s=None), world)  # type: ignore[call-arg]
    next(platform.payments())
    st = platform.stats
    st.sim_time = world.start.timestamp() + 14.2 * 3600  # during us-bank-a's outage
    st.authopt.merge(Tally(payments=100, first_approved=80, approved=90, p_first=79.0, approved_minor=1e6))
    st.static.merge(Tally(payments=100, first_approved=75, approved=85, p_first=75.0, approved_minor=9e5))
    st.oracle_p_first, st.sources["MODEL"], st.explored = 81.0, 98, 2
    st.sources["FALLBACK_FEATURES"] = 2
    (tmp_path / "worker-stats.json").write_text(json.dumps({"events": 123, "dead_lettered": {}}))
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        stack = Stack(worker_stats_path=tmp_path / "worker-stats.json")
        for name, proc in zip(("broker", "worker", "server"), procs, strict=True):
            stack.children[name] = Child(name, proc, "127.0.0.1:1" if name != "worker" else "")
        procs[1].kill()
        procs[1].wait()
        opts = UpOptions(world=world, world_ref="default", rate=200.0, duration_s=30.0)
        console = Console(record=True, width=160)
        console.print(dashboard(platform, stack, opts, 12.0))
        text = console.export_text()
        for needle in ("world default", "payments/s", "latency p99", "from the model", "feature age",
                       "first-try approval", "80.0 %", "75.0 %", "81.0 %", "net revenue",
                       "incidents now: issuer us-bank-a outage (85 %, until 14:35)",
                       "123 events folded", "EXITED (-9)", "up"):  # fmt: skip
            assert needle in text, (needle, text)
        line = status_line(st, stack, 12.0)
        assert "123 folded" in line and "worker EXITED (-9)" in line
        assert stack.failed() == ["worker exited with -9"]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.timeout(300)
def test_a_killed_worker_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    """SIGKILL the worker while the traffic runs: `up` restarts it, the traffic carries on, and the
    workers together took every reported outcome (their counters: an upper bound after a restart)."""
    proc = _up(tmp_path, "--duration", "30", "--rate", "100")
    lines = _until_traffic(proc)  # traffic is flowing: kill the worker
    worker_pid = int(next(line for line in lines if line.startswith("worker  pid")).split()[2].rstrip(","))
    os.kill(worker_pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    text = "".join(lines) + out
    assert proc.returncode == 0, text[-4000:]
    assert "worker exited with -9: restarting" in text and "worker restarted: pid" in text
    doc = json.loads((tmp_path / "summary.json").read_text())
    worker = doc["processes"]["worker"]
    assert worker["restarts"] == 1 and worker["earlier_exit_codes"] == [-9] and worker["pid"] != worker_pid
    o = doc["outcomes"]
    assert o["produced"] > 1000 and o["consumed"] >= o["produced"] and o["lost"] == 0, o
    assert doc["problems"] == [] and doc["platform"]["payments"] >= 2000
    _assert_nothing_left(doc)


@pytest.mark.timeout(300)
def test_up_with_a_shadow_model_and_an_export_while_it_runs(tmp_path: Path) -> None:
    """`up --shadow-model-dir`: the challenger decides in the shadow of the served model, and
    `authopt log export`, run against the live broker, takes both decisions out with the attempts."""
    from model import make_tiny_artifact

    shadow = tmp_path / "shadow"
    make_tiny_artifact(shadow, "challenger-1", seed=3)
    proc = _up(tmp_path, "--duration", "20", "--rate", "100", "--shadow-model-dir", str(shadow))
    lines = _until_traffic(proc)
    bootstrap = next(line for line in lines if line.startswith("broker  pid")).split(" on ")[1].strip()
    exported = subprocess.run(
        [sys.executable, "-m", "cli.main", "log", "export", "--brokers", bootstrap,
         "--out", str(tmp_path / "log"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, ("".join(lines) + out)[-4000:]
    assert exported.returncode == 0, exported.stderr
    from history.store import read_decisions, read_events

    decisions = list(read_decisions(tmp_path / "log"))
    assert len(decisions) > 100 and len(list(read_events(tmp_path / "log"))) > 100
    shadowed = [d for d in decisions if d.HasField("shadow")]
    assert shadowed and {d.shadow.model_version for d in shadowed} == {"challenger-1"}
    assert {d.response.model_version for d in shadowed} == {"default-s1000"}  # the served, bundled model


@pytest.mark.timeout(240)
def test_up_with_the_online_store(tmp_path: Path, redis_server: Any) -> None:
    """`up --store redis://…`: the worker writes the card rows to a real redis-server, the server
    reads them there, and the loop still decides from the model with nothing lost."""
    import redis

    from streams.online import _DEFAULT_PREFIX

    proc = _up(tmp_path, "--duration", "25", "--rate", "150", "--store", redis_server.url)
    out, _ = proc.communicate(timeout=220)
    assert proc.returncode == 0, out[-4000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    p, o = doc["platform"], doc["outcomes"]
    assert doc["problems"] == [] and p["payments"] >= 1500
    assert p["model_share"] > 0.5, p["decision_sources"]
    assert o["consumed"] == o["produced"] == p["outcomes_reported"] and o["lost"] == 0, o
    client = redis.Redis.from_url(redis_server.url)
    try:
        cards = sum(1 for _ in client.scan_iter(match=f"{_DEFAULT_PREFIX}cm:*", count=1000))
    finally:
        client.close()
    assert cards > 500, cards  # one row per card x merchant the worker folded
    _assert_nothing_left(doc)
