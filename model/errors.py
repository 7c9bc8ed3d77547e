"""The base of every exception the model package raises (layout, training, export)."""

from __future__ import annotations

from authopt.errors import AuthoptError

__all__ = ["ModelError"]


class ModelError(AuthoptError):
    """Base of the exceptions of the model package: layout, training, export."""
