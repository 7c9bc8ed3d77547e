"""authopt's gRPC decision server: validation, features, micro-batched TorchScript, policy, fallback."""

from server.app import AuthoptServer, create_server, serve
from server.features import FeatureRow, FeatureStore, InMemoryFeatureStore
from server.settings import RouteConfig, ServerSettings

__all__ = [
    "AuthoptServer",
    "FeatureRow",
    "FeatureStore",
    "InMemoryFeatureStore",
    "RouteConfig",
    "ServerSettings",
    "create_server",
    "serve",
]
