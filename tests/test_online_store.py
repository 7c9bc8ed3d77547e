"""The online store (streams/online.py) against a real redis-server on 127.0.0.1.

The same card state, in the server's memory or in Redis, gives the same decision; a store that is
frozen or gone gives an answer at once from the fallback policy with its source, and no retry that
a network attempt limit governs; the worker writes the rows as it folds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import timestamp_pb2

from authopt.v1 import attempt_pb2, optimizer_pb2
from cli.main import main
from streams.contract import Entity
from streams.features import EntityState, card_amount_rows, evaluate
from streams.online import CardCache, CardRows, OnlineCards, OnlineStore, OnlineStoreError, parse_url
from streams.replica import Materializer
from streams.store import FeatureRow, InMemoryFeatureStore
from tests.conftest import RedisServer, ServerFactory, make_request
from tests.events import card_state

Source = optimizer_pb2.DecisionSource
Action = optimizer_pb2.RetryAction

pytestmark = pytest.mark.timeout(120)


def _card_state(fingerprint: str = "fp-abc", merchant: str = "m-1") -> tuple[str, EntityState]:
    return f"{fingerprint}|{merchant}", card_state(fingerprint, merchant, time.time())


def test_urls_are_parsed_and_bad_ones_refused_without_the_password() -> None:
    assert parse_url("rediss://:s3cret@cache.internal:6380/2") == {
        "endpoint": "cache.internal",
        "port": 6380,
        "db": 2,
        "password": "s3cret",
        "ssl": True,
    }
    with pytest.raises(OnlineStoreError, match="scheme") as err:
        parse_url("http://:s3cret@host/0")
    assert "s3cret" not in str(err.value)
    with pytest.raises(OnlineStoreError, match="database number"):
        parse_url("redis://host/cards")


async def test_rows_round_trip_in_one_mget_and_expire(redis_server: RedisServer) -> None:
    store = OnlineStore(redis_server.url, ttl_s=3600)
    try:
        key, state = _card_state()
        await store.write({key: state})
        rows = await asyncio.gather(*(store.read(k) for k in [key, "fp-none|m-1", key]))
        assert store.reads == 1  # one event-loop turn: one MGET for all three
        got = rows[0]
        assert got is not None and rows[1] is None and rows[2] == got
        assert dict(got.card.values) == pytest.approx(evaluate(Entity.CARD_MERCHANT, state))
        assert got.card.as_of == pytest.approx(state.as_of)
        assert {k: {"attempts_30d": v} for k, v in got.amounts.items()} == card_amount_rows(state)
        ttl = await store._cache.raw("ttl", store.key(key))
        assert 3590 <= ttl <= 3600
        # a row of another contract is no row
        raw = json.loads(await store._cache.raw("get", store.key(key)))
        raw["h"] = "other"
        await store._cache.raw("set", store.key("fp-old|m-1"), json.dumps(raw))
        assert await store.read("fp-old|m-1") is None
    finally:
        await store.close()


async def test_a_frozen_or_absent_store_gives_unknown_within_the_timeout(redis_server: RedisServer) -> None:
    store = OnlineStore(redis_server.url, timeout_s=0.02)
    cards = OnlineCards(store, CardCache(100, ttl_s=60))
    try:
        key, state = _card_state()
        await store.write({key: state})
        known, rows = await cards.lookup(key, budget_s=1.0)
        assert known and rows is not None
        assert await cards.lookup(key, budget_s=1.0) == (True, rows) and cards.cache.hits == 1
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert await cards.lookup("fp-other|m-1", budget_s=1.0) == (False, None)
            assert time.monotonic() - started < 0.5 and cards.unknown == 1
            assert await cards.lookup("fp-other|m-1", budget_s=0.0) == (False, None)  # no budget left
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
    finally:
        await store.close()
    gone = OnlineCards(OnlineStore("redis://127.0.0.1:1/0", timeout_s=0.2), CardCache(100, 60))
    assert await gone.lookup("fp-abc|m-1", budget_s=1.0) == (False, None)
    await gone.store.close()


def _retry(req: optimizer_pb2.RecommendRequest, code: str = "91") -> optimizer_pb2.RecommendRequest:
    req.attempt.attempt_number = 2
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() - 60) * 1e9))
    req.prior_attempts.add(route_id="acq-a", response_code=code, attempted_at=ts)
    return req


async def test_the_same_card_state_in_memory_or_in_redis_decides_the_same(
    start_server: ServerFactory, model_dir: Path, redis_server: RedisServer
) -> None:
    key, state = _card_state()
    memory = await start_server(model_dir=model_dir)
    Materializer(memory.features).apply(_snapshot(key, state))
    online = await start_server(model_dir=model_dir, online_store=redis_server.url)
    writer = OnlineStore(redis_server.url)
    await writer.write({key: state})
    await writer.close()
    for i, req in enumerate([make_request("first"), _retry(make_request("retry"))]):
        a = await memory.stub.Recommend(req, timeout=5)
        b = await online.stub.Recommend(req, timeout=5)
        assert a.decision_source == b.decision_source == Source.DECISION_SOURCE_MODEL, i
        assert abs(a.feature_age_ms - b.feature_age_ms) < 5_000, i  # the card's row is the oldest
        for r in (a, b):  # times of the call itself
            r.server_time_us = r.feature_age_ms = r.route_feature_age_ms = 0
            r.retry.ClearField("retry_at")  # "now" when the retry may be made at once
        assert a == b, i
    # a card the store has no row for is a new card, as in memory: the model decides
    new_card = make_request("new-card")
    new_card.attempt.card.fingerprint = "fp-new"
    fresh = await online.stub.Recommend(new_card, timeout=5)
    assert fresh.decision_source == Source.DECISION_SOURCE_MODEL


async def test_a_frozen_store_falls_back_at_once_and_advises_no_limited_retry(
    start_server: ServerFactory, model_dir: Path, redis_server: RedisServer
) -> None:
    srv = await start_server(
        model_dir=model_dir,
        online_store=redis_server.url,
        online_store_timeout_ms=20.0,
        online_store_cache_ttl_s=0.0,  # every decision asks the store
    )
    visa_cat2 = _retry(make_request("frozen"), code="91")  # Visa category 2: at most 15 in 30 days
    visa_cat2.attempt.card.network = attempt_pb2.CARD_NETWORK_VISA
    ok = await srv.stub.Recommend(visa_cat2, timeout=5)
    assert ok.decision_source == Source.DECISION_SOURCE_MODEL
    assert ok.retry.action != Action.RETRY_ACTION_DO_NOT_RETRY
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        visa_cat2.request_id = "frozen-2"
        started = time.monotonic()
        resp = await srv.stub.Recommend(visa_cat2, timeout=5)
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert resp.decision_source == Source.DECISION_SOURCE_FALLBACK_CARD_STATE and resp.routes
    assert resp.retry.action == Action.RETRY_ACTION_DO_NOT_RETRY
    assert resp.retry.rule_id == "visa.cat2.limit_15_30d" and "unknown" in resp.retry.reason
    assert srv.server.cards is not None and srv.server.cards.unknown >= 1


def _snapshot(key: str, state: EntityState):  # type: ignore[no-untyped-def]
    from streams.features import to_snapshot

    return to_snapshot(Entity.CARD_MERCHANT, key, 0, state)


def test_a_replica_reading_cards_from_the_store_holds_none() -> None:
    key, state = _card_state()
    store = InMemoryFeatureStore()
    m = Materializer(store, keep_cards=False)
    m.apply(_snapshot(key, state))
    assert m.cards == 0 and m.skipped_cards == 1 and len(store) == 0


async def test_the_worker_writes_every_card_row_the_replica_holds(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Broker + worker processes with the online store: every card x merchant row in Redis equals
    the one a replica of the features topic materializes in memory (the same folding, two sinks)."""
    from streams.broker import start_broker, start_worker
    from tests.events import random_events
    from tests.test_streams import following, produce, wait_for

    evs = random_events(300, seed=7)
    with start_broker() as broker:
        worker = start_worker(
            broker.bootstrap,
            tmp_path / "worker.log",
            env={
                "AUTHOPT_WORKER_PUBLISH_INTERVAL_S": "0.1",
                "AUTHOPT_WORKER_ONLINE_STORE": redis_server.url,
                "AUTHOPT_WORKER_STATS_FILE": str(tmp_path / "stats.json"),
                "AUTHOPT_WORKER_STATS_INTERVAL_S": "0.5",
            },
        )
        try:
            await produce(broker.bootstrap, [e.SerializeToString() for e in evs])
            async with following(broker.bootstrap) as replica:
                total = len(evs)

                def folded() -> bool:
                    # every event is behind both its route's row and its card x merchant row; the
                    # features topic publishes the two separately, so both are waited for
                    routes = {e.outcome.route_id for e in evs}
                    cards = [k for (entity, k) in replica.store.rows() if entity is Entity.CARD_MERCHANT]
                    m = replica.materializer
                    return (
                        sum(m.events_for(Entity.ROUTE, r) for r in routes) >= total
                        and sum(m.events_for(Entity.CARD_MERCHANT, k) for k in cards) >= total
                    )

                await wait_for(folded, 60, f"{total} events folded")
                held = {
                    key: row
                    for (entity, key), row in replica.store.rows().items()
                    if entity is Entity.CARD_MERCHANT
                }
            await wait_for(
                lambda: (
                    (tmp_path / "stats.json").exists()
                    and json.loads((tmp_path / "stats.json").read_text())["store_rows"] >= len(held)
                ),
                30,
                "the worker's store writes",
            )
        finally:
            worker.stop(timeout_s=10)
        store = OnlineStore(redis_server.url)
        try:
            keys = sorted(held)
            assert len(keys) > 50
            _assert_rows(held, keys, await store.read_many(keys))
            # an emptied store is rebuilt from the features topic, by the command
            await store._cache.raw("flushdb")
            assert await store.read_many(keys) == [None] * len(keys)
            args = ["features", "rebuild-store", "--store", redis_server.url, "--bootstrap", broker.bootstrap]
            result = await asyncio.to_thread(CliRunner().invoke, main, args)
            assert result.exit_code == 0, result.output
            assert f"{len(keys):,} card rows" in result.output
            _assert_rows(held, keys, await store.read_many(keys))
        finally:
            await store.close()


