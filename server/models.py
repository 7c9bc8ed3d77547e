"""Model loading and hot reload.

`load_model` turns one version directory (written by `model.export_model`) into a warmed-up
`LoadedModel`, refusing it — `ModelRejected` with a stable ``reason`` — when its manifest names another
feature contract or input layout, or when the artifact does not load or produces garbage.
`ModelRegistry` watches the model directory and swaps in the version its served pointer names
(`CURRENT`, written by `authopt model promote`), or the newest loadable version when there is no
pointer; the hot path
reads `ModelRegistry.current`, which is replaced by a single attribute assignment (atomic under the
GIL), so a request sees either the old model or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import cast

import torch

from model import (
    INPUT_LAYOUT,
    LAYOUT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    quiet_torchscript_deprecation,
)
from server.errors import ServerError
from server.policy import SelectionCorrection
from streams.contract import CONTRACT_HASH, Entity, entity_key

__all__ = [
    "POINTER_FILE",
    "LatencyEstimate",
    "LoadedModel",
    "ModelRegistry",
    "ModelRejected",
    "load_model",
    "load_model_dir",
    "natural_key",
    "resolve_device",
]

_log = logging.getLogger(__name__)

DEFAULT_WARMUP_BATCH_SIZES: tuple[int, ...] = (1, 8, 32, 128)
POINTER_FILE = "CURRENT"
"""The served pointer in a model directory: one line, the name of the version to serve."""
_WARMUP_RUNS = 3


class ModelRejected(ServerError):
    """A model artifact the server refuses to serve.

    ``reason`` is stable and machine-readable: ``CONTRACT_MISMATCH``, ``LAYOUT_MISMATCH``, ``CORRUPT``
    or ``MANIFEST_INVALID``; the message says what exactly differs.
    """

    REASONS = frozenset({"CONTRACT_MISMATCH", "LAYOUT_MISMATCH", "CORRUPT", "MANIFEST_INVALID"})

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown ModelRejected reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class LatencyEstimate:
    """Forward latency (seconds) by batch size: measured at warm-up, then tracked from live batches.

    `estimate` interpolates linearly between the measured batch sizes and extrapolates linearly past
    the largest. `observe` nudges the two anchors around a live batch size towards what was seen
    (an EWMA in ratio space, each observation clamped to x0.25..x4 so one GC pause or page fault does
    not swing the budget). Meant to be used from one thread (the event loop).
    """

    def __init__(self, measured: dict[int, float], *, alpha: float = 0.1) -> None:
        if not measured or any(n < 1 or not math.isfinite(s) or s < 0 for n, s in measured.items()):
            raise ValueError(f"LatencyEstimate needs batch sizes >= 1 and finite latencies, got {measured}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._sizes = sorted(measured)
        self._seconds = [float(measured[n]) for n in self._sizes]
        self._alpha = alpha

    @property
    def points(self) -> dict[int, float]:
        """The current anchors: batch size → seconds."""
        return dict(zip(self._sizes, self._seconds, strict=True))

    def _bracket(self, rows: int) -> tuple[int, int, float]:
        """Indices of the anchors around `rows` and the weight of the upper one."""
        sizes = self._sizes
        if len(sizes) == 1 or rows <= sizes[0]:
            return 0, 0, 0.0
        hi = bisect.bisect_left(sizes, rows)
        if hi >= len(sizes):  # beyond the largest: extrapolate along the last segment
            hi = len(sizes) - 1
        lo = hi - 1
        w = (rows - sizes[lo]) / (sizes[hi] - sizes[lo])
        return lo, hi, w

    def estimate(self, rows: int) -> float:
        """Expected forward latency (seconds) of a batch of `rows` rows."""
        lo, hi, w = self._bracket(rows)
        s = self._seconds
        return max(s[lo] + w * (s[hi] - s[lo]), 0.0)

    def observe(self, rows: int, seconds: float) -> None:
        """Fold a live batch's measured latency into the estimate."""
        if rows < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        expected = self.estimate(rows)
        if expected <= 0.0:
            return
        ratio = min(max(seconds / expected, 0.25), 4.0)
        lo, hi, w = self._bracket(rows)
        w = min(w, 1.0)  # extrapolated batches update the last anchor fully
        self._seconds[lo] *= 1.0 + self._alpha * (1.0 - w) * (ratio - 1.0)
        if hi != lo:
            self._seconds[hi] *= 1.0 + self._alpha * w * (ratio - 1.0)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, warmed-up model version: what the hot path calls."""

    version: str
    manifest: Manifest
    device: torch.device
    module: torch.jit.ScriptModule
    latency: LatencyEstimate

    @property
    def n_inputs(self) -> int:
        return len(self.manifest.input_layout)

    @cached_property
    def selection(self) -> SelectionCorrection | None:
        """The route column's selection correction from the manifest (None: none recorded)."""
        s = self.manifest.route_selection
        return SelectionCorrection(**s) if s else None

    def issuer_offset(self, issuer_country: str, bin_: str) -> float:
        """The logit offset of the selection correction for a card of this issuer (0: none)."""
        offsets = self.manifest.route_selection_issuer
        if not offsets:
            return 0.0
        return offsets.get(entity_key(Entity.ISSUER, issuer_country=issuer_country, bin_=bin_), 0.0)

    @property
    def n_outputs(self) -> int:
        return 1 + len(self.manifest.delay_buckets_s)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Run a batch: float32 CPU ``[N, D]`` → CPU float32 ``[N, 1 + B]`` probabilities.

        Blocking; the micro-batcher calls it on its inference thread. On a CPU model a float32 input
        goes straight to the module: every further torch call here would release the GIL and, on a
        thread, wait to win it back from a busy event loop.
        """
        if x.dim() != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"model {self.version} expects input [N, {self.n_inputs}], got {list(x.shape)}")
        with torch.inference_mode():
            if self.device.type == "cpu" and x.dtype == torch.float32:
                out = self.module(x)
            else:
                out = self.module(x.to(self.device, torch.float32))
            if not isinstance(out, torch.Tensor):
                raise RuntimeError(f"model {self.version} returned {type(out).__name__}, expected a Tensor")
            on_cpu = out.device.type == "cpu" and out.dtype == torch.float32
            y = out if on_cpu else out.to("cpu", torch.float32)
        if y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] != self.n_outputs:
            raise RuntimeError(
                f"model {self.version} returned {list(y.shape)} for input {list(x.shape)}, "
                f"expected [{x.shape[0]}, {self.n_outputs}]"
            )
        return y


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda``/``cuda:N`` → CUDA or `ValueError`; ``cpu``."""
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "use 'auto' or 'cpu'"
            )
        dev = torch.device(key)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise ValueError(f"unknown device {name!r}: expected 'auto', 'cpu' or 'cuda[:N]'")


