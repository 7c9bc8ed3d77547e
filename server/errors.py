"""The server's exceptions and their one translation to gRPC status.

Every exception of ``server/`` derives from :class:`ServerError` (itself an
``authopt.errors.AuthoptError``). What a caller is told about derives from :class:`StatusError`;
the RPC edge turns those into a
canonical gRPC status carrying a ``google.rpc.Status`` with exactly one ``google.rpc.ErrorInfo``
(AIP-193): ``reason`` is stable and machine-readable, ``domain`` is :data:`DOMAIN`, and
``metadata["field"]`` names the offending field (dotted proto path, ``""`` when none). The human
message may change between releases; clients must branch on ``reason`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, ClassVar, NoReturn

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from authopt.errors import AuthoptError
from authopt.v1 import optimizer_pb2

__all__ = [
    "DOMAIN",
    "DeadlinePassed",
    "InvalidArgument",
    "MalformedRequests",
    "ResourceExhausted",
    "ServerError",
    "StatusError",
    "Unavailable",
    "abort_with",
    "error_info",
    "retry_after_s",
    "to_status",
    "to_stream_error",
]

DOMAIN = "authopt.v1"

# The trailing-metadata key under which gRPC carries a serialized google.rpc.Status.
_DETAILS_KEY = "grpc-status-details-bin"


class ServerError(AuthoptError):
    """Base of every exception of the server package."""


class StatusError(ServerError):
    """Base of every error the server reports to a caller.

    Attributes:
        code: canonical gRPC status code the error maps to.
        reason: stable UPPER_SNAKE machine-readable reason (the ErrorInfo ``reason``).
        field: dotted proto field path of the offending field, e.g. ``"attempt.card.bin"``; ``""``
            when the error is not about one field.
        message: human-readable explanation. Never contains a card number.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(reason={self.reason!r}, field={self.field!r}, message={self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the keyword-only ``field`` across pickling (e.g. to a process pool).
        return (_rebuild, (type(self), self.reason, self.message, self.field))


def _rebuild(cls: type[StatusError], reason: str, message: str, field: str) -> StatusError:
    return cls(reason, message, field=field)


class InvalidArgument(StatusError):
    """The request is malformed; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(StatusError):
    """A dependency (e.g. the Kafka broker) cannot be reached; the caller may retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlinePassed(StatusError):
    """The call's deadline passed before the server could start on it: not worked on."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(StatusError):
    """The server is over a limit (queue full, rate limit); the caller may retry later.

    ``retry_after_s`` goes to the caller as a ``google.rpc.RetryInfo`` beside the ErrorInfo.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, reason: str, message: str, *, field: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(reason, message, field=field)
        self.retry_after_s = retry_after_s


def _rich_status(err: StatusError) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata={"field": err.field})
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if isinstance(err, ResourceExhausted):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(err.retry_after_s * 1e9))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    code: int = err.code.value[0]
    return status_pb2.Status(code=code, message=err.message, details=details)


def to_status(err: StatusError) -> grpc.Status:
    """The ``grpc.Status`` for ``err``: its code, message and one ErrorInfo in the status details."""
    status: grpc.Status = rpc_status.to_status(_rich_status(err))
    return status


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: StatusError) -> NoReturn:
    """Ends the RPC handled by ``context`` with ``err``'s status; always raises.

    Equivalent to ``context.abort_with_status(to_status(err))`` (which the aio server implements as
    exactly this ``abort`` call); ``abort`` is used because it is part of the typed aio surface.
    """
    status = to_status(err)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: ServicerContext.abort returned")  # pragma: no cover


def to_stream_error(err: StatusError) -> optimizer_pb2.StreamError:
    """The per-message ``StreamError`` for ``err`` on RecommendStream (same code and reason as unary)."""
    return optimizer_pb2.StreamError(
        code=err.code.value[0], reason=err.reason, message=err.message, field=err.field
    )


