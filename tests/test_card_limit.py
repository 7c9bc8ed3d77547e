"""The server's per-card state is bounded (streams.replica.Materializer `max_cards`, issue 20).

Snapshots are the worker's own (streams.processor.FeatureProcessor over tests.events records); no
broker. The least recently updated or read card goes with every row it had, comes back with its next
snapshot, and is decided as an unknown card in between.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import pytest
from pydantic import ValidationError

from authopt.v1 import events_pb2, optimizer_pb2
from model.features import lookup_features
from server import ServerSettings, create_server
from streams.contract import Entity
from streams.kafka import KafkaSettings
from streams.processor import FeatureProcessor
from streams.replica import Materializer
from streams.store import InMemoryFeatureStore
from tests.conftest import ServerFactory, make_request
from tests.events import T0, event

CARD, AMOUNT = Entity.CARD_MERCHANT, Entity.CARD_MERCHANT_AMOUNT


class Worker:
    """The worker's fold, keeping its state across calls (a card updated later is a real update)."""

    def __init__(self) -> None:
        self._states: dict[bytes, bytes | None] = {}
        self._processor = FeatureProcessor(self._states)
        self._n = 0

    def fold(self, events: list[events_pb2.AttemptEvent], partition: int = 0) -> list[bytes]:
        """The snapshots (every entity) the events change, as the worker publishes them."""
        result = self._processor.process(
            partition, [e.SerializeToString() for e in events], self._states.__setitem__
        )
        return list(result.snapshots.values())

    def card(
        self, i: int, *, at: float = T0, amounts: tuple[int, ...] = (1000, 2500), **kw: str
    ) -> list[bytes]:
        """Attempts of card `fp-<i>` at merchant m-1, one per amount (so one amount row each)."""
        evs = []
        for amount in amounts:
            self._n += 1
            evs.append(event(f"ev-{self._n}", at, fingerprint=f"fp-{i}", amount_minor=amount, **kw))
            at += 1
        return self.fold(evs)


def key(i: int) -> str:
    return f"fp-{i}|m-1"


def cards_in(store: InMemoryFeatureStore) -> set[str]:
    return {k for e, k in store.rows() if e is CARD}


def amount_rows_in(store: InMemoryFeatureStore) -> set[str]:
    return {k for e, k in store.rows() if e is AMOUNT}


def apply_all(m: Materializer, snapshots: list[bytes]) -> None:
    for raw in snapshots:
        m.apply_bytes(raw)


def cards_only(snapshots: list[bytes]) -> list[bytes]:
    return [raw for raw in snapshots if events_pb2.FeatureSnapshot.FromString(raw).entity == CARD.value]


def test_the_least_recently_updated_cards_go_with_all_their_rows() -> None:
    worker = Worker()
    bounded, every = Materializer(InMemoryFeatureStore(), max_cards=3), Materializer(InMemoryFeatureStore())
    for i in range(5):
        snaps = worker.card(i, at=T0 + 10 * i)
        apply_all(bounded, snaps)
        apply_all(every, snaps)
    store = bounded.store
    assert cards_in(store) == {key(2), key(3), key(4)}
    assert amount_rows_in(store) == {f"{key(i)}|{a}EUR" for i in (2, 3, 4) for a in (1000, 2500)}
    assert bounded.cards == 3 and bounded.evicted == 2
    assert not [k for _, k in store.rows() if k.startswith(("fp-0|", "fp-1|"))]  # nothing left behind
    # What is kept is what the unbounded replica has, row for row; aggregates are never limited.
    assert store.rows() == {
        k: v for k, v in every.store.rows().items() if not k[1].startswith(("fp-0|", "fp-1|"))
    }
    assert store.get(Entity.ROUTE, "acq-a") is not None
    assert every.cards == 5 and every.evicted == 0


def test_an_update_or_a_read_keeps_a_card() -> None:
    worker, m = Worker(), Materializer(InMemoryFeatureStore(), max_cards=3)
    for i in range(3):
        apply_all(m, worker.card(i, at=T0 + i))
    apply_all(m, worker.card(0, at=T0 + 100))  # card 0 updated: now the most recent
    # card 1 read for a decision, through the server's lookup (InMemoryFeatureStore.get)
    attempt = make_request().attempt
    attempt.card.fingerprint, attempt.amount_minor = "fp-1", 1000
    feats = lookup_features(m.store, attempt, ["acq-a"])
    assert feats.attempt_rows[CARD] is not None and feats.attempt_rows[AMOUNT] is not None
    apply_all(m, worker.card(3, at=T0 + 200))
    assert cards_in(m.store) == {key(0), key(1), key(3)}  # card 2, neither updated nor read, went
    apply_all(m, worker.card(4, at=T0 + 300))
    assert cards_in(m.store) == {key(1), key(3), key(4)}
    assert m.evicted == 2


def test_an_evicted_card_comes_back_with_its_next_snapshot() -> None:
    worker, m = Worker(), Materializer(InMemoryFeatureStore(), max_cards=2)
    first = worker.card(0)
    apply_all(m, first)
    kept = {k: v for k, v in m.store.rows().items() if k[0] in (CARD, AMOUNT)}
    apply_all(m, worker.card(1))
    apply_all(m, worker.card(2))
    assert m.store.get(CARD, key(0)) is None and m.store.get(AMOUNT, f"{key(0)}|1000EUR") is None
    assert m.events_for(CARD, key(0)) == 0  # its partials went too
    apply_all(m, first)  # the compacted topic's snapshot of it, read again
    assert {k: v for k, v in m.store.rows().items() if k[1].startswith("fp-0|")} == kept
    assert cards_in(m.store) == {key(0), key(2)} and m.evicted == 2
    # A later update folds onto the worker's state, which never forgot it: all 3 events count.
    apply_all(m, worker.card(0, at=T0 + 60, amounts=(700,)))
    assert m.events_for(CARD, key(0)) == 3
    assert {k for k in amount_rows_in(m.store) if k.startswith("fp-0|")} == {
        f"{key(0)}|{a}EUR" for a in (700, 1000, 2500)
    }


