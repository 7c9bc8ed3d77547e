"""Bearer tokens from a mounted file (server/auth.py), through a real server over a real channel."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.client import AsyncClient
from authopt.v1 import optimizer_pb2
from cli.main import main
from server.auth import AuthError, load_tokens
from server.errors import error_info
from tests.conftest import ServerFactory, make_request

PLATFORM = "tok-platform-0123456789abcdef"
REPORTER = "tok-reporter-0123456789abcdef"


def _tokens(tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text or f"# callers\nplatform {PLATFORM}\nreporter {REPORTER} report\n")
    return path


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        info = error_info(err)
        return err.code(), info.reason if info else ""
    return grpc.StatusCode.OK, ""


async def test_only_known_tokens_call_and_only_their_methods(
    start_server: ServerFactory, model_dir: Path, tmp_path: Path
) -> None:
    srv = await start_server(model_dir=model_dir, auth_tokens_file=_tokens(tmp_path))
    target = f"127.0.0.1:{srv.port}"
    assert await _code(srv.stub.Recommend(make_request("no-token"), timeout=5)) == (
        grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN",
    )  # fmt: skip
    wrong = (("authorization", "Bearer tok-platform-0123456789abcdeX"),)
    assert await _code(srv.stub.Recommend(make_request("wrong"), timeout=5, metadata=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN",
    )  # fmt: skip
    async with AsyncClient(target, token=PLATFORM) as client:
        resp = await client.recommend(make_request("ok"))
        assert resp.routes
    async with AsyncClient(target, token=REPORTER) as client:  # may report, may not ask for decisions
        assert await _code(client.recommend(make_request("reporter"))) == (
            grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED",
        )  # fmt: skip
    # Health stays open for the kubelet's probes, without a token.
    health = health_pb2_grpc.HealthStub(srv.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    refused = srv.server.metrics.registry.get_sample_value(
        "authopt_rpc_errors_total", {"reason": "INVALID_TOKEN"}
    )
    assert refused == 1


async def test_a_rotated_tokens_file_is_read_again_and_a_bad_one_keeps_the_old(
    start_server: ServerFactory, model_dir: Path, tmp_path: Path
) -> None:
    path = _tokens(tmp_path)
    srv = await start_server(model_dir=model_dir, auth_tokens_file=path)
    target = f"127.0.0.1:{srv.port}"
    rotated = "tok-rotated-0123456789abcdef"
    path.write_text(f"platform {rotated}\n")
    os.utime(path, ns=(1, 1))  # a new modification time, as a Secret's update brings
    await asyncio.sleep(1.1)  # the file is looked at most once a second
    async with AsyncClient(target, token=PLATFORM) as old, AsyncClient(target, token=rotated) as new:
        assert (await _code(old.recommend(make_request("old"))))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await new.recommend(make_request("new"))).routes
        path.write_text("platform short\n")  # malformed: the tokens read before stay
        os.utime(path, ns=(2, 2))
        await asyncio.sleep(1.1)
        assert (await new.recommend(make_request("still"))).routes


def test_the_tokens_file_is_checked_and_never_echoes_a_token(tmp_path: Path) -> None:
    assert [c.name for c in load_tokens(_tokens(tmp_path))] == ["platform", "reporter"]
    for text, message in (
        ("platform tok-0123456789abcdef extra fields\n", "expected '<name> <token> \\[methods\\]'"),
        ("platform tooshort\n", "shorter than 16"),
        ("platform tok-0123456789abcdef delete\n", "unknown methods"),
        ("# nothing\n", "no tokens"),
    ):
        with pytest.raises(AuthError, match=message) as err:
            load_tokens(_tokens(tmp_path, text))
        assert "0123456789abcdef" not in str(err.value)
    with pytest.raises(AuthError, match="cannot be read"):
        load_tokens(tmp_path / "missing")


async def test_authopt_recommend_sends_the_token_from_a_file(
    start_server: ServerFactory, model_dir: Path, tmp_path: Path
) -> None:
    srv = await start_server(model_dir=model_dir, auth_tokens_file=_tokens(tmp_path))
    token_file = tmp_path / "my-token"
    token_file.write_text(PLATFORM + "\n")
    from google.protobuf import json_format

    body = json_format.MessageToJson(make_request("cli"))
    runner = CliRunner()
    ok = await asyncio.to_thread(
        runner.invoke,
        main,
        ["recommend", body, "--target", f"127.0.0.1:{srv.port}", "--token-file", str(token_file)],
    )
    assert ok.exit_code == 0, ok.output
    assert optimizer_pb2.RecommendResponse is not None and '"routes"' in ok.output
    refused = await asyncio.to_thread(
        runner.invoke, main, ["recommend", body, "--target", f"127.0.0.1:{srv.port}"]
    )
    assert refused.exit_code == 1 and "UNAUTHENTICATED [MISSING_TOKEN" in refused.output
