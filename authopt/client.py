"""A thin typed client for AuthorizationOptimizerService, async and sync.

Sane defaults: a deadline on every call (the decision's latency budget plus transport slack) and an
idempotency key (a random request id) when the caller gives none, so a retried call returns the
same decision instead of a second one.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from authopt.v1 import attempt_pb2, optimizer_pb2, optimizer_pb2_grpc

__all__ = ["DEFAULT_TIMEOUT_S", "AsyncClient", "Client", "new_request_id", "tls_credentials"]

DEFAULT_TIMEOUT_S = 0.5  # the caller's whole wait; the server's own budget is shorter


def new_request_id() -> str:
    """A random idempotency key: 128 bits in URL-safe base64. Not hex: 32 hex characters hold a
    run of 12+ digits passing Luhn often enough (~0.3 % of keys) that the server would refuse them
    as a possible card number (`PAN_DETECTED`)."""
    return "r_" + secrets.token_urlsafe(16)


def tls_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for a server that speaks TLS: `ca_file` the CA bundle that vouches for
    the server (None: the system's roots), and for mutual TLS (a server with
    AUTHOPT_SERVER_TLS_CLIENT_CA_FILE) this client's certificate chain and private key, both PEM."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both the certificate file and its key file")
    try:
        roots = ca_file.read_bytes() if ca_file is not None else None
        chain = cert_file.read_bytes() if cert_file is not None else None
        key = key_file.read_bytes() if key_file is not None else None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    for path, pem in ((ca_file, roots), (cert_file, chain), (key_file, key)):
        if pem is not None and b"-----BEGIN " not in pem:
            raise ValueError(f"{path} is not PEM (no -----BEGIN line)")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def _prepare(req: optimizer_pb2.RecommendRequest) -> optimizer_pb2.RecommendRequest:
    if not req.request_id:
        req.request_id = new_request_id()
    return req


def _timeout(req: optimizer_pb2.RecommendRequest, timeout_s: float | None) -> float:
    if timeout_s is not None:
        return timeout_s
    # Leave the server its budget plus slack for the network and the fallback.
    return max(DEFAULT_TIMEOUT_S, req.latency_budget_ms / 1000 * 2)


def _auth(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a bearer token (server/auth.py); none without one."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class AsyncClient:
    """grpc.aio client: `async with AsyncClient("127.0.0.1:50051") as c: await c.recommend(req)`."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float | None = None,
        token: str | None = None,
    ) -> None:
        self._channel = (
            grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        )
        self._stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._auth = _auth(token)

    async def recommend(
        self,
        req: optimizer_pb2.RecommendRequest,
        *,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> optimizer_pb2.RecommendResponse:
        req = _prepare(req)
        resp: optimizer_pb2.RecommendResponse = await self._stub.Recommend(
            req,
            timeout=_timeout(req, timeout_s or self._timeout_s),
            metadata=(*self._auth, *(metadata or ())),
        )
        return resp

    async def report_outcome(
        self, outcome: attempt_pb2.AttemptOutcome, *, timeout_s: float = 5.0
    ) -> optimizer_pb2.ReportOutcomeResponse:
        resp: optimizer_pb2.ReportOutcomeResponse = await self._stub.ReportOutcome(
            optimizer_pb2.ReportOutcomeRequest(outcome=outcome), timeout=timeout_s, metadata=self._auth
        )
        return resp

    async def report_outcomes(
        self, outcomes: list[attempt_pb2.AttemptOutcome], *, timeout_s: float = 10.0
    ) -> optimizer_pb2.ReportOutcomesResponse:
        resp: optimizer_pb2.ReportOutcomesResponse = await self._stub.ReportOutcomes(
            optimizer_pb2.ReportOutcomesRequest(outcomes=outcomes), timeout=timeout_s, metadata=self._auth
        )
        return resp

    @property
    def stub(self) -> optimizer_pb2_grpc.AuthorizationOptimizerServiceStub:
        """The generated stub, for RecommendStream and anything else."""
        return self._stub

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Client:
    """Blocking client with the same defaults: `with Client(target) as c: c.recommend(req)`."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float | None = None,
        token: str | None = None,
    ) -> None:
        self._channel = (
            grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        )
        self._stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._auth = _auth(token)

    def recommend(
        self, req: optimizer_pb2.RecommendRequest, *, timeout_s: float | None = None
    ) -> optimizer_pb2.RecommendResponse:
        req = _prepare(req)
        resp: optimizer_pb2.RecommendResponse = self._stub.Recommend(
            req, timeout=_timeout(req, timeout_s or self._timeout_s), metadata=self._auth
        )
        return resp

    def report_outcome(
        self, outcome: attempt_pb2.AttemptOutcome, *, timeout_s: float = 5.0
    ) -> optimizer_pb2.ReportOutcomeResponse:
        resp: optimizer_pb2.ReportOutcomeResponse = self._stub.ReportOutcome(
            optimizer_pb2.ReportOutcomeRequest(outcome=outcome), timeout=timeout_s, metadata=self._auth
        )
        return resp

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
