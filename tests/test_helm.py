"""The Helm chart, rendered by a real Helm v4 engine (helm-python-sdk), its manifests validated
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), and
its promises checked on the rendered objects: probes and drain, security context, GPU toggle,
workers, NetworkPolicy, labels, settings that the server actually parses, and values the schema
refuses with a message that names the key.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from server.settings import ServerSettings
from streams.kafka import KafkaSettings
from streams.worker import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm" / "authopt"
CI_FILES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
VARIANTS: dict[str, dict[str, Any]] = {
    "chart-defaults": {  # the least an install names: the Secrets that TLS and tokens, on by default, need
        "server": {"tls": {"secretName": "authopt-tls"}, "auth": {"tokensSecret": {"name": "authopt-tokens"}}}
    },
    **{p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) or {} for p in CI_FILES},
}
RELEASE, NAMESPACE = "authopt", "payments"
CHART_META = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
APP_VERSION = CHART_META["appVersion"]
# The newest Kubernetes the validator ships schemas for, and the oldest the chart supports.
K8S_LATEST = kubernetes_validate.latest_version()
K8S_OLDEST = "1.30.0"
# Kinds from CRDs, which have no Kubernetes schema; checked by hand below.
CRD_KINDS = {"ServiceMonitor"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
SELECTOR_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


class Rendered:
    """A release's rendered objects, by kind and name."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = next((v for k, v in manifests.items() if k.endswith("NOTES.txt")), "")
        self.objects: list[dict[str, Any]] = [
            doc
            for path, text in sorted(manifests.items())
            if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str = RELEASE) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]

    def server(self) -> dict[str, Any]:
        return self.one("Deployment")

    def worker(self) -> dict[str, Any]:
        found = [o for o in self.workloads() if o["metadata"]["name"] == f"{RELEASE}-worker"]
        assert len(found) == 1
        return found[0]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


