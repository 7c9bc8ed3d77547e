"""The one export code path: a trained module → ``<model_dir>/<version>/{model.pt, manifest.json}``.

The artifact is TorchScript (scripted, eval, frozen) plus a JSON manifest that names the feature
contract hash and the input layout the model was trained on; the server refuses an artifact whose
contract or layout differs from its own. A version directory appears atomically (written under a
dot-prefixed temporary name, then renamed), so a watcher never sees a half-written version, and an
existing version is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.layout import DELAY_BUCKETS_S, INPUT_LAYOUT, LAYOUT_VERSION
from model.net import ApprovalNet, EnsembleNet, FusedEnsembleNet
from streams.contract import CONTRACT_HASH

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "Manifest",
    "export_model",
    "make_tiny_artifact",
    "quiet_torchscript_deprecation",
    "tiny_model",
]

MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_TS_DEPRECATION = r"`torch\.jit\.(script|freeze|save|load)` is deprecated"


def quiet_torchscript_deprecation() -> None:
    """Silence exactly torch's "`torch.jit.<fn>` is deprecated" notices (and nothing else).

    TorchScript is this project's chosen artifact format (manifest ``format``; torch is pinned below
    2.14). The filter is installed in place rather than with ``warnings.catch_warnings`` because the
    server loads models in a worker thread, and ``catch_warnings`` swaps the process-wide filter list
    non-atomically (not thread-safe before Python 3.14). Installing it is idempotent.
    """
    warnings.filterwarnings("ignore", message=_TS_DEPRECATION, category=DeprecationWarning)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _framework() -> str:
    return f"torch {torch.__version__}"


@dataclass(frozen=True)
class Manifest:
    """What an artifact is: version, the contract and layout it was trained under, metrics, data."""

    version: str
    contract_hash: str
    layout_version: str
    input_layout: list[str]
    delay_buckets_s: list[int]
    created_at: str
    metrics: dict[str, float] = field(default_factory=dict)
    data_summary: dict[str, object] = field(default_factory=dict)
    route_selection: dict[str, float] = field(default_factory=dict)
    """`server.policy.SelectionCorrection` of the route column (``sim/selection.py``); {}: none."""
    route_selection_issuer: dict[str, float] = field(default_factory=dict)
    """Per issuer (the streams' ISSUER key, ``country|bin6``), a logit offset added after the
    selection correction to every candidate of that issuer's cards (``server/selection.py``); an
    issuer not named gets none. {}: none."""
    format: str = "torchscript"
    framework: str = field(default_factory=_framework)

    @property
    def n_outputs(self) -> int:
        """Output width of the model: 1 route column + one per delay bucket."""
        return 1 + len(self.delay_buckets_s)

    def to_json(self) -> str:
        """Stable, human-readable JSON (sorted keys)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest; raises `ValueError` naming the offending field.

        Unknown keys are ignored so that an older reader accepts a newer writer's additions.
        """
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"manifest must be a JSON object, got {type(doc).__name__}")
        return cls(
            version=_str(doc, "version", nonempty=True),
            contract_hash=_str(doc, "contract_hash", nonempty=True),
            layout_version=_str(doc, "layout_version", nonempty=True),
            input_layout=_str_list(doc, "input_layout"),
            delay_buckets_s=_int_list(doc, "delay_buckets_s"),
            created_at=_timestamp(doc, "created_at"),
            metrics=_metrics(doc.get("metrics", {})),
            data_summary=_object(doc.get("data_summary", {}), "data_summary"),
            route_selection=_selection(doc.get("route_selection", {})),
            route_selection_issuer=_issuer_offsets(doc.get("route_selection_issuer", {})),
            format=_str(doc, "format", nonempty=True) if "format" in doc else "torchscript",
            framework=_str(doc, "framework") if "framework" in doc else "",
        )


def _required(doc: Mapping[str, Any], key: str) -> Any:
    if key not in doc:
        raise ValueError(f"manifest field {key!r} is missing")
    return doc[key]


def _str(doc: Mapping[str, Any], key: str, *, nonempty: bool = False) -> str:
    value = _required(doc, key)
    if not isinstance(value, str) or (nonempty and not value):
        kind = "a non-empty string" if nonempty else "a string"
        raise ValueError(f"manifest field {key!r} must be {kind}, got {value!r}")
    return value


def _str_list(doc: Mapping[str, Any], key: str) -> list[str]:
    value = _required(doc, key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"manifest field {key!r} must be a non-empty list of non-empty strings")
    return list(value)


def _int_list(doc: Mapping[str, Any], key: str) -> list[int]:
    value = _required(doc, key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"manifest field {key!r} must be a list of integers, got {value!r}")
    return list(value)


def _timestamp(doc: Mapping[str, Any], key: str) -> str:
    value = _str(doc, key, nonempty=True)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"manifest field {key!r} must be an ISO 8601 timestamp, got {value!r}") from exc
    if parsed.utcoffset() is None:
        raise ValueError(f"manifest field {key!r} must carry a UTC offset, got {value!r}")
    return value


def _metrics(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("manifest field 'metrics' must be an object of numbers")
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"manifest metric {k!r} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out


_SELECTION_KEYS = ("intercept", "mean_scale", "spread_scale")


def _selection(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("manifest field 'route_selection' must be an object of numbers")
    if not value:
        return {}
    if sorted(value) != sorted(_SELECTION_KEYS):
        raise ValueError(
            f"manifest field 'route_selection' must have exactly the keys {list(_SELECTION_KEYS)}, "
            f"got {sorted(value)}"
        )
    out: dict[str, float] = {}
    for k in _SELECTION_KEYS:
        v = value[k]
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"manifest route_selection.{k} must be a finite number, got {v!r}")
        out[k] = float(v)
    for k in ("mean_scale", "spread_scale"):
        if out[k] <= 0:  # a non-positive scale would reverse or erase the model's ranking
            raise ValueError(f"manifest route_selection.{k} must be positive, got {out[k]!r}")
    return out


MAX_ISSUER_OFFSETS = 100_000
"""The most issuer offsets a manifest may carry (the fit keeps at most `server.selection.MAX_ISSUERS`)."""


def _issuer_offsets(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("manifest field 'route_selection_issuer' must be an object of numbers")
    if len(value) > MAX_ISSUER_OFFSETS:
        raise ValueError(
            f"manifest field 'route_selection_issuer' has {len(value)} entries, at most {MAX_ISSUER_OFFSETS}"
        )
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"manifest route_selection_issuer keys must be non-empty strings, got {k!r}")
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or abs(v) > 10:
            raise ValueError(
                f"manifest route_selection_issuer[{k!r}] must be a finite number within ±10, got {v!r}"
            )
        out[k] = float(v)
    return out


def _object(value: object, key: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"manifest field {key!r} must be an object")
    return dict(value)


def _check_version(version: str) -> None:
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"bad model version {version!r}: use letters, digits, '.', '_', '+', '-' "
            "(not starting with '.' or '-', at most 128 characters)"
        )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    """Script, eval and freeze `module` without changing the caller's module's train/eval mode."""
    was_training = module.training
    module.eval()
    try:
        quiet_torchscript_deprecation()
        # An ensemble is served fused: the same outputs up to float rounding, half the operator calls.
        served = (
            FusedEnsembleNet(module)
            if isinstance(module, EnsembleNet) and FusedEnsembleNet.can_fuse(module)
            else module
        )
        scripted = torch.jit.script(served)
        frozen: torch.jit.ScriptModule = torch.jit.freeze(scripted.eval())
    finally:
        module.train(was_training)
    return frozen


def export_model(
    module: nn.Module,
    model_dir: Path,
    version: str,
    *,
    contract_hash: str = CONTRACT_HASH,
    input_layout: Sequence[str] = INPUT_LAYOUT,
    delay_buckets_s: Sequence[int] = DELAY_BUCKETS_S,
    layout_version: str = LAYOUT_VERSION,
    metrics: Mapping[str, float] | None = None,
    data_summary: Mapping[str, object] | None = None,
    route_selection: Mapping[str, float] | None = None,
    route_selection_issuer: Mapping[str, float] | None = None,
) -> Path:
    """Export `module` as ``model_dir/<version>/`` (``model.pt`` + ``manifest.json``); returns that path.

    The module is checked first: a float32 ``[2, len(input_layout)]`` batch must give a float32
    ``[2, 1 + len(delay_buckets_s)]`` output of finite probabilities, else `ValueError`.
    Raises `FileExistsError` if the version already exists.
    """
    _check_version(version)
    model_dir = Path(model_dir)
    final = model_dir / version
    if final.exists():
        raise FileExistsError(f"model version {version!r} already exists at {final}")
    manifest = Manifest(
        version=version,
        contract_hash=contract_hash,
        layout_version=layout_version,
        input_layout=list(input_layout),
        delay_buckets_s=[int(b) for b in delay_buckets_s],
        created_at=_now_iso(),
        metrics={str(k): float(v) for k, v in (metrics or {}).items()},
        data_summary=dict(data_summary or {}),
        route_selection=_selection(dict(route_selection or {})),
        route_selection_issuer=_issuer_offsets(dict(route_selection_issuer or {})),
    )
    manifest_text = manifest.to_json()  # fail on NaN metrics before touching the disk
    scripted = _script(module)
    _smoke_test(scripted, len(manifest.input_layout), manifest.n_outputs)

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{version}.tmp-{os.getpid()}"
    if tmp.exists():  # left over by a crashed export of an earlier process with our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        torch.jit.save(scripted, str(tmp / MODEL_FILE))
        (tmp / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8")
        for name in (MODEL_FILE, MANIFEST_FILE):
            _fsync_file(tmp / name)
        if final.exists():
            raise FileExistsError(f"model version {version!r} already exists at {final}")
        # rename(2) of a directory onto an existing non-empty directory fails, so a concurrent
        # exporter of the same version cannot be clobbered either.
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise FileExistsError(f"model version {version!r} already exists at {final}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _smoke_test(scripted: torch.jit.ScriptModule, n_inputs: int, n_outputs: int) -> None:
    with torch.inference_mode():
        out = scripted(torch.zeros(2, n_inputs, dtype=torch.float32))
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != (2, n_outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"module output for [2, {n_inputs}] must be float32 [2, {n_outputs}] "
            f"(1 + len(delay_buckets_s)), got {shape}"
        )
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()) or bool((out > 1).any()):
        raise ValueError("module output must be finite probabilities in [0, 1]")


def tiny_model(seed: int = 0, *, n_inputs: int | None = None, n_buckets: int | None = None) -> ApprovalNet:
    """A deterministic small `ApprovalNet` (hidden 16) for tests and fixtures.

    Weights and the (non-trivial) normalization depend only on `seed`; the global RNG is untouched.
    """
    d = len(INPUT_LAYOUT) if n_inputs is None else n_inputs
    b = len(DELAY_BUCKETS_S) if n_buckets is None else n_buckets
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ApprovalNet(d, b, hidden=16)
    net.set_normalization(torch.rand(d, generator=gen) * 2 - 1, 0.5 + torch.rand(d, generator=gen))
    return net.eval()


def make_tiny_artifact(model_dir: Path, version: str, *, seed: int = 0, **overrides: Any) -> Path:
    """Export `tiny_model(seed)` as `version` under `model_dir`; `overrides` go to `export_model`.

    The net's input/output widths follow ``input_layout`` / ``delay_buckets_s`` overrides, so an
    artifact with a foreign layout is still self-consistent (and refused only for its layout).
    """
    layout = overrides.get("input_layout", INPUT_LAYOUT)
    buckets = overrides.get("delay_buckets_s", DELAY_BUCKETS_S)
    net = tiny_model(seed, n_inputs=len(layout), n_buckets=len(buckets))
    return export_model(net, Path(model_dir), version, **overrides)
