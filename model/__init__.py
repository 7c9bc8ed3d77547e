"""Model package: the input layout, the feature lookup, the approval net, training and export
(TorchScript + manifest).

The public names load lazily, so that light modules (``model.numerics``, which must run before torch
loads; ``model.layout``; ``model.features``) can be imported without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.errors import ModelError
    from model.export import (
        MANIFEST_FILE,
        MODEL_FILE,
        Manifest,
        export_model,
        make_tiny_artifact,
        quiet_torchscript_deprecation,
        tiny_model,
    )
    from model.layout import (
        DELAY_BUCKETS_S,
        INPUT_LAYOUT,
        LAYOUT_VERSION,
        AttemptContext,
        decline_class,
        encode_flat,
        encode_rows,
    )
    from model.net import ApprovalNet, layout_categorical_groups

_HOMES = {
    "MANIFEST_FILE": "model.export",
    "MODEL_FILE": "model.export",
    "Manifest": "model.export",
    "export_model": "model.export",
    "make_tiny_artifact": "model.export",
    "quiet_torchscript_deprecation": "model.export",
    "tiny_model": "model.export",
    "DELAY_BUCKETS_S": "model.layout",
    "INPUT_LAYOUT": "model.layout",
    "LAYOUT_VERSION": "model.layout",
    "AttemptContext": "model.layout",
    "decline_class": "model.layout",
    "encode_flat": "model.layout",
    "encode_rows": "model.layout",
    "ApprovalNet": "model.net",
    "ModelError": "model.errors",
    "layout_categorical_groups": "model.net",
}

__all__ = [
    "DELAY_BUCKETS_S",
    "INPUT_LAYOUT",
    "LAYOUT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ApprovalNet",
    "AttemptContext",
    "Manifest",
    "ModelError",
    "decline_class",
    "encode_flat",
    "encode_rows",
    "export_model",
    "layout_categorical_groups",
    "make_tiny_artifact",
    "quiet_torchscript_deprecation",
    "tiny_model",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
