"""Bad input over a real channel: INVALID_ARGUMENT + ErrorInfo naming the problem and the field."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authopt.v1 import attempt_pb2, optimizer_pb2
from server.errors import error_info
from tests.conftest import ServerFactory, make_request

PAN = "4111111111111111"
Req = optimizer_pb2.RecommendRequest


def _set(path: str, value: object) -> Callable[[Req], None]:
    def mutate(req: Req) -> None:
        *parents, leaf = path.split(".")
        msg = req
        for p in parents:
            msg = getattr(msg, p)
        setattr(msg, leaf, value)

    return mutate


def _too_many(req: Req) -> None:
    for i in range(20):
        req.candidates.add(id=f"extra-{i}", cost_bps=100)


def _future_prior(req: Req) -> None:
    p = req.prior_attempts.add(route_id="acq-a", response_code="05")
    p.attempted_at.FromSeconds(int(time.time()) + 3600)


def _oversized(req: Req) -> None:
    for i in range(16):
        p = req.prior_attempts.add(route_id="r" * 64, response_code="05")
        p.attempted_at.FromSeconds(int(time.time()) - 60 - i)
    req.attempt.merchant.id = "m" * 64
    req.request_id = "x" * 128
    req.candidates[0].id = "c" * 64
    # Still valid field by field; the server's limit is set low for this case.


CASES: list[tuple[str, Callable[[Req], None], str, str]] = [
    ("zero amount", _set("attempt.amount_minor", 0), "INVALID_AMOUNT", "attempt.amount_minor"),
    ("negative amount", _set("attempt.amount_minor", -100), "INVALID_AMOUNT", "attempt.amount_minor"),
    ("unknown currency", _set("attempt.currency", "XYZ"), "UNKNOWN_CURRENCY", "attempt.currency"),
    ("lowercase currency", _set("attempt.currency", "eur"), "UNKNOWN_CURRENCY", "attempt.currency"),
    ("short BIN", _set("attempt.card.bin", "4111"), "INVALID_BIN", "attempt.card.bin"),
    ("BIN with letters", _set("attempt.card.bin", "4111ab"), "INVALID_BIN", "attempt.card.bin"),
    ("9-digit BIN", _set("attempt.card.bin", "411111111"), "INVALID_BIN", "attempt.card.bin"),
    ("too many candidates", _too_many, "TOO_MANY_CANDIDATES", "candidates"),
    ("timestamp in the future", _future_prior, "TIMESTAMP_IN_FUTURE", "prior_attempts[0].attempted_at"),
    ("PAN in merchant id", _set("attempt.merchant.id", PAN), "PAN_DETECTED", "attempt.merchant.id"),
    ("PAN in request id", _set("request_id", f"order {PAN}"), "PAN_DETECTED", "request_id"),
    ("PAN in fingerprint", _set("attempt.card.fingerprint", "4111 1111 1111 1111"), "PAN_DETECTED",
     "attempt.card.fingerprint"),
    ("missing request id", _set("request_id", ""), "MISSING_FIELD", "request_id"),
    ("bad MCC", _set("attempt.merchant.mcc", "54"), "INVALID_MCC", "attempt.merchant.mcc"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "reason", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_input_is_invalid_argument(
    start_server: ServerFactory, mutate: Callable[[Req], None], reason: str, field: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    srv = await start_server()
    req = make_request()
    mutate(req)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await srv.stub.Recommend(req, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(exc.value)
    assert info is not None and info.domain == "authopt.v1"
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert field.split("[")[0].split(".")[-1] in (exc.value.details() or "")
    # A card number is never echoed back or logged.
    assert "1111111111" not in (exc.value.details() or "") and "1111 1111" not in (exc.value.details() or "")
    assert "1111111111" not in caplog.text and "1111 1111" not in caplog.text


async def test_oversized_message_is_invalid_argument(start_server: ServerFactory) -> None:
    srv = await start_server(max_message_bytes=1024)
    req = make_request()
    _oversized(req)
    assert req.ByteSize() > 1024
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await srv.stub.Recommend(req, timeout=5)
    info = error_info(exc.value)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info is not None and info.reason == "MESSAGE_TOO_LARGE"


async def test_report_outcome_rejects_pan_too(start_server: ServerFactory) -> None:
    srv = await start_server()
    outcome = attempt_pb2.AttemptOutcome(event_id=PAN, attempt=make_request().attempt, route_id="acq-a")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await srv.stub.ReportOutcome(optimizer_pb2.ReportOutcomeRequest(outcome=outcome), timeout=5)
    info = error_info(exc.value)
    assert info is not None and (info.reason, info.metadata["field"]) == ("PAN_DETECTED", "outcome.event_id")


async def test_reflection_and_metrics_endpoint(start_server: ServerFactory) -> None:
    srv = await start_server(metrics_port=0)
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)

    async def ask() -> reflection_pb2.ServerReflectionRequest:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for resp in stub.ServerReflectionInfo(ask(), timeout=5):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"authopt.v1.AuthorizationOptimizerService", "grpc.health.v1.Health"} <= names
    await srv.stub.Recommend(make_request(), timeout=5)
    import asyncio
    from urllib.request import urlopen

    port = srv.server.metrics_port
    assert port
    text = (
        await asyncio.to_thread(lambda: urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())
    ).decode()
    assert 'authopt_decisions_total{source="DECISION_SOURCE_FALLBACK_NO_MODEL"} 1.0' in text
    assert "authopt_queue_depth 0.0" in text and "authopt_rpc_latency_seconds_bucket" in text
