"""Idempotency under concurrency: duplicates racing through a cache lookup decide once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from authopt.v1 import optimizer_pb2
from server.errors import InvalidArgument
from server.idempotency import IdempotencyCache, make_cache
from tests.conftest import make_request


class SlowCache:
    """The real in-memory cache whose lookups take a while (as Redis's do), so that duplicates
    overlap inside the lookup."""

    def __init__(self) -> None:
        self.inner = make_cache("memory://")

    async def get(self, key: str) -> Any:
        await asyncio.sleep(0.01)
        return await self.inner.get(key)

    async def set(self, key: str, value: Any, ttl: int) -> None:
        await self.inner.set(key, value, ttl=ttl)


async def test_concurrent_duplicates_decide_once_and_agree() -> None:
    idem = IdempotencyCache(SlowCache(), ttl_s=60)
    calls = 0

    async def decide() -> optimizer_pb2.RecommendResponse:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        return optimizer_pb2.RecommendResponse(request_id="dup", model_version=f"call-{calls}")

    results = await asyncio.gather(*(idem.get_or_decide(make_request("dup"), decide) for _ in range(10)))
    assert calls == 1 and {r.model_version for r in results} == {"call-1"}
    again = await idem.get_or_decide(make_request("dup"), decide)  # from the cache now
    assert calls == 1 and again.model_version == "call-1"


async def test_a_racing_different_request_with_the_same_id_is_refused() -> None:
    idem = IdempotencyCache(SlowCache(), ttl_s=60)

    async def decide() -> optimizer_pb2.RecommendResponse:
        await asyncio.sleep(0.02)
        return optimizer_pb2.RecommendResponse(request_id="dup")

    other = make_request("dup")
    other.attempt.amount_minor += 1
    first = asyncio.create_task(idem.get_or_decide(make_request("dup"), decide))
    await asyncio.sleep(0.015)  # the first is past its lookup and deciding
    with pytest.raises(InvalidArgument) as exc:
        await idem.get_or_decide(other, decide)
    assert exc.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert (await first).request_id == "dup"