def _read_manifest(version_dir: Path) -> Manifest:
    try:
        text = (version_dir / MANIFEST_FILE).read_text(encoding="utf-8")
        manifest = Manifest.from_json(text)
    except (OSError, ValueError) as exc:
        raise ModelRejected("MANIFEST_INVALID", f"{MANIFEST_FILE} unreadable: {exc}") from exc
    if manifest.version != version_dir.name:
        raise ModelRejected(
            "MANIFEST_INVALID",
            f"manifest version {manifest.version!r} does not match directory name {version_dir.name!r}",
        )
    if manifest.format != "torchscript":
        raise ModelRejected("MANIFEST_INVALID", f"unsupported model format {manifest.format!r}")
    return manifest


def _layout_difference(got: Sequence[str], want: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"input {i} is {a!r}, expected {b!r}"
    return f"{len(got)} inputs, expected {len(want)}"


def _check_compatible(
    manifest: Manifest, *, contract_hash: str, layout: Sequence[str], layout_version: str | None
) -> None:
    if manifest.contract_hash != contract_hash:
        raise ModelRejected(
            "CONTRACT_MISMATCH", f"contract hash {manifest.contract_hash} != expected {contract_hash}"
        )
    if list(manifest.input_layout) != list(layout):
        raise ModelRejected(
            "LAYOUT_MISMATCH", f"input layout differs: {_layout_difference(manifest.input_layout, layout)}"
        )
    if layout_version is not None and manifest.layout_version != layout_version:
        raise ModelRejected(
            "LAYOUT_MISMATCH", f"layout version {manifest.layout_version} != expected {layout_version}"
        )


def _warm_up(model: LoadedModel, batch_sizes: Sequence[int]) -> dict[int, float]:
    """Run zeros at each batch size (one untimed run, then the median of 3); check the outputs."""
    measured: dict[int, float] = {}
    for n in sorted(set(batch_sizes)):
        x = torch.zeros(n, model.n_inputs, dtype=torch.float32)
        model.infer(x)  # first call at a shape lets the TorchScript profiling executor specialize
        runs = []
        for _ in range(_WARMUP_RUNS):
            t0 = time.perf_counter()
            y = model.infer(x)
            runs.append(time.perf_counter() - t0)
        if not bool(torch.isfinite(y).all()) or bool((y < 0).any()) or bool((y > 1).any()):
            raise ModelRejected("CORRUPT", f"outputs at batch size {n} are not probabilities in [0, 1]")
        measured[n] = statistics.median(runs)
    return measured


def load_model(
    version_dir: Path,
    *,
    expected_contract_hash: str,
    expected_layout: Sequence[str],
    device: torch.device,
    expected_layout_version: str | None = None,
    warmup_batch_sizes: Sequence[int] = DEFAULT_WARMUP_BATCH_SIZES,
) -> LoadedModel:
    """Load, check and warm up one version directory; raises `ModelRejected`.

    Blocking (file I/O, deserialization, warm-up); the registry runs it in a worker thread.
    """
    version_dir = Path(version_dir)
    manifest = _read_manifest(version_dir)
    _check_compatible(
        manifest,
        contract_hash=expected_contract_hash,
        layout=expected_layout,
        layout_version=expected_layout_version,
    )
    quiet_torchscript_deprecation()
    try:
        module = cast(
            torch.jit.ScriptModule,
            torch.jit.load(str(version_dir / MODEL_FILE), map_location=device),  # type: ignore[no-untyped-call]
        )
        module.eval()
    except Exception as exc:
        raise ModelRejected("CORRUPT", f"{MODEL_FILE} does not load: {type(exc).__name__}: {exc}") from exc
    sizes = [n for n in warmup_batch_sizes if n >= 1] or [1]
    provisional = LoadedModel(
        version=manifest.version,
        manifest=manifest,
        device=device,
        module=module,
        latency=LatencyEstimate({1: 0.0}),
    )
    try:
        measured = _warm_up(provisional, sizes)
    except ModelRejected:
        raise
    except Exception as exc:
        raise ModelRejected("CORRUPT", f"warm-up failed: {type(exc).__name__}: {exc}") from exc
    return LoadedModel(
        version=manifest.version,
        manifest=manifest,
        device=device,
        module=module,
        latency=LatencyEstimate(measured),
    )


def load_model_dir(model_dir: Path) -> LoadedModel:
    """Load the newest version under `model_dir` (or `model_dir` itself if it is a version) as the
    server would, on the CPU: manifest checked against this code's contract and layout. For the
    tools that score a model outside the server (evaluation, off-policy estimates)."""
    model_dir = Path(model_dir)
    version = model_dir if (model_dir / "manifest.json").is_file() else None
    if version is None:
        versions = (
            sorted(p for p in model_dir.iterdir() if (p / "manifest.json").is_file())
            if model_dir.is_dir()
            else []
        )
        if not versions:
            raise FileNotFoundError(f"no model version (a directory with manifest.json) under {model_dir}")
        version = versions[-1]
    return load_model(
        version,
        expected_contract_hash=CONTRACT_HASH,
        expected_layout=INPUT_LAYOUT,
        expected_layout_version=LAYOUT_VERSION,
        device=torch.device("cpu"),
        warmup_batch_sizes=(1,),
    )


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """``v2`` < ``v10``; digit runs compare as numbers, other runs as text."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _artifact_mtime_ns(version_dir: Path) -> int:
    try:
        return max((version_dir / f).stat().st_mtime_ns for f in (MANIFEST_FILE, MODEL_FILE))
    except OSError:
        return -1


class ModelRegistry:
    """Watches `model_dir` and serves the version its pointer names, else the newest loadable one.

    With a pointer (`model_dir/CURRENT`, moved atomically by `authopt model promote` and `rollback`)
    only that version is a candidate: a promotion or a rollback is followed at the next poll, and a
    pointed version that does not load is refused while the served one keeps serving. Without one:
    a version that is refused stays refused (one ERROR line, listed in `rejected`) until its files
    change; if the newest version is refused, the next newest that loads is used, down to the one
    being served, which keeps serving; deleting the newest version therefore rolls back.
    """

    def __init__(
        self,
        model_dir: Path | None,
        *,
        device: torch.device,
        expected_contract_hash: str = CONTRACT_HASH,
        expected_layout: Sequence[str] = INPUT_LAYOUT,
        expected_layout_version: str | None = LAYOUT_VERSION,
        poll_interval_s: float = 2.0,
        warmup_batch_sizes: Sequence[int] = DEFAULT_WARMUP_BATCH_SIZES,
        logger: logging.Logger | None = None,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.expected_contract_hash = expected_contract_hash
        self.expected_layout = tuple(expected_layout)
        self.expected_layout_version = expected_layout_version
        self.poll_interval_s = poll_interval_s
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self.rejected: dict[str, str] = {}
        self._rejected_mtime: dict[str, int] = {}
        self._current: LoadedModel | None = None
        self._lock = asyncio.Lock()
        self._log = logger or _log

    @property
    def current(self) -> LoadedModel | None:
        """The model being served (None until one loads)."""
        return self._current

    def scan(self) -> list[Path]:
        """The versions to serve from, best last: the pointer's version when there is a pointer
        (none while it names no complete version), else every complete version directory, oldest
        first (natural sort of the names)."""
        if self.model_dir is None:
            return []
        try:
            pointed = (self.model_dir / POINTER_FILE).read_text().strip()
        except OSError:
            pointed = None
        if pointed is not None:
            version = self.model_dir / pointed
            ok = pointed and not pointed.startswith(".") and "/" not in pointed
            if ok and (version / MANIFEST_FILE).is_file() and (version / MODEL_FILE).is_file():
                return [version]
            return []
        try:
            entries = list(self.model_dir.iterdir())
        except OSError:
            return []
        complete = [
            p
            for p in entries
            if not p.name.startswith(".")
            and p.is_dir()
            and (p / MANIFEST_FILE).is_file()
            and (p / MODEL_FILE).is_file()
        ]
        return sorted(complete, key=lambda p: natural_key(p.name))

    def _load(self, version_dir: Path) -> LoadedModel:
        return load_model(
            version_dir,
            expected_contract_hash=self.expected_contract_hash,
            expected_layout=self.expected_layout,
            expected_layout_version=self.expected_layout_version,
            device=self.device,
            warmup_batch_sizes=self.warmup_batch_sizes,
        )

    async def refresh(self) -> bool:
        """Load and swap in the newest loadable version if it is not the current one; True on swap."""
        async with self._lock:
            current = self._current
            for version_dir in reversed(self.scan()):
                name = version_dir.name
                if current is not None and name == current.version:
                    return False
                mtime = _artifact_mtime_ns(version_dir)
                if self._rejected_mtime.get(name) == mtime:
                    continue
                try:
                    loaded = await asyncio.to_thread(self._load, version_dir)
                except Exception as exc:  # any failure must leave the served model in place
                    self._refuse(version_dir, mtime, exc, current)
                    continue
                self._current = loaded
                self.rejected.pop(name, None)
                self._rejected_mtime.pop(name, None)
                self._log.info(
                    "model %s loaded on %s (warm-up batch 1: %.3f ms); replaced %s",
                    name,
                    loaded.device,
                    loaded.latency.estimate(1) * 1e3,
                    current.version if current else "none",
                )
                return True
            return False

    def _refuse(self, version_dir: Path, mtime: int, exc: Exception, current: LoadedModel | None) -> None:
        if isinstance(exc, ModelRejected):
            reason, detail = exc.reason, exc.message
        else:
            reason, detail = "CORRUPT", f"unexpected {type(exc).__name__}: {exc}"
        self.rejected[version_dir.name] = reason
        self._rejected_mtime[version_dir.name] = mtime
        self._log.error(
            "model %s refused: %s; still serving %s",
            version_dir,
            detail,
            current.version if current else "none",
        )

    async def run(self) -> None:
        """Poll `refresh` every `poll_interval_s` until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a scan hiccup must not end the watcher
                self._log.exception("model refresh failed")
            await asyncio.sleep(self.poll_interval_s)
