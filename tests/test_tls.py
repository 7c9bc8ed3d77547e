"""TLS on the API port, and the plaintext health-only port the kubelet's probes use with it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authopt.v1 import optimizer_pb2, optimizer_pb2_grpc
from tests.conftest import ServerFactory, make_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (openssl, as an operator would make one)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_api_and_plaintext_health_port(
    start_server: ServerFactory, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    # A 100 ms batching delay keeps a request in flight while the drain starts (see below).
    srv = await start_server(
        tls_cert_file=cert, tls_key_file=key, health_port=0, batch_max_queue_delay_us=100_000
    )
    assert srv.server.health_port
    # The API speaks TLS only: a plaintext call fails, a TLS one with the CA is answered.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await srv.stub.Recommend(make_request("plain"), timeout=2)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with (
        grpc.aio.secure_channel(f"localhost:{srv.port}", creds) as tls,
        grpc.aio.insecure_channel(f"127.0.0.1:{srv.server.health_port}") as plain,
    ):
        api = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(tls)
        assert (await api.Recommend(make_request("tls"), timeout=5)).routes
        # The health port answers in plaintext, with the server's statuses, and nothing else.
        health = health_pb2_grpc.HealthStub(plain)

        async def status(name: str) -> int:
            return int((await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status)

        for name in ("", "liveness", "authopt.v1.AuthorizationOptimizerService"):
            assert await status(name) == SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(plain).Recommend(
                optimizer_pb2.RecommendRequest(), timeout=2
            )
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # While draining (an open stream holds the drain), the probes still reach it: not ready,
        # alive.
        stream = api.RecommendStream()
        await stream.write(optimizer_pb2.RecommendStreamRequest(request=make_request("s-1")))
        assert (await stream.read()).response.routes
        stopping = asyncio.create_task(srv.server.stop(grace=5))
        await asyncio.sleep(0.1)
        assert not stopping.done()
        assert await status("") == NOT_SERVING and await status("liveness") == SERVING
        await stream.done_writing()
        await stopping


def test_a_key_without_a_certificate_is_refused(tmp_path: Path) -> None:
    from server import ServerSettings
    from server.app import _credentials

    key = tmp_path / "key.pem"
    key.write_text("not used")
    with pytest.raises(ValueError, match="both AUTHOPT_SERVER_TLS_CERT_FILE and AUTHOPT_SERVER_TLS_KEY_FILE"):
        _credentials(ServerSettings(tls_key_file=key))  # type: ignore[call-arg]


async def test_a_renewed_certificate_is_served_without_a_restart(
    start_server: ServerFactory, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    srv = await start_server(tls_cert_file=cert, tls_key_file=key)
    old_ca = cert.read_bytes()

    async def answered(ca: bytes) -> bool:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(f"localhost:{srv.port}", creds) as channel:
            api = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
            try:
                return bool(
                    (await api.Recommend(make_request(f"r-{len(ca)}-{id(channel)}"), timeout=3)).routes
                )
            except grpc.aio.AioRpcError:
                return False

    assert await answered(old_ca)
    # The operator renews the certificate in place (a new key, a new self-signed certificate).
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(renewed / "key.pem"),
         "-out", str(renewed / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    key.write_bytes((renewed / "key.pem").read_bytes())
    cert.write_bytes((renewed / "cert.pem").read_bytes())
    new_ca = cert.read_bytes()
    assert await answered(new_ca)  # new connections get the renewed certificate ...
    assert not await answered(old_ca)  # ... which the old one no longer vouches for


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}-ca.pem", d / f"{name}-ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name} CA",
             "-keyout", str(key), "-out", str(cert))  # fmt: skip
    return cert, key


def _signed(d: Path, name: str, ca: tuple[Path, Path], *extensions: str) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca` (openssl, as an operator's PKI would issue it)."""
    cert, key, csr, ext = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr)
    )
    ext.write_text("\n".join(extensions) + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate and a client certificate it signed, and a client certificate from
    another CA."""
    ca = _ca(tmp_path, "ours")
    other = _ca(tmp_path, "theirs")
    server = _signed(tmp_path, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1")
    client = _signed(tmp_path, "client", ca, "extendedKeyUsage=clientAuth")
    stranger = _signed(tmp_path, "stranger", other, "extendedKeyUsage=clientAuth")
    return {
        "ca": ca[0],
        "server": server[0],
        "server_key": server[1],
        "client": client[0],
        "client_key": client[1],
        "stranger": stranger[0],
        "stranger_key": stranger[1],
    }


async def test_mutual_tls_answers_a_client_our_ca_signed_and_no_one_else(
    start_server: ServerFactory, pki: dict[str, Path]
) -> None:
    from authopt.client import tls_credentials

    srv = await start_server(
        tls_cert_file=pki["server"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]
    )

    async def call(creds: grpc.ChannelCredentials) -> grpc.StatusCode:
        async with grpc.aio.secure_channel(f"localhost:{srv.port}", creds) as channel:
            api = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
            try:
                await api.Recommend(make_request(f"m-{id(creds)}"), timeout=3)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    assert await call(tls_credentials(pki["ca"], pki["client"], pki["client_key"])) == grpc.StatusCode.OK
    assert await call(tls_credentials(pki["ca"])) == grpc.StatusCode.UNAVAILABLE  # no certificate
    stranger = tls_credentials(pki["ca"], pki["stranger"], pki["stranger_key"])
    assert await call(stranger) == grpc.StatusCode.UNAVAILABLE  # another CA's


async def test_authopt_recommend_speaks_mutual_tls(start_server: ServerFactory, pki: dict[str, Path]) -> None:
    from click.testing import CliRunner
    from google.protobuf import json_format

    from cli.main import main

    srv = await start_server(
        tls_cert_file=pki["server"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]
    )
    body = json_format.MessageToJson(make_request("cli-tls"))
    base = ["recommend", body, "--target", f"127.0.0.1:{srv.port}", "--timeout", "5"]
    runner = CliRunner()

    async def run(*args: str) -> tuple[int, str]:
        result = await asyncio.to_thread(runner.invoke, main, [*base, *args])
        return result.exit_code, result.output

    mine = (
        "--ca-file",
        str(pki["ca"]),
        "--cert-file",
        str(pki["client"]),
        "--key-file",
        str(pki["client_key"]),
    )
    code, out = await run(*mine)
    assert code == 0 and '"routes"' in out, out
    code, out = await run("--ca-file", str(pki["ca"]))
    assert code == 1 and "UNAVAILABLE" in out, out  # no client certificate: no connection
    code, out = await run("--ca-file", str(pki["ca"]), "--cert-file", str(pki["client"]))
    assert code == 2 and "needs both" in out, out
    code, out = await run()
    assert code == 1 and "UNAVAILABLE" in out, out  # plaintext to a TLS port
