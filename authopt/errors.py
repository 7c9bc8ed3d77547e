"""The root of authopt's exceptions: every package's base (`streams.StreamsError`,
`model.ModelError`, `server.ServerError`, `history.HistoryError`, `sim.SimError`,
`cli.errors.CliError`) derives from `AuthoptError`, so a caller can tell authopt's own failures from
everything else with one `except`."""

from __future__ import annotations

__all__ = ["AuthoptError"]


class AuthoptError(Exception):
    """Base of every exception authopt raises on purpose."""
