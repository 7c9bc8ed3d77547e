"""The base of every exception the command line raises."""

from __future__ import annotations

from authopt.errors import AuthoptError

__all__ = ["CliError"]


class CliError(AuthoptError):
    """Base of the exceptions of the command line."""
