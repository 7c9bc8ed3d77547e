"""Run a built authopt image as the Helm chart runs it, without a container runtime, and check it.

    python scripts/smoke_image.py localhost/authopt:0.1.0 [--timeout 180]

What the chart would give the pods is rendered from `helm/authopt` (workers on, Kafka at a local
broker): each container's environment (its ConfigMaps and literal env), arguments, user and group,
read-only root filesystem and `emptyDir` mounts. Each container then runs from the image's root
filesystem (`buildah mount`) in a mount namespace of its own: the root bound read-only, a tmpfs at
every `emptyDir` mount path (owned by the pod's fsGroup), /proc and /dev, `chroot` as the chart's
uid/gid, `env -i` with exactly that environment. Only the ports move (this runs on the host's network,
where the chart's fixed ports may be taken). The checks, from outside the containers:

1. the server's health is SERVING and the worker's /readyz answers 200;
2. the chart's defaults — TLS and bearer tokens — with Secrets made here (a self-signed certificate,
   one caller's token) mounted where the pod has them: a call without the token is refused;
3. a Recommend before any outcome falls back (no route features); 240 reported outcomes
   (ReportOutcomes) then go server → Kafka → worker → features → server, and a Recommend is
   answered by the bundled model (decision source MODEL, a model version);
4. the image's size and layer count.

Needs root, buildah, unshare (util-linux) and the project's venv (for the chart renderer, the
client and the local broker): `scripts/setup` first. `scripts/build-images` builds and calls this.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import helm_python as helm
import yaml  # type: ignore[import-untyped]
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.samples import sample_attempt, sample_request
from authopt.v1 import attempt_pb2, optimizer_pb2, optimizer_pb2_grpc
from streams.broker import free_port, start_broker

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "authopt"
ROUTES = (("acq-a", 180, 10), ("acq-b", 150, 25), ("acq-c", 250, 0))


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def render(image: str, bootstrap: str) -> list[dict[str, Any]]:
    """The chart with its defaults (TLS and bearer tokens on: the two Secrets named), the image,
    Kafka, the workers on and the routes."""
    repository, _, tag = image.rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag},
        "kafka": {"bootstrap": bootstrap},
        "workers": {"enabled": True},
        "server": {
            "tls": {"secretName": "authopt-tls"},
            "auth": {"tokensSecret": {"name": "authopt-tokens"}},
            "settings": {"routes": [{"id": r, "cost_bps": b, "fixed_fee_minor": f} for r, b, f in ROUTES]},
        },
    }
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="authopt", namespace="payments")
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def pod(objects: list[dict[str, Any]], name: str, container: str) -> dict[str, Any]:
    """What the chart gives one container: env, args, uid/gid/fsGroup, read-only root, emptyDirs."""
    (workload,) = [
        o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == name
    ]
    spec = workload["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == container]
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    empty = {name for name, v in volumes.items() if "emptyDir" in v}
    secrets = {  # mount path -> (Secret name, {key: file name})
        m["mountPath"]: (
            volumes[m["name"]]["secret"]["secretName"],
            {i["key"]: i["path"] for i in volumes[m["name"]]["secret"].get("items", [])},
        )
        for m in c.get("volumeMounts", [])
        if "secret" in volumes.get(m["name"], {})
    }
    ctx = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
    return {
        "env": env,
        "args": c.get("args", []),
        "uid": int(ctx["runAsUser"]),
        "gid": int(ctx.get("runAsGroup", ctx["runAsUser"])),
        "fs_group": int(
            spec.get("securityContext", {}).get("fsGroup", ctx.get("runAsGroup", ctx["runAsUser"]))
        ),
        "read_only": bool(ctx.get("readOnlyRootFilesystem")),
        "non_root": bool(ctx.get("runAsNonRoot")),
        "tmpfs": [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in empty],
        "secrets": secrets,
    }


def launch(
    rootfs: Path, spec: dict[str, Any], env: dict[str, str], log: Path, secrets: dict[str, Path]
) -> subprocess.Popen[bytes]:
    """The container: a private mount namespace over the image's root, as `spec` says; `secrets`
    holds each Secret's files, by Secret name (a folder, mounted read-only where the pod has it)."""
    root = shlex.quote(str(rootfs))
    lines = ["set -e", f"mount --bind {root} {root}"]
    for path in [*spec["tmpfs"], *spec["secrets"]]:  # Kubernetes makes the mount points
        lines.append(f"mkdir -p {root}{shlex.quote(path)}")
    if spec["read_only"]:
        lines.append(f"mount -o remount,bind,ro {root}")
    for path, (name, _) in spec["secrets"].items():
        lines.append(f"mount --bind -o ro {shlex.quote(str(secrets[name]))} {root}{shlex.quote(path)}")
    for path in spec["tmpfs"]:
        lines.append(
            f"mount -t tmpfs -o size=256m,mode=2775,gid={spec['fs_group']} tmpfs {root}{shlex.quote(path)}"
        )
    lines += [f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev"]
    command = [
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in sorted(env.items())),
        "/opt/authopt/bin/authopt",
    ]
    command += spec["args"]
    lines.append(
        f"exec chroot --userspec={spec['uid']}:{spec['gid']} --groups={spec['fs_group']} {root} "
        + " ".join(shlex.quote(a) for a in command)
    )
    out = log.open("wb")
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(lines)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def make_secrets(where: Path, mounts: dict[str, Any], fs_group: int) -> tuple[dict[str, Path], str]:
    """The Secrets the pod mounts, made here as an operator would (a self-signed certificate for
    localhost, a tokens file with one caller): a folder each, files named as the pod sees them,
    readable by the pod's group only (the chart's defaultMode 0440). Returns them and the token."""
    import secrets as random

    token = random.token_urlsafe(24)
    made: dict[str, Path] = {}
    for name, files in mounts.values():
        folder = where / name
        folder.mkdir(parents=True, exist_ok=True)
        made[name] = folder
        names = set(files.values())
        if "tls.crt" in names:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                 "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt")],
                check=True, capture_output=True,
            )  # fmt: skip
        if "tokens" in names:
            (folder / "tokens").write_text(f"smoke {token}\n")
        for f in folder.iterdir():
            os.chown(f, 0, fs_group)
            f.chmod(0o440)
        os.chown(folder, 0, fs_group)
        folder.chmod(0o750)
    return made, token


