"""Error translation at the RPC edge: status codes, google.rpc.Status details, and a real round trip."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2

from authopt.v1 import attempt_pb2, optimizer_pb2, optimizer_pb2_grpc
from server.errors import (
    DOMAIN,
    InvalidArgument,
    ResourceExhausted,
    StatusError,
    Unavailable,
    abort_with,
    error_info,
    to_status,
    to_stream_error,
)
from server.validation import Limits, validate_recommend


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (
            InvalidArgument("INVALID_BIN", "attempt.card.bin must be 6-8 digits", field="attempt.card.bin"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (Unavailable("BROKER_UNAVAILABLE", "the broker did not answer"), grpc.StatusCode.UNAVAILABLE),
        (ResourceExhausted("QUEUE_FULL", "inference queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StatusError("INTERNAL_ERROR", "unexpected"), grpc.StatusCode.INTERNAL),
    ],
)
def test_to_status_carries_one_error_info(err: StatusError, code: grpc.StatusCode) -> None:
    status = to_status(err)
    assert status.code is code
    assert status.details == err.message
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    rich = status_pb2.Status.FromString(value)
    assert (rich.code, rich.message) == (code.value[0], err.message)
    # One ErrorInfo; a RESOURCE_EXHAUSTED refusal also says when to retry (RetryInfo).
    assert len(rich.details) == (2 if code is grpc.StatusCode.RESOURCE_EXHAUSTED else 1)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == (err.reason, DOMAIN, {"field": err.field})
    assert error_info(status) == info
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = error_details_pb2.RetryInfo()
        assert rich.details[1].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 1_000_000_000


def test_error_attributes_and_pickling() -> None:
    err = InvalidArgument("MISSING_FIELD", "request_id is required", field="request_id")
    assert isinstance(err, StatusError)
    assert (err.code, err.reason, err.field, err.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MISSING_FIELD",
        "request_id",
        "request_id is required",
    )
    assert "MISSING_FIELD" in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is InvalidArgument
    assert (clone.reason, clone.field, clone.message) == (err.reason, err.field, err.message)


def test_to_stream_error() -> None:
    err = InvalidArgument(
        "INVALID_MCC", "attempt.merchant.mcc must be 4 digits", field="attempt.merchant.mcc"
    )
    assert to_stream_error(err) == optimizer_pb2.StreamError(
        code=3, reason="INVALID_MCC", message=err.message, field="attempt.merchant.mcc"
    )


def test_error_info_without_details() -> None:
    bare = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom", None
    )
    assert error_info(bare) is None


# --- round trip through a real server and channel ------------------------------------------------------


class _Servicer(optimizer_pb2_grpc.AuthorizationOptimizerServiceServicer):
    """Validates like the real service and fails every call through abort_with."""

    async def Recommend(
        self, request: optimizer_pb2.RecommendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> optimizer_pb2.RecommendResponse:
        try:
            validate_recommend(request, Limits(), 1_750_000_000.0, require_candidates=True)
        except StatusError as err:
            await abort_with(context, err)
        return optimizer_pb2.RecommendResponse(request_id=request.request_id)

    async def ReportOutcome(
        self, request: optimizer_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> optimizer_pb2.ReportOutcomeResponse:
        await abort_with(context, Unavailable("BROKER_NOT_CONFIGURED", "no Kafka broker is configured"))


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server()
    servicer = _Servicer()  # type: ignore[abstract]  # the stubs mark every RPC abstract; unused ones are UNIMPLEMENTED
    optimizer_pb2_grpc.add_AuthorizationOptimizerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _bad_bin_request() -> optimizer_pb2.RecommendRequest:
    return optimizer_pb2.RecommendRequest(
        request_id="req-1",
        attempt=attempt_pb2.Attempt(
            merchant=attempt_pb2.Merchant(id="m-1", mcc="5411", country="DE"),
            amount_minor=100,
            currency="EUR",
            card=attempt_pb2.Card(bin="41x111", issuer_country="DE", fingerprint="fp"),
        ),
        candidates=[attempt_pb2.Route(id="acq-a")],
    )


async def test_aio_client_sees_code_reason_and_field(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Recommend(_bad_bin_request(), timeout=5)
    err = info.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "attempt.card.bin" in (err.details() or "")
    detail = error_info(err)
    assert detail is not None
    assert (detail.reason, detail.domain, detail.metadata["field"]) == (
        "INVALID_BIN",
        DOMAIN,
        "attempt.card.bin",
    )


async def test_pan_is_not_echoed_over_the_wire(target: str) -> None:
    request = _bad_bin_request()
    request.attempt.card.fingerprint = "4111 1111 1111 1111"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Recommend(request, timeout=5)
    detail = error_info(info.value)
    assert detail is not None
    assert (detail.reason, detail.metadata["field"]) == ("PAN_DETECTED", "attempt.card.fingerprint")
    assert "1111" not in (info.value.details() or "")


async def test_unavailable_round_trip(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReportOutcome(optimizer_pb2.ReportOutcomeRequest(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    detail = error_info(info.value)
    assert detail is not None
    assert (detail.reason, detail.metadata["field"]) == ("BROKER_NOT_CONFIGURED", "")


async def test_sync_client_sees_code_reason_and_field(target: str) -> None:
    def call() -> grpc.RpcError:
        with grpc.insecure_channel(target) as channel:
            stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
            try:
                stub.Recommend(_bad_bin_request(), timeout=5)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("the call succeeded")

    err = await asyncio.to_thread(call)
    assert isinstance(err, grpc.Call)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    detail = error_info(err)
    assert detail is not None
    assert (detail.reason, detail.metadata["field"]) == ("INVALID_BIN", "attempt.card.bin")


def test_every_package_has_one_exception_base_under_authopt_error() -> None:
    """Each floor's exceptions derive from its package's base, and every base from AuthoptError."""
    import importlib
    import inspect
    import pkgutil

    from authopt.errors import AuthoptError

    bases = {
        "streams": "streams.errors.StreamsError",
        "model": "model.errors.ModelError",
        "server": "server.errors.ServerError",
        "history": "history.errors.HistoryError",
        "sim": "sim.errors.SimError",
        "cli": "cli.errors.CliError",
    }
    found: dict[str, list[str]] = {}
    for package, dotted in bases.items():
        module_name, _, name = dotted.rpartition(".")
        base = getattr(importlib.import_module(module_name), name)
        assert issubclass(base, AuthoptError) and base is not AuthoptError
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            module = importlib.import_module(info.name)
            for cls_name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == info.name and issubclass(cls, BaseException):
                    assert issubclass(cls, base), f"{info.name}.{cls_name} is not a {dotted}"
                    found.setdefault(package, []).append(cls_name)
    # The ones that shared nothing before (issue 18) are among them.
    assert {"QueueFull", "DeadlineExceeded", "ModelRejected", "InvalidArgument"} <= set(found["server"])
    assert "BrokerError" in found["streams"] and "WorldConfigError" in found["sim"]
    assert "ImportRefused" in found["history"]