def _status_from_metadata(metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    # Items are (key, value) pairs at runtime whatever the stubs say (grpc.aio.Metadata or a tuple).
    for key, value in metadata or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def error_info(
    error: grpc.Status | grpc.RpcError | grpc.aio.AioRpcError,
) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo carried by a failed call or a status, or ``None`` when there is none.

    Accepts a ``grpc.Status`` (e.g. from :func:`to_status`), a synchronous ``grpc.RpcError`` raised by
    a call, or a ``grpc.aio.AioRpcError``. Meant for clients and tests.
    """
    rich: status_pb2.Status | None
    if isinstance(error, grpc.aio.AioRpcError):
        rich = _status_from_metadata(error.trailing_metadata())
    elif isinstance(error, grpc.Call):
        rich = rpc_status.from_call(error)
    elif isinstance(error, grpc.Status):
        rich = _status_from_metadata(error.trailing_metadata)
    else:
        return None
    if rich is None:
        return None
    for detail in rich.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def retry_after_s(error: grpc.aio.AioRpcError) -> float | None:
    """The delay a ``RESOURCE_EXHAUSTED`` refusal asks the caller to wait (its ``RetryInfo``), or None."""
    rich = _status_from_metadata(error.trailing_metadata())
    for detail in rich.details if rich is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            return float(retry.retry_delay.ToNanoseconds()) / 1e9
    return None


# --- requests that do not parse -----------------------------------------------------------------------


class _Malformed:
    """What the tolerant deserializer hands on instead of a request whose bytes do not parse."""

    __slots__ = ()


_MALFORMED = _Malformed()


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return _MALFORMED

    return parse


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Bytes that do not parse as the method's request: ``INVALID_ARGUMENT`` with reason
    ``MALFORMED_MESSAGE``, where grpc would answer ``UNKNOWN`` (and log the ``DecodeError``).

    A unary request is refused before the handler runs. On a request stream (RecommendStream) the
    messages before the bad one are answered, then the call ends with that status: the handler only
    ever sees parsed messages. Handlers of other shapes are left as they are.
    """

    def __init__(self, on_refusal: Callable[[str], None] | None = None) -> None:
        self._on_refusal = on_refusal  # e.g. the errors metric, by reason
        # Wrapped once per method handler, not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, self._refuse)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        err = InvalidArgument(
            "MALFORMED_MESSAGE",
            "the request is not a serialized message of the method's type (corrupt wire format, or a "
            "string field that is not UTF-8)",
            field="",
        )
        if self._on_refusal is not None:
            self._on_refusal(err.reason)
        await abort_with(context, err)


def _wrap(
    handler: Any, refuse: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[NoReturn]]
) -> grpc.RpcMethodHandler[Any, Any]:
    # ``Any``: the stubs type the behaviours for the synchronous server; these are grpc.aio's.
    parse = _tolerant(handler.request_deserializer)
    serialize = handler.response_serializer
    if (
        not handler.request_streaming
        and not handler.response_streaming
        and inspect.iscoroutinefunction(handler.unary_unary)
    ):
        unary = handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request is _MALFORMED:
                await refuse(context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=parse, response_serializer=serialize
        )
    if (
        handler.request_streaming
        and handler.response_streaming
        and inspect.isasyncgenfunction(handler.stream_stream)
    ):
        stream = handler.stream_stream

        async def checked_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            malformed = False

            async def parsed() -> AsyncIterator[Any]:
                nonlocal malformed
                async for request in requests:
                    if request is _MALFORMED:
                        malformed = True
                        return
                    yield request

            async for response in stream(parsed(), context):
                yield response
            if malformed:
                await refuse(context)

        return grpc.stream_stream_rpc_method_handler(
            checked_stream, request_deserializer=parse, response_serializer=serialize
        )
    kept: grpc.RpcMethodHandler[Any, Any] = handler
    return kept