def wait_for(what: str, check: Any, timeout_s: float, procs: dict[str, subprocess.Popen[bytes]]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        for name, p in procs.items():
            if p.poll() is not None:
                raise SystemExit(f"{name} exited with {p.returncode} while waiting for {what}")
        try:
            if check():
                return time.monotonic() - started
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def outcomes(n: int) -> list[attempt_pb2.AttemptOutcome]:
    """`n` reported first attempts over the routes, recent, most approved."""
    out, now = [], time.time()
    for i in range(n):
        route = ROUTES[i % len(ROUTES)][0]
        approved = i % 5 != 0
        at = timestamp_pb2.Timestamp()
        at.FromNanoseconds(int((now - 120 + i * 0.4) * 1e9))
        attempt = sample_attempt()
        attempt.card.fingerprint = f"fp-smoke-{i % 40}"
        out.append(
            attempt_pb2.AttemptOutcome(
                event_id=f"smoke-{i}",
                request_id=f"smoke-req-{i}",
                attempt=attempt,
                route_id=route,
                status=attempt_pb2.OUTCOME_STATUS_APPROVED
                if approved
                else attempt_pb2.OUTCOME_STATUS_DECLINED,
                response_code="" if approved else "51",
                latency_ms=180,
                attempted_at=at,
            )
        )
    return out


def connect(
    server: dict[str, Any], secrets: dict[str, Path], token: str, port: int, health_port: int
) -> tuple[grpc.Channel, grpc.Channel, tuple[tuple[str, str], ...]]:
    """The API channel (TLS when the pod serves it, vouched for by the certificate made here), the
    health channel (the plaintext health port under TLS) and the call metadata (the bearer token
    when the pod checks tokens)."""
    env = server["env"]
    if "AUTHOPT_SERVER_TLS_CERT_FILE" in env:
        ca = (secrets["authopt-tls"] / "tls.crt").read_bytes()
        channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=ca))
        health = grpc.insecure_channel(f"127.0.0.1:{health_port}")
    else:
        channel = health = grpc.insecure_channel(f"127.0.0.1:{port}")
    auth = (("authorization", f"Bearer {token}"),) if "AUTHOPT_SERVER_AUTH_TOKENS_FILE" in env else ()
    tls = "TLS" if channel is not health else "plaintext"
    print(f"API: {tls}, {'a bearer token' if auth else 'no token'}")
    return channel, health, auth


