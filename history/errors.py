"""The base of every exception the history tooling raises (import, export, training from logs)."""

from __future__ import annotations

from authopt.errors import AuthoptError

__all__ = ["HistoryError"]


class HistoryError(AuthoptError):
    """Base of the exceptions of the history tooling."""
