"""Export: eager == scripted == reloaded, the manifest round-trips, versions appear atomically."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from model import (
    DELAY_BUCKETS_S,
    INPUT_LAYOUT,
    LAYOUT_VERSION,
    ApprovalNet,
    Manifest,
    export_model,
    make_tiny_artifact,
    quiet_torchscript_deprecation,
    tiny_model,
)
from model.export import MANIFEST_FILE, MODEL_FILE
from streams.contract import CONTRACT_HASH

ATOL = 1e-6
D, B = len(INPUT_LAYOUT), len(DELAY_BUCKETS_S)


def _inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 3


def _load(path: Path) -> torch.jit.ScriptModule:
    quiet_torchscript_deprecation()
    module: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return module


def test_net_output_shape_and_range() -> None:
    net = ApprovalNet(D, B, hidden=8).eval()
    y = net(_inputs(5))
    assert y.shape == (5, 1 + B) and y.dtype == torch.float32
    assert bool(((y > 0) & (y < 1)).all())
    with pytest.raises(ValueError, match=rf"expects input \[N, {D}\]"):
        net(torch.zeros(2, D - 1))


def test_set_normalization_validates_and_keeps_constant_features() -> None:
    net = ApprovalNet(3, 2, hidden=4)
    net.set_normalization([1.0, 2.0, 3.0], [2.0, 0.0, 1.0])
    assert net.std.tolist() == [2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="needs 3 values"):
        net.set_normalization([0.0], [1.0])


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = tiny_model(7), tiny_model(7)
    assert torch.equal(torch.random.get_rng_state(), before)
    x = _inputs()
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), tiny_model(8)(x))


def test_eager_scripted_and_reloaded_outputs_match(tmp_path: Path) -> None:
    net = tiny_model(3)
    net.train()  # export must not depend on (nor change) the caller's mode
    path = export_model(net, tmp_path, "1", metrics={"auc": 0.81}, data_summary={"rows": 1000})
    assert net.training
    x = _inputs()
    with torch.no_grad():
        eager = net.eval()(x)
    quiet_torchscript_deprecation()
    in_memory = torch.jit.freeze(torch.jit.script(net).eval())
    reloaded = _load(path / MODEL_FILE)
    with torch.inference_mode():
        torch.testing.assert_close(in_memory(x), eager, atol=ATOL, rtol=0)
        torch.testing.assert_close(reloaded(x), eager, atol=ATOL, rtol=0)
        # a single row and a large batch go through the same frozen graph
        torch.testing.assert_close(reloaded(x[:1]), eager[:1], atol=ATOL, rtol=0)


def test_manifest_written_and_round_trips(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "2026.01.1", metrics={"ece": 0.02}, data_summary={"events": 5})
    text = (path / MANIFEST_FILE).read_text()
    m = Manifest.from_json(text)
    assert m.version == "2026.01.1"
    assert m.contract_hash == CONTRACT_HASH
    assert m.layout_version == LAYOUT_VERSION
    assert m.input_layout == list(INPUT_LAYOUT)
    assert m.delay_buckets_s == list(DELAY_BUCKETS_S)
    assert m.metrics == {"ece": 0.02} and m.data_summary == {"events": 5}
    assert m.format == "torchscript" and m.framework == f"torch {torch.__version__}"
    assert m.created_at.endswith("Z")
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("contract_hash"), "'contract_hash' is missing"),
        (lambda d: d.update(input_layout="a,b"), "'input_layout' must be a non-empty list"),
        (lambda d: d.update(delay_buckets_s=[0, True]), "'delay_buckets_s' must be a list of integers"),
        (lambda d: d.update(metrics={"auc": "high"}), "metric 'auc' must be a finite number"),
        (lambda d: d.update(created_at="yesterday"), "'created_at' must be an ISO 8601"),
        (lambda d: d.update(created_at="2026-01-01T00:00:00"), "must carry a UTC offset"),
        (lambda d: d.update(version=""), "'version' must be a non-empty string"),
    ],
)
def test_manifest_from_json_rejects_bad_fields(tmp_path: Path, mutate: object, message: str) -> None:
    doc = json.loads((make_tiny_artifact(tmp_path, "1") / MANIFEST_FILE).read_text())
    assert callable(mutate)
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        Manifest.from_json(json.dumps(doc))


def test_manifest_from_json_rejects_non_json() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.from_json("{nope")
    with pytest.raises(ValueError, match="must be a JSON object"):
        Manifest.from_json("[]")


def test_manifest_ignores_unknown_keys(tmp_path: Path) -> None:
    doc = json.loads((make_tiny_artifact(tmp_path, "1") / MANIFEST_FILE).read_text())
    doc["added_in_a_later_release"] = 1
    assert Manifest.from_json(json.dumps(doc)).version == "1"


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    path = make_tiny_artifact(tmp_path, "1", seed=0)
    before = (path / MODEL_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        make_tiny_artifact(tmp_path, "1", seed=1)
    assert (path / MODEL_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no temporary left behind


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the files are written only the dot-prefixed temp dir exists; then one rename."""
    seen: list[list[str]] = []
    real_save = torch.jit.save

    def spying_save(m: torch.jit.ScriptModule, f: str) -> None:
        seen.append(sorted(os.listdir(tmp_path)))
        real_save(m, f)
        seen.append(sorted(os.listdir(tmp_path)))

    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def spying_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renames.append((Path(src).name, Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(torch.jit, "save", spying_save)
    monkeypatch.setattr(os, "rename", spying_rename)
    path = make_tiny_artifact(tmp_path, "7")
    tmp_name = f".7.tmp-{os.getpid()}"
    assert seen == [[tmp_name], [tmp_name]]
    assert renames == [(tmp_name, "7")]
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_FILE, MODEL_FILE]
    assert sorted(os.listdir(tmp_path)) == ["7"]


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(m: torch.jit.ScriptModule, f: str) -> None:
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_artifact(tmp_path, "1")
    assert os.listdir(tmp_path) == []


def test_concurrent_watcher_never_sees_partial_version(tmp_path: Path) -> None:
    """A reader listing non-dot directories only ever finds complete versions."""
    stop = threading.Event()
    partial: list[str] = []

    def watch() -> None:
        while not stop.is_set():
            for p in tmp_path.iterdir():
                if p.name.startswith("."):
                    continue
                names = {q.name for q in p.iterdir()}
                if names != {MANIFEST_FILE, MODEL_FILE}:
                    partial.append(f"{p.name}: {sorted(names)}")

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(5):
            make_tiny_artifact(tmp_path, str(i), seed=i)
    finally:
        stop.set()
        t.join()
    assert partial == []


def test_export_checks_module_against_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must be float32 \[2, 4\]"):
        export_model(tiny_model(), tmp_path, "1", delay_buckets_s=[0, 1, 2])
    with pytest.raises(ValueError, match="bad model version"):
        export_model(tiny_model(), tmp_path, ".hidden")
    with pytest.raises(ValueError, match="bad model version"):
        export_model(tiny_model(), tmp_path, "a/b")
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def test_encode_flat_matches_encode_rows() -> None:
    from model.layout import INPUT_LAYOUT, AttemptContext, encode_flat, encode_rows
    from streams import Entity

    ctx = AttemptContext(12_500, 1, 2, 1, 2, True, False, True, 2, 1, "51", "r1")
    routes = [("r1", 150, {Entity.ROUTE: {"approval_rate_1h": 0.7}}), ("r2", 90, {})]
    attempt_rows = {Entity.MERCHANT: {"approval_rate_24h": 0.91}}
    rows = encode_rows(ctx, routes, attempt_rows)
    flat = encode_flat(ctx, routes, attempt_rows)
    assert len(flat) == 2 * len(INPUT_LAYOUT)
    expected = torch.tensor(rows, dtype=torch.float32).flatten().tolist()
    assert list(flat) == expected
