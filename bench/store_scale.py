"""A server's memory with millions of cards in the online store (issue 21: RSS < 500 MiB with 10
million card x merchant keys), against a real redis-server on 127.0.0.1.

    python -m bench.store_scale [--cards 10000000] [--seconds 240] [--concurrency 32]

1. Fills Redis with `--cards` card x merchant rows (`authopt:cm:fp-<i>|m-1`, the row the worker
   writes for a card folded from 8 attempts, its as-of an hour ago), server-side in chunks (a Lua
   loop), and reports Redis's memory.
2. Starts the real server (`bench.servers recommend`, the bundled model, fresh route features) with
   `AUTHOPT_SERVER_ONLINE_STORE` on that Redis and its defaults otherwise (an LRU of 100,000 rows
   kept 1 s), then sends Recommends for cards drawn uniformly from all `--cards` for `--seconds`
   at `--concurrency` in flight, sampling the server's RSS (/proc) every 5 s.
3. Prints the requests, how many found their card's row (the response's feature age is the row's
   hour, the oldest row used), and the RSS: after start, at its highest and at the end.
Prints figures; never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.online_store import _redis
from bench.recommend_load import _start
from bench.servers import ROUTES

_FILL = """
local value = ARGV[3]
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  redis.call('SET', string.format('authopt:cm:fp-%09d|m-1', i), value)
end
return 0
"""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(url: str, cards: int) -> dict[str, float]:
    import redis

    from streams.online import card_value
    from tests.events import card_state  # the project's test builders; bench runs from the repo root

    value = card_value(card_state("fp-template", "m-1", time.time() - 3600))
    client = redis.Redis.from_url(url)
    started = time.perf_counter()
    chunk = 200_000
    for start in range(0, cards, chunk):
        client.eval(_FILL, 0, start, min(cards, start + chunk) - 1, value)
    seconds = time.perf_counter() - started
    info = client.info("memory")
    keys = int(client.dbsize())
    client.close()
    return {"keys": keys, "used_mib": info["used_memory"] / 2**20, "seconds": seconds}


async def traffic(port: int, pid: int, cards: int, seconds: float, concurrency: int) -> dict[str, Any]:
    import grpc

    from authopt.client import new_request_id
    from authopt.samples import sample_request
    from authopt.v1 import optimizer_pb2, optimizer_pb2_grpc

    routes = [(r, 150, 10) for r in ROUTES]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel)
    counts = {"requests": 0, "model": 0, "card_found": 0, "errors": 0}
    codes: dict[str, int] = {}
    rss: list[float] = [_rss_mib(pid)]
    deadline = time.monotonic() + seconds
    rng = random.Random(7)

    async def loop() -> None:
        while time.monotonic() < deadline:
            # base64 ids (authopt.client's): a hex id is now and then all digits, refused as a card number
            req = sample_request(new_request_id(), routes)
            req.attempt.card.fingerprint = f"fp-{rng.randrange(cards):09d}"
            try:
                resp = await stub.Recommend(req, timeout=5)
            except grpc.aio.AioRpcError as err:
                counts["errors"] += 1
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
                continue
            counts["requests"] += 1
            counts["model"] += resp.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL
            counts["card_found"] += resp.feature_age_ms >= 3_000_000  # the card row's hour, the oldest

    async def sample() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(5)
            rss.append(_rss_mib(pid))

    started = time.monotonic()
    await asyncio.gather(sample(), *(loop() for _ in range(concurrency)))
    rss.append(_rss_mib(pid))
    await channel.close()
    return {
        **counts,
        "codes": codes,
        "qps": counts["requests"] / (time.monotonic() - started),
        "rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=10_000_000)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    proc, url = _redis()
    try:
        f = fill(url, args.cards)
        print(
            f"Redis: {f['keys']:,} card rows, used_memory {f['used_mib']:,.0f} MiB, "
            f"filled in {f['seconds']:.0f} s",
            flush=True,
        )
        model_dir = Path(__file__).resolve().parent.parent / "model" / "artifacts"
        server, port = _start("recommend", model_dir, ["--no-sdk"], {"AUTHOPT_SERVER_ONLINE_STORE": url})
        try:
            t = asyncio.run(traffic(port, server.pid, args.cards, args.seconds, args.concurrency))
        finally:
            server.terminate()
            server.wait(10)
        rss = t["rss_mib"]
        print(
            f"{t['requests']:,} Recommends for random cards of {args.cards:,} ({t['qps']:,.0f}/s, "
            f"{t['errors']} errors {t['codes']}): {t['model']:,} from the model, "
            f"{t['card_found']:,} found their card's row",
            flush=True,
        )
        print(
            f"server RSS: {rss[0]:.0f} MiB after start, median {statistics.median(rss):.0f}, "
            f"highest {max(rss):.0f}, at the end {rss[-1]:.0f} MiB ({len(rss)} samples, 5 s apart)",
            flush=True,
        )
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
