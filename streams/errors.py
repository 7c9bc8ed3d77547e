"""The base of every exception the streams package raises (the worker, the replica, the local broker)."""

from __future__ import annotations

from authopt.errors import AuthoptError

__all__ = ["StreamsError"]


class StreamsError(AuthoptError):
    """Base of the exceptions of the streams package (the worker, the replica, the local broker)."""