def test_a_card_from_two_partitions_goes_whole() -> None:
    worker, m = Worker(), Materializer(InMemoryFeatureStore(), max_cards=1)
    apply_all(m, worker.fold([event("p0", T0, fingerprint="fp-0", amount_minor=1000)], partition=0))
    apply_all(m, worker.fold([event("p1", T0 + 1, fingerprint="fp-0", amount_minor=2500)], partition=1))
    assert m.events_for(CARD, key(0)) == 2 and len(amount_rows_in(m.store)) == 2
    apply_all(m, worker.card(1))
    assert cards_in(m.store) == {key(1)}
    assert amount_rows_in(m.store) == {f"{key(1)}|1000EUR", f"{key(1)}|2500EUR"}
    assert m.events_for(CARD, key(0)) == 0 and m.evicted == 1


def test_without_a_limit_every_card_is_kept() -> None:
    worker, m = Worker(), Materializer(InMemoryFeatureStore())
    for i in range(200):
        apply_all(m, worker.card(i, at=T0 + i))
    assert m.max_cards is None and m.cards == 200 and m.evicted == 0
    assert len(cards_in(m.store)) == 200 and len(amount_rows_in(m.store)) == 400


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_cards"):
        Materializer(InMemoryFeatureStore(), max_cards=0)


def test_memory_stays_bounded_over_50k_cards() -> None:
    worker, m = Worker(), Materializer(InMemoryFeatureStore(), max_cards=100)
    snaps = [events_pb2.FeatureSnapshot.FromString(raw) for raw in worker.card(0)]
    template = next(s for s in snaps if s.entity == CARD.value)
    apply_all(m, [s.SerializeToString() for s in snaps])  # the aggregate rows once
    aggregates = len(m.store) - 3

    def cards(start: int, stop: int) -> None:
        for i in range(start, stop):
            template.key = key(i)
            m.apply(template)

    cards(1, 10_000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cards(10_000, 60_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert m.cards == 100 and m.evicted == 60_000 - 100
    assert len(m.store) == aggregates + 100 * 3  # each card: its row and two amount rows
    # 50,000 more cards held would be ~50 MB (~1 KiB each, bench.card_memory); bounded: nothing.
    assert grown < 256 * 1024, grown


def test_the_server_setting_has_a_bounded_default() -> None:
    assert ServerSettings().max_cards == 1_000_000
    with pytest.raises(ValidationError):
        ServerSettings(max_cards=0)


async def test_the_server_bounds_its_replica_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHOPT_SERVER_MAX_CARDS", "2")
    settings = ServerSettings(port=0, decision_log=False, kafka=KafkaSettings.for_bootstrap("127.0.0.1:1"))
    server, _ = await create_server(settings)  # built, never started: no broker needed
    try:
        assert server.replica is not None and server.replica.materializer.max_cards == 2
        worker = Worker()
        for i in range(5):
            apply_all(server.replica.materializer, worker.card(i))
        sample = server.metrics.registry.get_sample_value
        assert sample("authopt_feature_cards") == 2
        assert sample("authopt_feature_cards_evicted_total") == 3
        status = server.replica.status()
        assert status["cards"] == 2 and status["cards_evicted"] == 3
    finally:
        await server.stop(grace=0)


async def test_an_evicted_card_is_decided_as_an_unknown_card(start_server: ServerFactory, model_dir) -> None:  # type: ignore[no-untyped-def]
    srv = await start_server(model_dir=model_dir)  # fresh route features
    m = Materializer(srv.features, max_cards=2)  # the server's store, as its replica fills it
    worker = Worker()
    # the sample request's card "fp-abc" at m-1, 125.00 EUR
    # (card rows only: the merchant and issuer rows, as of T0 too, would be read for any card)
    card = cards_only(worker.fold([event("abc", T0, fingerprint="fp-abc", amount_minor=12_500)]))
    apply_all(m, card)
    apply_all(m, cards_only(worker.card(1)))
    age_of_card_row = (time.time() - T0) * 1000

    held = await srv.stub.Recommend(make_request("r1"), timeout=5)
    assert held.feature_age_ms >= age_of_card_row  # the card's row (as of T0) was read
    apply_all(m, cards_only(worker.card(2)))  # the Recommend read fp-abc: card 1 goes, not it
    assert cards_in(srv.features) == {"fp-abc|m-1", key(2)}  # (rows(): not a read, unlike get)
    apply_all(m, cards_only(worker.card(3)))
    apply_all(m, cards_only(worker.card(4)))  # now fp-abc is the least recently used: evicted
    assert cards_in(srv.features) == {key(3), key(4)} and not amount_rows_in(srv.features) & {
        "fp-abc|m-1|12500EUR"
    }
    gone = await srv.stub.Recommend(make_request("r2"), timeout=5)
    unknown = make_request("r3")
    unknown.attempt.card.fingerprint = "fp-never-seen"
    never = await srv.stub.Recommend(unknown, timeout=5)
    for resp in (gone, never):
        assert resp.decision_source == optimizer_pb2.DECISION_SOURCE_MODEL
        assert 0 <= resp.feature_age_ms < 60_000  # only the fresh route rows were read
    assert [r.route_id for r in gone.routes] == [r.route_id for r in never.routes]
    apply_all(m, card)  # its snapshot again: known once more
    back = await srv.stub.Recommend(make_request("r4"), timeout=5)
    assert back.feature_age_ms >= age_of_card_row