def _assert_rows(held: dict[str, FeatureRow], keys: list[str], rows: list[CardRows | None]) -> None:
    for key, row in zip(keys, rows, strict=True):
        assert row is not None, key
        assert row.card.as_of == pytest.approx(held[key].as_of, abs=1e-6), key
        assert dict(row.card.values) == pytest.approx(dict(held[key].values), rel=1e-9, abs=1e-9), key


def test_rebuild_store_refuses_a_bad_url_and_an_absent_store() -> None:
    bad = CliRunner().invoke(main, ["features", "rebuild-store", "--store", "http://x", "--bootstrap", "h:1"])
    assert bad.exit_code == 2 and "redis:// or rediss://" in bad.output
    gone = CliRunner().invoke(
        main, ["features", "rebuild-store", "--store", "redis://127.0.0.1:1/0", "--bootstrap", "h:1"]
    )
    assert gone.exit_code == 1 and "does not answer" in gone.output


async def test_the_both_stores_harness_writes_a_card_row_whole(
    start_server: ServerFactory, redis_server: RedisServer
) -> None:
    """tests/conftest.py's CardRowsInRedis (what `both_stores` tests write through): a card's
    amount row set after its card row keeps the card's values, as the worker's one row would."""
    from streams.contract import Entity

    srv = await start_server(online_store=redis_server.url)
    from tests.conftest import CardRowsInRedis

    writer = CardRowsInRedis(srv.features, redis_server.url)
    try:
        writer.put(Entity.CARD_MERCHANT, "fp-abc|m-1", {"reattempts_30d": 2.0}, 1_000.0)
        writer.put(Entity.CARD_MERCHANT_AMOUNT, "fp-abc|m-1|12500EUR", {"attempts_30d": 3.0}, 1_100.0)
    finally:
        writer.close()
    reader = OnlineStore(redis_server.url)
    try:
        (rows,) = await reader.read_many(["fp-abc|m-1"])
    finally:
        await reader.close()
    assert rows is not None and rows.card.values == {"reattempts_30d": 2.0}
    assert rows.amounts == {"12500EUR": 3.0} and rows.card.as_of == 1_100.0
