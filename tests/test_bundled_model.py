"""The bundled default model loads offline, matches this code's contract, and is small."""

from __future__ import annotations

from model.artifacts import DEFAULT_MODEL_DIR
from server.models import load_model_dir


def test_the_bundled_model_loads_and_is_small() -> None:
    versions = [p for p in DEFAULT_MODEL_DIR.iterdir() if (p / "manifest.json").is_file()]
    assert versions, f"no bundled model under {DEFAULT_MODEL_DIR}"
    model = load_model_dir(DEFAULT_MODEL_DIR)
    assert model.manifest.data_summary["world"] == "default"
    assert model.manifest.metrics["val_ece_route"] <= 0.02
    # Fitted by `authopt train` on plays of the model (sim/selection.py): it shrinks the
    # candidates' differences, and its fit cut the chosen route's ECE in those plays.
    assert model.selection is not None and 0 < model.selection.spread_scale < 1
    assert model.manifest.metrics["selection_ece_after"] < model.manifest.metrics["selection_ece_before"]
    size = sum(f.stat().st_size for v in versions for f in v.iterdir())
    assert size < 5 * 1024 * 1024
