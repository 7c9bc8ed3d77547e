"""Who may call the server: static bearer tokens from a mounted file, checked on every RPC.

`AUTHOPT_SERVER_AUTH_TOKENS_FILE` names a file (a Kubernetes Secret mounted read-only) with one
caller a line: ``<name> <token> [methods]`` — `methods` a comma-separated subset of ``recommend``
(Recommend, RecommendStream) and ``report`` (ReportOutcome, ReportOutcomes), all when omitted; blank
lines and ``#`` comments are skipped. A call carries ``authorization: Bearer <token>``. A missing or
unknown token is `UNAUTHENTICATED` (reason `MISSING_TOKEN` / `INVALID_TOKEN`); a known token calling
a method it is not given is `PERMISSION_DENIED` (`METHOD_NOT_ALLOWED`). Tokens are compared in
constant time (`hmac.compare_digest` against every token, whatever matches first) and never logged:
a refusal names the caller's name at most. The file is read again when it changes (a rotated
Secret), at most once a second; an unreadable or malformed file keeps the tokens read before (or,
at start, refuses to start). Health and reflection stay open unless `AUTH_PROTECT_HEALTH` says
otherwise (a kubelet's probe carries no token). No file: no check (`authopt up` on 127.0.0.1).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.errors import ServerError, StatusError, abort_with

__all__ = ["AuthError", "Caller", "TokenAuth", "load_tokens"]

log = logging.getLogger(__name__)

_SERVICE = "/authopt.v1.AuthorizationOptimizerService/"
_METHOD_SCOPES = {
    "Recommend": "recommend",
    "RecommendStream": "recommend",
    "ReportOutcome": "report",
    "ReportOutcomes": "report",
}
_SCOPES = frozenset(_METHOD_SCOPES.values())
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


class AuthError(ServerError, ValueError):
    """The tokens file cannot be used (unreadable, malformed); the message names the line, never a token."""


class Unauthenticated(StatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class Caller:
    name: str
    token: bytes
    scopes: frozenset[str]


def load_tokens(path: Path) -> list[Caller]:
    """The callers in a tokens file (see the module docstring)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    callers: list[Caller] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise AuthError(f"{path}, line {number}: expected '<name> <token> [methods]'")
        name, token = parts[0], parts[1]
        scopes = frozenset(parts[2].split(",")) if len(parts) == 3 else _SCOPES
        if not scopes <= _SCOPES:
            raise AuthError(
                f"{path}, line {number} ({name}): unknown methods {sorted(scopes - _SCOPES)}; "
                f"known: {', '.join(sorted(_SCOPES))}"
            )
        if len(token) < 16:
            raise AuthError(f"{path}, line {number} ({name}): the token is shorter than 16 characters")
        callers.append(Caller(name, token.encode(), scopes))
    if not callers:
        raise AuthError(f"{path}: no tokens in it")
    return callers


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The bearer-token check, as a grpc.aio server interceptor."""

    def __init__(
        self, path: Path, *, protect_health: bool = False, on_refusal: Callable[[str], None] | None = None
    ) -> None:
        self._path = path
        self._protect_health = protect_health
        self._on_refusal = on_refusal
        self._callers = load_tokens(path)  # at start, a bad file refuses to start
        self._mtime = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> int:
        try:
            return self._path.stat().st_mtime_ns
        except OSError:
            return -1

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        try:
            self._callers = load_tokens(self._path)
            log.info("auth: %s changed: %d callers", self._path, len(self._callers))
        except AuthError as exc:
            log.error("auth: keeping the tokens read before: %s", exc)
        self._mtime = mtime

    def _caller(self, token: bytes) -> Caller | None:
        found = None
        for caller in self._callers:  # every one compared: the time does not depend on which matches
            if hmac.compare_digest(caller.token, token) and found is None:
                found = caller
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if not self._protect_health and method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        self._refresh()
        header = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            missing = Unauthenticated("MISSING_TOKEN", "send 'authorization: Bearer <token>'", field="")
            return self._refuse(missing, method)
        caller = self._caller(token.strip().encode())
        if caller is None:
            unknown = Unauthenticated("INVALID_TOKEN", "the bearer token is not known", field="")
            return self._refuse(unknown, method)
        scope = _METHOD_SCOPES.get(method.removeprefix(_SERVICE)) if method.startswith(_SERVICE) else None
        if scope is None or scope not in caller.scopes:
            return self._refuse(
                PermissionDenied(
                    "METHOD_NOT_ALLOWED", f"caller {caller.name!r} may not call {method}", field=""
                ),
                method,
            )
        return await continuation(handler_call_details)

    def _refuse(self, err: StatusError, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        if self._on_refusal is not None:
            self._on_refusal(err.reason)
        if method.endswith("/RecommendStream"):

            async def stream(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await abort_with(context, err)
                yield  # pragma: no cover

            return grpc.stream_stream_rpc_method_handler(stream)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await abort_with(context, err)

        return grpc.unary_unary_rpc_method_handler(unary)
