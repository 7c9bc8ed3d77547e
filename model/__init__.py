"""Model package: the input layout, the approval net and its export (TorchScript + manifest)."""

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

__all__ = [
    "DELAY_BUCKETS_S",
    "INPUT_LAYOUT",
    "LAYOUT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ApprovalNet",
    "AttemptContext",
    "Manifest",
    "decline_class",
    "encode_flat",
    "encode_rows",
    "export_model",
    "layout_categorical_groups",
    "make_tiny_artifact",
    "quiet_torchscript_deprecation",
    "tiny_model",
]