def exercise(
    channel: grpc.Channel, auth: tuple[tuple[str, str], ...], procs: dict[str, Any], timeout_s: float
) -> optimizer_pb2.RecommendResponse:
    """Check 2 and 3 of the module's list; the model's answer."""
    api = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
    if auth:
        try:
            api.Recommend(sample_request("smoke-no-token", ROUTES), timeout=5)
        except grpc.RpcError as err:
            print(f"Recommend without a token: {err.code().name}")  # type: ignore[attr-defined]
        else:
            raise SystemExit("a call without a bearer token was answered")
    before = api.Recommend(sample_request("smoke-before", ROUTES), timeout=5, metadata=auth)
    print(f"Recommend before any outcome: {optimizer_pb2.DecisionSource.Name(before.decision_source)} "
          "(no route features yet)")  # fmt: skip
    if before.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL:
        raise SystemExit("the model decided before any route feature existed: the check below proves nothing")
    api.ReportOutcomes(optimizer_pb2.ReportOutcomesRequest(outcomes=outcomes(240)), timeout=10, metadata=auth)
    answer: dict[str, Any] = {}

    def decided_by_the_model() -> bool:
        resp = api.Recommend(sample_request(f"smoke-{time.monotonic_ns()}", ROUTES), timeout=5, metadata=auth)
        answer["resp"] = resp
        return bool(resp.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL)

    took = wait_for("a decision from the model (features through the worker)", decided_by_the_model,
                    timeout_s, procs)  # fmt: skip
    print(f"Recommend answered by the model {took:.1f} s after 240 outcomes were reported:")
    resp: optimizer_pb2.RecommendResponse = answer["resp"]
    routes = [
        {"route_id": r.route_id, "approval_probability": round(r.approval_probability, 3)}
        for r in resp.routes
    ]
    print(json.dumps({"decision_source": optimizer_pb2.DecisionSource.Name(resp.decision_source),
                      "model_version": resp.model_version, "routes": routes,
                      "server_time_us": resp.server_time_us}, indent=2))  # fmt: skip
    return resp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for each wait")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/authopt-smoke"), help="container logs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (mount namespaces, chroot, buildah's storage)")
    args.logs.mkdir(parents=True, exist_ok=True)
    container = _run("buildah", "from", "--pull-never", args.image)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    broker = start_broker(tie_to_parent=True)
    try:
        rootfs = Path(_run("buildah", "mount", container))
        objects = render(args.image, broker.bootstrap)
        server, worker = pod(objects, "authopt", "server"), pod(objects, "authopt-worker", "worker")
        for name, spec in (("server", server), ("worker", worker)):
            print(
                f"{name}: uid {spec['uid']} gid {spec['gid']}, read-only root {spec['read_only']}, "
                f"non-root {spec['non_root']}, emptyDirs {spec['tmpfs']}, args {spec['args']}"
            )
        secrets, token = make_secrets(args.logs / "secrets", server["secrets"], server["fs_group"])
        print(f"server Secrets (made here): {sorted(secrets)} at {sorted(server['secrets'])}")
        port, metrics, worker_health, health_port = free_port(), free_port(), free_port(), free_port()
        moved = {  # this host's network instead of the pod's: free ports
            "AUTHOPT_SERVER_PORT": str(port),
            "AUTHOPT_SERVER_METRICS_PORT": str(metrics),
            "AUTHOPT_WORKER_HEALTH_PORT": str(worker_health),
        }
        if "AUTHOPT_SERVER_HEALTH_PORT" in server["env"]:  # TLS: the kubelet's plaintext health port
            moved["AUTHOPT_SERVER_HEALTH_PORT"] = str(health_port)
        t0 = time.monotonic()
        for name, spec in (("worker", worker), ("server", server)):
            procs[name] = launch(rootfs, spec, {**spec["env"], **moved}, args.logs / f"{name}.log", secrets)
        channel, health_channel, auth = connect(server, secrets, token, port, health_port)
        health = health_pb2_grpc.HealthStub(health_channel)
        serving = health_pb2.HealthCheckResponse.SERVING

        def server_up() -> bool:
            return bool(health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving)

        def worker_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{worker_health}/readyz", timeout=2) as r:
                return bool(r.status == 200)

        up = wait_for("the server's health SERVING", server_up, args.timeout, procs)
        print(f"server SERVING {time.monotonic() - t0:.1f} s after start ({up:.1f} s of waiting)")
        wait_for("the worker's /readyz", worker_ready, args.timeout, procs)
        print(f"worker ready {time.monotonic() - t0:.1f} s after start")
        exercise(channel, auth, procs, args.timeout)
        size = _run("buildah", "images", "--format", "{{.Size}}", args.image)
        layers = _run(
            "buildah", "inspect", "--type", "image", "--format", "{{len .OCIv1.RootFS.DiffIDs}}", args.image
        )
        print(f"image {args.image}: {size}, {layers} layers")
        print("smoke test passed")
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for name, p in procs.items():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                print(f"{name} did not stop in 15 s: killed", file=sys.stderr)
        broker.stop()
        subprocess.run(["buildah", "umount", container], capture_output=True)
        subprocess.run(["buildah", "rm", container], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