# What every install must name since TLS and bearer tokens are on by default: the two Secrets.
SECRETS: dict[str, Any] = {
    "server": {"tls": {"secretName": "authopt-tls"}, "auth": {"tokensSecret": {"name": "authopt-tokens"}}}
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def render(chart: helm.Chart, values: dict[str, Any], *, secrets: bool = True) -> Rendered:
    """The release with `values` over the chart's defaults (and, unless `secrets` is False, the two
    Secrets the defaults require named)."""
    values = merged(SECRETS, values) if secrets else values
    return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE))


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def pod_env(rendered: Rendered, workload: dict[str, Any], name: str) -> dict[str, str]:
    """The environment a container starts with: its ConfigMaps, then its literal env entries."""
    c = container(workload, name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(rendered.one("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def secret_refs(workload: dict[str, Any], name: str) -> dict[str, tuple[str, str]]:
    c = container(workload, name)
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def mounted_file(workload: dict[str, Any], name: str, path: str) -> tuple[str, str]:
    """The (Secret name, key) that the file `path` of container `name` comes from."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container(workload, name)["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "secret" in volumes[mount["name"]]:
            secret = volumes[mount["name"]]["secret"]
            for item in secret["items"]:
                if item["path"] == path.removeprefix(prefix):
                    return secret["secretName"], item["key"]
    raise AssertionError(f"{path} is not a mounted Secret file")


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_lints_clean(chart: helm.Chart, variant: str) -> None:
    values = VARIANTS[variant]
    chart.validate_schema(values)
    report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{K8S_LATEST}")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert render(chart, values).objects


@pytest.mark.parametrize("k8s", [K8S_LATEST, K8S_OLDEST])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_is_valid_kubernetes(chart: helm.Chart, variant: str, k8s: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        where = f"{variant}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{where} is not valid Kubernetes {k8s}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            pytest.fail(f"{where}: {err.message}")


def test_validator_is_strict() -> None:
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"bogus": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="bogus"):
        kubernetes_validate.validate(bad, K8S_LATEST, strict=True)


def test_chart_versions() -> None:
    meta = CHART_META
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["apiVersion"] == "v2"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    # The image tag defaults to appVersion: it is the version of the package the image installs.
    assert meta["appVersion"] == project["version"]
    assert meta["kubeVersion"] == f">={K8S_OLDEST}-0"


def test_ci_values_cover_the_variants() -> None:
    assert {"default", "gpu", "rocksdb-workers", "tls"} <= set(VARIANTS)


def test_schema_is_draft07_and_closed() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    free_maps = 0

    def walk(node: Any, where: str) -> None:
        nonlocal free_maps
        if isinstance(node, dict):
            if node.get("type") == "object" or ("properties" in node and "type" in node):
                extra = node.get("additionalProperties")
                # Closed, or a map of typed values (labels, resources), never an open object.
                assert extra is False or isinstance(extra, dict), f"{where} is open"
                free_maps += isinstance(extra, dict)
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(schema, "")
    assert free_maps >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_and_selectors(chart: helm.Chart, variant: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "authopt"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == APP_VERSION
        assert labels["app.kubernetes.io/part-of"] == "authopt"
        assert labels["helm.sh/chart"] == f"authopt-{CHART_META['version']}"
    selectors: list[dict[str, str]] = []
    for w in rendered.workloads():
        match = w["spec"]["selector"]["matchLabels"]
        template_labels = w["spec"]["template"]["metadata"]["labels"]
        assert match.items() <= template_labels.items()
        selectors.append(match)
        for spread in w["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            selectors.append(spread["labelSelector"]["matchLabels"])
    selectors += [s["spec"]["selector"] for s in rendered.all("Service")]
    selectors += [p["spec"]["selector"]["matchLabels"] for p in rendered.all("PodDisruptionBudget")]
    selectors += [n["spec"]["podSelector"]["matchLabels"] for n in rendered.all("NetworkPolicy")]
    selectors += [m["spec"]["selector"]["matchLabels"] for m in rendered.all("ServiceMonitor")]
    for selector in selectors:
        # Only the stable labels: a selector with the chart or app version breaks every upgrade.
        assert set(selector) == SELECTOR_LABELS


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_context(chart: helm.Chart, variant: str) -> None:
    rendered = render(chart, VARIANTS[variant])
    assert rendered.workloads()
    assert rendered.all("Secret") == [], "the chart only references Secrets, it never holds one"
    for w in rendered.workloads():
        spec = w["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False  # no link variables among the AUTHOPT_* settings
        tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            # A read-only root: /tmp is a private emptyDir.
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp for m in c["volumeMounts"])
    sa = rendered.one("ServiceAccount")
    assert sa["automountServiceAccountToken"] is False


def test_server_probes_and_drain(chart: helm.Chart) -> None:
    rendered = render(chart, {"server": {"tls": {"enabled": False}}})  # TLS probes: test_tls_* below
    server = rendered.server()
    spec = server["spec"]["template"]["spec"]
    c = container(server, "server")
    env = pod_env(rendered, server, "server")
    (grpc_port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
    assert int(env["AUTHOPT_SERVER_PORT"]) == grpc_port == 50051
    assert env["AUTHOPT_SERVER_HOST"] == "0.0.0.0"
    # The kubelet's native gRPC probe on grpc.health.v1: readiness on "" (the whole server, which
    # reports NOT_SERVING until caught up and while draining), startup and liveness on the name the
    # server keeps SERVING from warm-up to exit (a catch-up or a drain is no reason to restart).
    from server.app import LIVENESS_SERVICE

    assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": grpc_port, "service": LIVENESS_SERVICE}, probe
    startup = c["startupProbe"]
    # Model load + warm-up + the features replica's catch-up: minutes, not the liveness budget.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env["AUTHOPT_SERVER_GRACE_PERIOD_S"])
    assert sleep > 0 and grace == 10
    # The kubelet waits for the preStop sleep and the server's whole drain before SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > sleep + grace
    settings = ServerSettings.model_fields["grace_period_s"]
    assert settings.default == grace, "the chart's drain default follows the server's"


def test_service_headless_pdb(chart: helm.Chart) -> None:
    rendered = render(chart, {"server": {"tls": {"enabled": False}}})  # plaintext: h2c
    server = rendered.server()
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    main, headless = rendered.one("Service"), rendered.one("Service", f"{RELEASE}-headless")
    for svc in (main, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "kubernetes.io/h2c"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "metrics"}
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert server["spec"]["replicas"] == 2
    # Rollouts add a ready pod before removing one.
    assert server["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}
    assert rendered.all("HorizontalPodAutoscaler") == []
    assert rendered.all("NetworkPolicy") == [] and rendered.all("ServiceMonitor") == []
    spread = server["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def test_hpa_owns_the_replicas(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["gpu"])
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in rendered.server()["spec"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_parse_as_the_processes_read_them(
    chart: helm.Chart, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every AUTHOPT_* the chart sets is a real setting, and the settings classes accept them."""
    rendered = render(chart, VARIANTS[variant])
    known = {
        "AUTHOPT_SERVER_": set(ServerSettings.model_fields),
        "AUTHOPT_WORKER_": set(WorkerSettings.model_fields),
        "AUTHOPT_KAFKA_": set(KafkaSettings.model_fields),
    }
    workloads = [(rendered.server(), "server", ServerSettings)]
    if any(w["metadata"]["name"] == f"{RELEASE}-worker" for w in rendered.workloads()):
        workloads.append((rendered.worker(), "worker", WorkerSettings))
    for workload, name, settings_class in workloads:
        env = pod_env(rendered, workload, name)
        names = set(env) | set(secret_refs(workload, name))
        for key in (k for k in names if k.startswith("AUTHOPT_")):
            prefix = next(p for p in known if key.startswith(p))
            assert key.removeprefix(prefix).lower() in known[prefix], f"{key} is no setting"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            settings_class()  # type: ignore[call-arg]
            KafkaSettings()  # type: ignore[call-arg]


def test_schema_offers_every_setting() -> None:
    """server.settings / workers.settings cover every setting the chart does not set itself."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    props = schema["properties"]

    def snake(name: str) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

    server_managed = {
        "host", "port", "model_dir", "device", "grace_period_s", "metrics_port", "tls_cert_file",
        "tls_key_file", "tls_client_ca_file", "kafka", "replica_id", "health_port",
        "shadow_model_dir",  # model.shadow: a directory on the model volume
        "auth_tokens_file", "auth_protect_health",  # server.auth: a mounted Secret
        "seed",  # tests and simulations only
        "online_store", "online_store_password_file",  # onlineStore: the URL, a mounted Secret
        "reuse_port",  # set by `serve --processes` for its processes
    }  # fmt: skip
    worker_managed = {
        "partitions", "store", "data_dir",
        "local_broker", "local_broker_workers", "stats_file",  # the local broker and `authopt up` only
        "health_host", "health_port",  # workers.health
        "online_store", "online_store_password_file",  # onlineStore: the URL, a mounted Secret
    }  # fmt: skip
    offered = {snake(k) for k in props["server"]["properties"]["settings"]["properties"]}
    assert offered == set(ServerSettings.model_fields) - server_managed
    offered = {snake(k) for k in props["workers"]["properties"]["settings"]["properties"]}
    assert offered == set(WorkerSettings.model_fields) - worker_managed


def test_cpu_by_default_gpu_when_enabled(chart: helm.Chart) -> None:
    cpu = render(chart, VARIANTS["default"])
    c = container(cpu.server(), "server")
    assert "nvidia.com/gpu" not in json.dumps(cpu.objects)
    assert c["image"] == f"registry.example.com/payments/authopt:{APP_VERSION}"
    assert pod_env(cpu, cpu.server(), "server")["AUTHOPT_SERVER_DEVICE"] == "auto"

    gpu = render(chart, VARIANTS["gpu"])
    server = gpu.server()
    spec = server["spec"]["template"]["spec"]
    c = container(server, "server")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["memory"] == "8Gi"
    assert c["image"] == f"registry.example.com/payments/authopt:{APP_VERSION}-cuda"
    assert pod_env(gpu, server, "server")["AUTHOPT_SERVER_DEVICE"] == "cuda"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert server["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # The workers never need a GPU: the CPU image, no GPU resources.
    worker = container(gpu.worker(), "worker")
    assert worker["image"].endswith(f":{APP_VERSION}") and "nvidia.com/gpu" not in json.dumps(worker)


def test_model_delivery(chart: helm.Chart) -> None:
    bundled = render(chart, {})
    assert "AUTHOPT_SERVER_MODEL_DIR" not in pod_env(bundled, bundled.server(), "server")

    init = render(chart, VARIANTS["gpu"])
    server = init.server()
    spec = server["spec"]["template"]["spec"]
    assert pod_env(init, server, "server")["AUTHOPT_SERVER_MODEL_DIR"] == "/mnt/models"
    (model_init,) = spec["initContainers"]
    assert model_init["image"] == "registry.example.com/payments/authopt-models:default-s1000"
    volume = next(v for v in spec["volumes"] if v["name"] == "model")
    assert "emptyDir" in volume
    for c, read_only in ((model_init, None), (container(server, "server"), True)):
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
        assert mount["mountPath"] == "/mnt/models" and mount.get("readOnly") == read_only

    pvc = render(chart, VARIANTS["rocksdb-workers"])
    spec = pvc.server()["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "authopt-models", "readOnly": True}
    assert pod_env(pvc, pvc.server(), "server")["AUTHOPT_SERVER_MODEL_DIR"] == "/models"
    assert "AUTHOPT_SERVER_SHADOW_MODEL_DIR" not in pod_env(pvc, pvc.server(), "server")


def test_a_shadow_model_lives_on_the_model_volume(chart: helm.Chart) -> None:
    values = {**VARIANTS["rocksdb-workers"]}
    values["model"] = {**values["model"], "shadow": {"enabled": True}}
    values["server"] = {
        **values.get("server", {}),
        "settings": {"abChallengerShare": 0.1, "shadowTimeoutMs": 150},
    }
    rendered = render(chart, values)
    env = pod_env(rendered, rendered.server(), "server")
    assert env["AUTHOPT_SERVER_SHADOW_MODEL_DIR"] == "/models/.challenger"
    assert (
        env["AUTHOPT_SERVER_AB_CHALLENGER_SHARE"] == "0.1"
        and env["AUTHOPT_SERVER_SHADOW_TIMEOUT_MS"] == "150"
    )
    with pytest.raises(Exception, match=r"model\.shadow needs the model volume"):
        render(chart, {"model": {"shadow": {"enabled": True}}})


def test_workers_memory_store_is_a_deployment(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["default"])
    worker = rendered.worker()
    assert worker["kind"] == "Deployment" and worker["spec"]["replicas"] == 2
    env = pod_env(rendered, worker, "worker")
    assert env["AUTHOPT_WORKER_STORE"] == "memory://"
    assert int(env["AUTHOPT_WORKER_PARTITIONS"]) >= worker["spec"]["replicas"]
    assert container(worker, "worker")["args"][-1] == "worker"
    assert rendered.all("StatefulSet") == [] and rendered.all("PersistentVolumeClaim") == []
    # No workers unless asked for: they need Kafka.
    assert [w["metadata"]["name"] for w in render(chart, {}).workloads()] == [RELEASE]


def test_workers_are_probed_on_their_health_endpoint(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["default"])
    worker = rendered.worker()
    c = container(worker, "worker")
    env = pod_env(rendered, worker, "worker")
    assert env["AUTHOPT_WORKER_HEALTH_PORT"] == "8081" and env["AUTHOPT_WORKER_HEALTH_HOST"] == "0.0.0.0"
    assert c["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_workers_rocksdb_store_is_a_statefulset_with_volumes(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["rocksdb-workers"])
    worker = rendered.worker()
    assert worker["kind"] == "StatefulSet"
    assert worker["spec"]["replicas"] == 3
    env = pod_env(rendered, worker, "worker")
    assert env["AUTHOPT_WORKER_STORE"] == "rocksdb://"
    assert env["AUTHOPT_WORKER_PARTITIONS"] == "12"
    assert env["AUTHOPT_WORKER_REPLICATION_FACTOR"] == "3"
    (claim,) = worker["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    mount = next(
        m for m in container(worker, "worker")["volumeMounts"] if m["name"] == claim["metadata"]["name"]
    )
    assert mount["mountPath"] == env["AUTHOPT_WORKER_DATA_DIR"]
    governing = rendered.one("Service", worker["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    # SASL password and the brokers' CA from the referenced Secrets only.
    for workload, name in ((worker, "worker"), (rendered.server(), "server")):
        assert secret_refs(workload, name)["AUTHOPT_KAFKA_SASL_PASSWORD"] == ("authopt-kafka", "password")
        ca = pod_env(rendered, workload, name)["AUTHOPT_KAFKA_SSL_CAFILE"]
        assert mounted_file(workload, name, ca) == ("kafka-ca", "ca.crt")
    assert rendered.server()["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "@sha256:" + "0" * 64
    )


def test_tls_secrets_and_probes(chart: helm.Chart) -> None:
    rendered = render(chart, VARIANTS["tls"])
    server = rendered.server()
    c = container(server, "server")
    env = pod_env(rendered, server, "server")
    for setting, key in (("CERT_FILE", "tls.crt"), ("KEY_FILE", "tls.key"), ("CLIENT_CA_FILE", "ca.crt")):
        path = env[f"AUTHOPT_SERVER_TLS_{setting}"]
        assert mounted_file(server, "server", path) == ("authopt-server-tls", key)
    for key in ("AUTHOPT_KAFKA_SSL_CAFILE", "AUTHOPT_KAFKA_SSL_CERTFILE", "AUTHOPT_KAFKA_SSL_KEYFILE"):
        assert mounted_file(server, "server", env[key])[0] == "authopt-kafka-mtls"
    secrets = secret_refs(server, "server")
    assert secrets["AUTHOPT_SERVER_CACHE_URL"] == ("authopt-redis", "url")
    assert secrets["OTEL_EXPORTER_OTLP_HEADERS"] == ("authopt-otel", "headers")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    # The kubelet's gRPC probe speaks plaintext: the probes go to the server's plaintext
    # health-only port (AUTHOPT_SERVER_HEALTH_PORT), which tests/test_tls.py shows answering.
    health_port = int(env["AUTHOPT_SERVER_HEALTH_PORT"])
    assert {"name": "health", "containerPort": health_port, "protocol": "TCP"} in c["ports"]
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": ""}
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": health_port, "service": "liveness"}, probe
    # The health port is for the kubelet: no Service exposes it.
    assert all(p["name"] != "health" for svc in rendered.all("Service") for p in svc["spec"]["ports"])
    assert all("appProtocol" not in p for s in rendered.all("Service") for p in s["spec"].get("ports", []))
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_tcp_probe_mode(chart: helm.Chart) -> None:
    values = {"server": {"tls": {"enabled": True, "secretName": "tls", "probeMode": "tcp"}}}
    rendered = render(chart, values)
    c = container(rendered.server(), "server")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "grpc"} and "grpc" not in c[probe]
    assert "AUTHOPT_SERVER_HEALTH_PORT" not in pod_env(rendered, rendered.server(), "server")
    assert all(p["name"] != "health" for p in c["ports"])
    assert "probes are TCP checks" in rendered.notes


def test_grpc_tls_probe_mode(chart: helm.Chart) -> None:
    values = {"server": {"tls": {"enabled": True, "secretName": "tls", "probeMode": "grpc-tls"}}}
    rendered = render(chart, values)
    c = container(rendered.server(), "server")
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": "", "mode": "TLS"}
    assert c["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness", "mode": "TLS"}
    kubernetes_validate.validate(rendered.server(), K8S_LATEST, strict=True)


def test_network_policy(chart: helm.Chart) -> None:
    values = VARIANTS["tls"]
    np_values = values["networkPolicy"]
    rendered = render(chart, values)
    server_np = rendered.one("NetworkPolicy")
    assert server_np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
    assert server_np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    grpc_rule, metrics_rule = server_np["spec"]["ingress"]
    # Only the declared clients reach the gRPC port; only the declared scrapers the metrics port.
    assert grpc_rule == {"from": np_values["clients"], "ports": [{"port": "grpc", "protocol": "TCP"}]}
    assert metrics_rule == {
        "from": np_values["metricsScrapers"],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    egress = server_np["spec"]["egress"]
    ports = [(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]]
    assert ports == [(53, "UDP"), (53, "TCP"), (9093, "TCP"), (4317, "TCP"), (6379, "TCP")]
    kafka_rule, otel_rule = egress[1], egress[2]
    assert kafka_rule["to"] == np_values["kafka"]["peers"]
    assert otel_rule["to"] == np_values["otelCollector"]["peers"]
    worker_np = rendered.one("NetworkPolicy", f"{RELEASE}-worker")
    assert worker_np["spec"]["ingress"] == [] and worker_np["spec"]["egress"] == egress
    # Without Kafka or a collector configured, no egress is opened to them.
    bare = render(chart, {"networkPolicy": {"enabled": True, "clients": np_values["clients"]}})
    assert [p["port"] for rule in bare.one("NetworkPolicy")["spec"]["egress"] for p in rule["ports"]] == [
        53,
        53,
    ]


def test_notes(chart: helm.Chart) -> None:
    notes = render(chart, {}).notes
    assert f"{RELEASE}.{NAMESPACE}.svc:50051" in notes
    assert f"dns:///{RELEASE}-headless.{NAMESPACE}.svc:50051" in notes
    assert "kafka.bootstrap is empty" in notes and "NetworkPolicy is off" in notes
    notes = render(chart, VARIANTS["tls"]).notes
    assert "client certificates required" in notes and "probes are TCP checks" not in notes
    assert "NetworkPolicy is off" not in notes


BAD_VALUES = {
    "unknown key": ({"server": {"replica": 3}}, "at '/server': additional properties 'replica' not allowed"),
    "unknown setting": (
        {"server": {"settings": {"batchRows": 64}}},
        "at '/server/settings': additional properties 'batchRows' not allowed",
    ),
    "wrong type": ({"server": {"port": "grpc"}}, "at '/server/port': got string, want integer"),
    "out of range": (
        {"server": {"settings": {"explorationRate": 0.9}}},
        "at '/server/settings/explorationRate': maximum: got 0.9, want 0.5",
    ),
    "enum": (
        {"workers": {"store": "redis"}},
        "at '/workers/store': value must be one of 'memory', 'rocksdb'",
    ),
    "root user": (
        {"securityContext": {"runAsUser": 0}},
        "at '/securityContext/runAsUser': minimum: got 0, want 1",
    ),
    "no gpu": ({"gpu": {"enabled": True, "count": 0}}, "at '/gpu/count': minimum: got 0, want 1"),
    "workers without kafka": (
        {"workers": {"enabled": True}},
        "at '/kafka/bootstrap': minLength: got 0, want 1",
    ),
    "sasl without its secret": (
        {"kafka": {"bootstrap": "kafka:9092", "securityProtocol": "SASL_SSL"}},
        "at '/kafka/sasl/passwordSecret/name': minLength: got 0, want 1",
    ),
    "policy without clients": (
        {"networkPolicy": {"enabled": True}},
        "at '/networkPolicy/clients': minItems: got 0, want 1",
    ),
    "tls without its secret": (
        {"server": {"tls": {"enabled": True}}},
        "at '/server/tls/secretName': minLength: got 0, want 1",
    ),
    "grpc-tls probe with client certs": (
        {
            "server": {
                "tls": {"enabled": True, "secretName": "t", "clientAuth": True, "probeMode": "grpc-tls"}
            }
        },
        "at '/server/tls/probeMode': value must be one of 'health-port', 'tcp'",
    ),
    "bootstrap not host:port": ({"kafka": {"bootstrap": "kafka"}}, "at '/kafka/bootstrap'"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart: helm.Chart, case: str) -> None:
    values, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)
    # An install (render) refuses them too, naming the chart.
    with pytest.raises(helm.HelmValuesError, match="values don't meet the specifications") as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(err.value)


def test_bad_values_file_is_rejected(chart: helm.Chart, tmp_path: Path) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text("server:\n  replicas: two\n  resource:\n    limits: {memory: 1Gi}\n")
    values = helm.values_from_yaml(bad.read_text())
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "at '/server/replicas': got string, want integer" in str(err.value)
    assert "at '/server': additional properties 'resource' not allowed" in str(err.value)
    report = helm.lint(CHART_DIR, values, strict=True)
    assert any("additional properties 'resource' not allowed" in e for e in report["errors"]), report


def test_checks_the_schema_cannot_express(chart: helm.Chart) -> None:
    values = {
        "kafka": {"bootstrap": "kafka:9092"},
        "workers": {"enabled": True, "replicas": 5, "partitions": 4},
    }
    with pytest.raises(
        helm.HelmRenderError, match=r"workers.replicas \(5\) is more than workers.partitions \(4\)"
    ):
        render(chart, values)
    values = {"server": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    with pytest.raises(helm.HelmRenderError, match=r"minReplicas \(5\) is more than maxReplicas \(2\)"):
        render(chart, values)


def test_auth_tokens_come_from_a_mounted_secret_never_the_configmap(chart: helm.Chart) -> None:
    rendered = render(
        chart, {"server": {"auth": {"enabled": True, "tokensSecret": {"name": "authopt-tokens"}}}}
    )
    server = rendered.server()
    env = pod_env(rendered, server, "server")
    assert env["AUTHOPT_SERVER_AUTH_TOKENS_FILE"] == "/etc/authopt/auth/tokens"
    spec = server["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "auth")
    assert (
        volume["secret"]["secretName"] == "authopt-tokens"
        and volume["secret"]["items"][0]["path"] == "tokens"
    )
    mount = next(m for m in container(server, "server")["volumeMounts"] if m["name"] == "auth")
    assert mount == {"name": "auth", "mountPath": "/etc/authopt/auth", "readOnly": True}
    assert all("tok" not in str(v) or k.endswith("TOKENS_FILE") for k, v in env.items())
    plaintext_open = {"server": {"tls": {"enabled": False}, "auth": {"enabled": False}}}
    off = render(chart, plaintext_open, secrets=False)
    assert "AUTHOPT_SERVER_AUTH_TOKENS_FILE" not in pod_env(off, off.server(), "server")


def test_tls_and_tokens_are_on_unless_turned_off_and_an_install_must_name_their_secrets(
    chart: helm.Chart,
) -> None:
    """Safe defaults: the chart serves TLS and checks bearer tokens unless told not to, and an
    install that names neither Secret nor turns them off is refused, naming what to give."""
    with pytest.raises(helm.HelmValuesError, match=r"/server/tls/secretName"):
        render(chart, {}, secrets=False)
    with pytest.raises(helm.HelmRenderError, match=r"server\.auth\.enabled \(on by default\) needs"):
        render(chart, {"server": {"tls": {"enabled": False}}}, secrets=False)
    rendered = render(chart, {})  # the two Secrets named, nothing else
    env = pod_env(rendered, rendered.server(), "server")
    assert env["AUTHOPT_SERVER_TLS_CERT_FILE"] == "/etc/authopt/tls/tls.crt"
    assert env["AUTHOPT_SERVER_AUTH_TOKENS_FILE"] == "/etc/authopt/auth/tokens"
    assert "TLS" in rendered.notes
    plain = render(chart, {"server": {"tls": {"enabled": False}, "auth": {"enabled": False}}}, secrets=False)
    env = pod_env(plain, plain.server(), "server")
    assert "AUTHOPT_SERVER_TLS_CERT_FILE" not in env and "AUTHOPT_SERVER_AUTH_TOKENS_FILE" not in env


def test_online_store_url_and_password_file_reach_server_and_workers(chart: helm.Chart) -> None:
    values = {
        "kafka": {"bootstrap": "kafka:9092"},
        "workers": {"enabled": True},
        "onlineStore": {"url": "rediss://valkey:6380/0", "passwordSecret": {"name": "valkey-auth"}},
    }
    rendered = render(chart, values)
    for workload, name, prefix in (
        (rendered.server(), "server", "SERVER"),
        (rendered.worker(), "worker", "WORKER"),
    ):
        env = pod_env(rendered, workload, name)
        assert env[f"AUTHOPT_{prefix}_ONLINE_STORE"] == "rediss://valkey:6380/0", name
        assert env[f"AUTHOPT_{prefix}_ONLINE_STORE_PASSWORD_FILE"] == "/etc/authopt/online-store/password"
        spec = workload["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "online-store")
        assert volume["secret"]["secretName"] == "valkey-auth" and volume["secret"]["defaultMode"] == 0o440
        mount = next(m for m in container(workload, name)["volumeMounts"] if m["name"] == "online-store")
        assert mount["readOnly"] is True
    plain = render(chart, {"kafka": {"bootstrap": "kafka:9092"}})
    assert "AUTHOPT_SERVER_ONLINE_STORE" not in pod_env(plain, plain.server(), "server")
    with pytest.raises(Exception, match="onlineStore"):
        render(chart, {"onlineStore": {"url": "redis://:secret@valkey:6379/0"}})  # no password in the URL
