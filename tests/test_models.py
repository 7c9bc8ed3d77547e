"""Model loading (checks, warm-up, refusal reasons) and the hot-reloading registry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from model import DELAY_BUCKETS_S, INPUT_LAYOUT, make_tiny_artifact, tiny_model
from model.export import MANIFEST_FILE, MODEL_FILE
from server.models import (
    LatencyEstimate,
    ModelRegistry,
    ModelRejected,
    load_model,
    resolve_device,
)
from streams.contract import CONTRACT_HASH

CPU = torch.device("cpu")
D, OUT = len(INPUT_LAYOUT), 1 + len(DELAY_BUCKETS_S)
OTHER_HASH = "sha256:" + "a" * 32


def _load(path: Path, **kw: object) -> object:
    args: dict[str, object] = {
        "expected_contract_hash": CONTRACT_HASH,
        "expected_layout": INPUT_LAYOUT,
        "device": CPU,
        "warmup_batch_sizes": (1, 8),
    }
    args.update(kw)
    return load_model(path, **args)  # type: ignore[arg-type]


def test_load_ok_matches_eager_and_warms_up(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "1", seed=4)
    m = load_model(
        path,
        expected_contract_hash=CONTRACT_HASH,
        expected_layout=INPUT_LAYOUT,
        device=CPU,
        warmup_batch_sizes=(1, 8, 32),
    )
    assert m.version == "1" and m.device == CPU and m.manifest.contract_hash == CONTRACT_HASH
    assert set(m.latency.points) == {1, 8, 32}
    assert all(s > 0 for s in m.latency.points.values())
    x = torch.randn(5, D)
    y = m.infer(x)
    assert y.shape == (5, OUT) and y.dtype == torch.float32 and y.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(y, tiny_model(4)(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=rf"expects input \[N, {D}\]"):
        m.infer(torch.zeros(2, D + 1))


def test_contract_mismatch_names_both_hashes(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "1", contract_hash=OTHER_HASH)
    with pytest.raises(ModelRejected) as info:
        _load(path)
    assert info.value.reason == "CONTRACT_MISMATCH"
    assert OTHER_HASH in str(info.value) and CONTRACT_HASH in str(info.value)
    assert str(info.value) == f"contract hash {OTHER_HASH} != expected {CONTRACT_HASH}"


def test_layout_mismatch(tmp_path: Path) -> None:
    swapped = list(INPUT_LAYOUT)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    path = make_tiny_artifact(tmp_path, "1", input_layout=swapped)
    expected = f"input 3 is '{swapped[3]}', expected '{INPUT_LAYOUT[3]}'"
    with pytest.raises(ModelRejected, match=expected) as info:
        _load(path)
    assert info.value.reason == "LAYOUT_MISMATCH"

    shorter = make_tiny_artifact(tmp_path, "2", input_layout=INPUT_LAYOUT[:-1])
    with pytest.raises(ModelRejected, match=f"{D - 1} inputs, expected {D}") as info:
        _load(shorter)
    assert info.value.reason == "LAYOUT_MISMATCH"


def test_layout_version_mismatch(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "1", layout_version="0")
    _load(path)  # not checked unless asked
    with pytest.raises(ModelRejected, match="layout version 0 != expected 1") as info:
        _load(path, expected_layout_version="1")
    assert info.value.reason == "LAYOUT_MISMATCH"


def test_corrupt_model_bytes(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "1")
    blob = bytearray((path / MODEL_FILE).read_bytes())
    (path / MODEL_FILE).write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(ModelRejected, match="does not load") as info:
        _load(path)
    assert info.value.reason == "CORRUPT"


def test_model_with_wrong_output_width_is_corrupt(tmp_path: Path) -> None:
    # a self-consistent artifact whose manifest promises fewer buckets than the net produces
    path = make_tiny_artifact(tmp_path, "1")
    doc = json.loads((path / MANIFEST_FILE).read_text())
    doc["delay_buckets_s"] = doc["delay_buckets_s"][:3]
    (path / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelRejected, match=r"expected \[1, 4\]") as info:
        _load(path)
    assert info.value.reason == "CORRUPT"


def test_invalid_manifest(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "1")
    (path / MANIFEST_FILE).write_text("{}")
    with pytest.raises(ModelRejected, match="'version' is missing") as info:
        _load(path)
    assert info.value.reason == "MANIFEST_INVALID"

    renamed = make_tiny_artifact(tmp_path, "2")
    renamed.rename(tmp_path / "3")
    with pytest.raises(ModelRejected, match="does not match directory name") as info:
        _load(tmp_path / "3")
    assert info.value.reason == "MANIFEST_INVALID"


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_resolve_device_cuda_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_latency_estimate_interpolates_and_tracks() -> None:
    est = LatencyEstimate({1: 0.001, 9: 0.002, 17: 0.004})
    assert est.estimate(1) == pytest.approx(0.001)
    assert est.estimate(5) == pytest.approx(0.0015)
    assert est.estimate(13) == pytest.approx(0.003)
    assert est.estimate(25) == pytest.approx(0.006)  # extrapolated along the last segment
    assert est.estimate(0) == pytest.approx(0.001)
    for _ in range(200):
        est.observe(9, 0.004)  # live batches are twice as slow as warm-up at 9 rows
    assert est.estimate(9) == pytest.approx(0.004, rel=1e-3)
    assert est.estimate(1) == pytest.approx(0.001)  # anchors far away are untouched
    est.observe(9, 1000.0)  # one huge outlier moves it by at most alpha * (4 - 1)
    assert est.estimate(9) <= 0.004 * 1.31


# ---- registry ---------------------------------------------------------------------------------


def _registry(model_dir: Path | None, **kw: object) -> ModelRegistry:
    return ModelRegistry(model_dir, device=CPU, warmup_batch_sizes=(1, 4), **kw)  # type: ignore[arg-type]


def test_scan_orders_naturally_and_skips_incomplete(tmp_path: Path) -> None:
    for v in ("2", "10", "1"):
        make_tiny_artifact(tmp_path, v)
    (tmp_path / ".11.tmp-123").mkdir()
    (tmp_path / "12").mkdir()  # no files yet
    (tmp_path / "13").mkdir()
    (tmp_path / "13" / MANIFEST_FILE).write_text("{}")  # model.pt missing
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in _registry(tmp_path).scan()] == ["1", "2", "10"]
    assert _registry(tmp_path / "missing").scan() == []
    assert _registry(None).scan() == []


async def test_refresh_picks_newest_then_hot_reloads(tmp_path: Path) -> None:
    for v in ("1", "2"):
        make_tiny_artifact(tmp_path, v, seed=int(v))
    reg = _registry(tmp_path)
    assert reg.current is None
    assert await reg.refresh() is True
    assert reg.current is not None and reg.current.version == "2"
    assert await reg.refresh() is False  # nothing new

    old = reg.current
    make_tiny_artifact(tmp_path, "10", seed=10)
    assert await reg.refresh() is True
    assert reg.current.version == "10"
    x = torch.randn(3, D)
    with torch.no_grad():
        torch.testing.assert_close(reg.current.infer(x), tiny_model(10)(x), atol=1e-6, rtol=0)
    assert old.infer(x).shape == (3, OUT)  # an in-flight holder of the old model can still finish


async def test_mismatched_new_version_is_refused_and_previous_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tiny_artifact(tmp_path, "1")
    reg = _registry(tmp_path)
    assert await reg.refresh() is True
    make_tiny_artifact(tmp_path, "2", contract_hash=OTHER_HASH)
    with caplog.at_level(logging.ERROR, logger="server.models"):
        assert await reg.refresh() is False
        assert await reg.refresh() is False  # refused once, not re-tried and re-logged every poll
    assert reg.current is not None and reg.current.version == "1"
    assert reg.rejected == {"2": "CONTRACT_MISMATCH"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == (
        f"model {tmp_path / '2'} refused: contract hash {OTHER_HASH} != expected {CONTRACT_HASH}; "
        "still serving 1"
    )


async def test_refused_newest_at_startup_falls_back_to_older(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tiny_artifact(tmp_path, "1")
    corrupt = make_tiny_artifact(tmp_path, "2")
    (corrupt / MODEL_FILE).write_bytes(b"not a zip archive")
    reg = _registry(tmp_path)
    with caplog.at_level(logging.ERROR, logger="server.models"):
        assert await reg.refresh() is True
    assert reg.current is not None and reg.current.version == "1"
    assert reg.rejected == {"2": "CORRUPT"}
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert msg.startswith(f"model {corrupt} refused: model.pt does not load")
    assert msg.endswith("; still serving none")


async def test_refused_version_is_retried_when_its_files_change(tmp_path: Path) -> None:
    make_tiny_artifact(tmp_path, "1")
    bad = make_tiny_artifact(tmp_path, "2")
    good_bytes = (bad / MODEL_FILE).read_bytes()
    (bad / MODEL_FILE).write_bytes(b"garbage")
    reg = _registry(tmp_path)
    await reg.refresh()
    assert reg.current is not None and reg.current.version == "1" and "2" in reg.rejected
    (bad / MODEL_FILE).write_bytes(good_bytes)
    st = (bad / MODEL_FILE).stat()
    os.utime(bad / MODEL_FILE, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert await reg.refresh() is True
    assert reg.current.version == "2" and reg.rejected == {}


async def test_deleting_newest_rolls_back(tmp_path: Path) -> None:
    make_tiny_artifact(tmp_path, "1")
    newest = make_tiny_artifact(tmp_path, "2")
    reg = _registry(tmp_path)
    await reg.refresh()
    assert reg.current is not None and reg.current.version == "2"
    shutil.rmtree(newest)
    assert await reg.refresh() is True
    assert reg.current.version == "1"


async def test_no_model_dir_serves_nothing() -> None:
    reg = _registry(None)
    assert await reg.refresh() is False
    assert reg.current is None


async def test_run_polls_until_cancelled(tmp_path: Path) -> None:
    reg = _registry(tmp_path, poll_interval_s=0.02)
    task = asyncio.create_task(reg.run())
    try:
        await asyncio.sleep(0.05)
        assert reg.current is None
        make_tiny_artifact(tmp_path, "1")
        for _ in range(200):
            if reg.current is not None:
                break
            await asyncio.sleep(0.02)
        assert reg.current is not None and reg.current.version == "1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_the_registry_follows_the_served_pointer(tmp_path: Path) -> None:
    """`CURRENT` names the version to serve (promote / rollback move it); a pointer to a version
    that is not complete serves nothing new, and the served one keeps serving."""
    for v in ("1", "2", "3"):
        make_tiny_artifact(tmp_path, v, seed=int(v))
    reg = _registry(tmp_path)
    (tmp_path / "CURRENT").write_text("1\n")
    assert await reg.refresh() is True and reg.current is not None and reg.current.version == "1"
    (tmp_path / "CURRENT").write_text("2\n")
    assert await reg.refresh() is True and reg.current.version == "2"
    (tmp_path / "CURRENT").write_text("9\n")  # no such version (or still being copied in)
    assert reg.scan() == [] and await reg.refresh() is False and reg.current.version == "2"
    (tmp_path / "CURRENT").unlink()  # no pointer: the newest
    assert await reg.refresh() is True and reg.current.version == "3"
