"""The base of every exception the simulator and the evaluation harness raise."""

from __future__ import annotations

from authopt.errors import AuthoptError

__all__ = ["SimError"]


class SimError(AuthoptError):
    """Base of the exceptions of the simulator and the evaluation harness."""
