"""model.numerics: `authopt train` and `authopt evaluate` run torch on one CPU kernel set."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from model.numerics import PINNED_ENV

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2 = X86 and " avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False

_PROBE = (
    "import json, sys; from model.numerics import pin_numerics, numerics; "
    "ok = pin_numerics(); print(json.dumps({'ok': ok, **numerics()}))"
)


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


@pytest.mark.skipif(not AVX2, reason="an x86-64 CPU with AVX2")
def test_pinning_before_torch_loads_selects_the_avx2_kernels() -> None:
    got = _probe()
    assert got["ok"] is True and got["cpu_capability"] == "AVX2"
    assert got["aten_cpu_capability"] == "avx2" and got["mkl_cbwr"] == "AVX2"


@pytest.mark.skipif(not X86, reason="x86-64")
def test_a_kernel_set_chosen_in_the_environment_wins() -> None:
    got = _probe(ATEN_CPU_CAPABILITY="default")
    assert got["cpu_capability"] == "DEFAULT" and got["aten_cpu_capability"] == "default"


@pytest.mark.skipif(not X86, reason="x86-64")
def test_pinning_after_torch_loaded_says_it_came_too_late() -> None:
    clean = {k: v for k, v in os.environ.items() if k not in PINNED_ENV}
    code = "import torch; from model.numerics import pin_numerics; print(pin_numerics())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
