"""authopt's gRPC decision server: validation, features, micro-batched TorchScript, policy, fallback.

The public names load lazily, so that light modules (``server.errors``, ``server.rules``,
``server.policy``) can be imported by clients and the simulator without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.features import FeatureRow, FeatureStore, InMemoryFeatureStore
    from server.app import AuthoptServer, create_server, serve
    from server.errors import ServerError
    from server.settings import RouteConfig, ServerSettings

__all__ = [
    "AuthoptServer",
    "FeatureRow",
    "FeatureStore",
    "InMemoryFeatureStore",
    "RouteConfig",
    "ServerError",
    "ServerSettings",
    "create_server",
    "serve",
]

_HOMES = {
    "AuthoptServer": "server.app",
    "create_server": "server.app",
    "serve": "server.app",
    "FeatureRow": "model.features",
    "FeatureStore": "model.features",
    "InMemoryFeatureStore": "model.features",
    "RouteConfig": "server.settings",
    "ServerError": "server.errors",
    "ServerSettings": "server.settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
