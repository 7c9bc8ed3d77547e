"""Idempotent Recommend: the same request id within a TTL returns the same decision.

Decisions are cached (aiocache: in memory by default, Redis when `cache_url` is redis://, so every
replica shares them) with a fingerprint of the request, and concurrent duplicates of one request id
wait for the first instead of deciding twice. Reusing an id for a different request is an error.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from aiocache import Cache

from authopt.v1 import optimizer_pb2
from server.errors import InvalidArgument

__all__ = ["IdempotencyCache", "make_cache"]


def make_cache(url: str) -> Any:
    """An aiocache cache for `memory://` or `redis://host:port/db`."""
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        return Cache(Cache.MEMORY, namespace="authopt:rec:")
    if parsed.scheme in ("redis", "rediss"):
        return Cache.from_url(url)
    raise ValueError(f"unsupported cache_url scheme {parsed.scheme!r}: use memory:// or redis://")


def _fingerprint(req: optimizer_pb2.RecommendRequest) -> bytes:
    # The budget does not change what is being decided, so it is left out of the identity.
    body = optimizer_pb2.RecommendRequest()
    body.CopyFrom(req)
    body.latency_budget_ms = 0
    return hashlib.blake2b(body.SerializeToString(deterministic=True), digest_size=16).digest()


def _reused() -> InvalidArgument:
    return InvalidArgument(
        "IDEMPOTENCY_KEY_REUSED",
        "request_id was already used for a different request within the idempotency TTL",
        field="request_id",
    )


Decide = Callable[[], Awaitable[optimizer_pb2.RecommendResponse]]


class IdempotencyCache:
    """Wraps a decision function with the request-id cache."""

    def __init__(self, cache: Any, ttl_s: int) -> None:
        self._cache = cache
        self._ttl_s = ttl_s
        self._inflight: dict[str, tuple[bytes, asyncio.Future[optimizer_pb2.RecommendResponse]]] = {}

    @property
    def enabled(self) -> bool:
        """False with a TTL of 0: every request is decided afresh (callers may skip the wrapper)."""
        return self._ttl_s != 0

    async def get_or_decide(
        self, req: optimizer_pb2.RecommendRequest, decide: Decide
    ) -> optimizer_pb2.RecommendResponse:
        if self._ttl_s == 0:
            return await decide()
        key = req.request_id
        fp = _fingerprint(req)
        pending = self._inflight.get(key)
        if pending is not None:
            return await self._join(pending, fp)
        cached = await self._cache.get(key)
        if cached is not None:
            stored_fp, payload = cached
            if stored_fp != fp:
                raise _reused()
            return optimizer_pb2.RecommendResponse.FromString(payload)
        # The cache lookup yielded: a duplicate may have started deciding meanwhile. Join it.
        pending = self._inflight.get(key)
        if pending is not None:
            return await self._join(pending, fp)
        fut: asyncio.Future[optimizer_pb2.RecommendResponse] = asyncio.get_running_loop().create_future()
        entry = (fp, fut)
        self._inflight[key] = entry
        try:
            resp = await decide()
            await self._cache.set(key, (fp, resp.SerializeToString()), ttl=self._ttl_s)
            fut.set_result(resp)
            return resp
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            if self._inflight.get(key) is entry:
                del self._inflight[key]

    @staticmethod
    async def _join(
        pending: tuple[bytes, asyncio.Future[optimizer_pb2.RecommendResponse]], fp: bytes
    ) -> optimizer_pb2.RecommendResponse:
        stored_fp, waiting = pending
        if stored_fp != fp:
            raise _reused()
        return await asyncio.shield(waiting)
