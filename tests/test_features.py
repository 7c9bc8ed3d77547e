"""Feature arithmetic (streams.features) and the worker core (streams.processor), no broker."""

from __future__ import annotations

import math
import random

import pytest

from authopt.v1 import events_pb2
from model.layout import INPUT_LAYOUT, AttemptContext, encode_rows
from streams.contract import CONTRACT_HASH, DECLINE_CLASSES, SMOOTHING_PSEUDO_ATTEMPTS, Entity
from streams.features import (
    MAX_RECENT,
    Attempt,
    EntityState,
    aggregate_updates,
    card_amount_rows,
    evaluate,
    from_snapshot,
    merge,
    recent_entry,
    to_snapshot,
)
from streams.processor import DeadReason, FeatureProcessor, table_key
from streams.replay import read_log, replay, replay_final, write_log
from tests.events import T0, event, random_events

HOUR, DAY = 3600.0, 86400.0


def _route_state(events: list[events_pb2.AttemptEvent]) -> EntityState:
    st = EntityState()
    for ev in events:
        a = Attempt.from_event(ev)
        for entity, _, inc in aggregate_updates(a):
            if entity is Entity.ROUTE:
                st.add(a.at, inc)
    return st


def test_decayed_rate_halves_per_half_life() -> None:
    st = _route_state(
        [event("a", T0, status="approved"), event("b", T0 + HOUR, status="declined", code="05")]
    )
    v = evaluate(Entity.ROUTE, st)
    assert v["attempts_1h"] == pytest.approx(1.5)  # the older attempt weighs 1/2 an hour later
    assert v["approval_rate_1h"] == pytest.approx(0.5 / 1.5)
    assert v["attempts_24h"] == pytest.approx(1 + 2 ** (-1 / 24))
    assert v["attempts_1m"] == pytest.approx(1 + 2.0**-60)
    assert st.as_of == T0 + HOUR


def test_no_data_is_not_zero_percent() -> None:
    v = evaluate(Entity.ROUTE, EntityState())
    assert v["attempts_5m"] == 0 and v["approval_rate_5m"] == 0.8  # the contract default, not 0 %
    declined = evaluate(Entity.ROUTE, _route_state([event("a", status="declined", code="05")]))
    assert declined["attempts_5m"] == 1 and declined["approval_rate_5m"] == 0.0


def test_error_rate_and_latency_p95() -> None:
    evs = [event(f"e{i}", T0, latency_ms=100) for i in range(95)]
    evs += [event(f"s{i}", T0, latency_ms=2400) for i in range(5)]
    evs += [event(f"x{i}", T0, status="error") for i in range(25)]
    v = evaluate(Entity.ROUTE, _route_state(evs))
    assert v["error_rate_5m"] == pytest.approx(25 / 125)
    assert 75 < v["latency_p95_ms_5m"] <= 100  # 95 of 100 timed answers took 100 ms
    slow = evaluate(Entity.ROUTE, _route_state([event(f"s{i}", T0, latency_ms=2400) for i in range(10)]))
    assert 2000 < slow["latency_p95_ms_5m"] <= 3000


def test_order_does_not_matter_and_partitions_merge() -> None:
    evs = random_events(300)
    forward = _route_state(evs)
    shuffled = evs[:]
    random.Random(1).shuffle(shuffled)
    backward = _route_state(shuffled)
    split = merge(
        Entity.ROUTE,
        [_route_state(shuffled[::3]), _route_state(shuffled[1::3]), _route_state(shuffled[2::3])],
    )
    for other in (backward, split):
        assert other.as_of == forward.as_of and other.events == forward.events
        for name, value in forward.sums.items():
            assert other.sums[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_issuer_decline_mix() -> None:
    st = EntityState()
    codes = ["51", "51", "05", "91", "96", "57", "14"]
    for i, code in enumerate(codes):
        a = Attempt.from_event(event(f"d{i}", T0, status="declined", code=code))
        for entity, _, inc in aggregate_updates(a):
            if entity is Entity.ISSUER:
                st.add(a.at, inc)
    v = evaluate(Entity.ISSUER, st)
    assert v["declines_1h"] == 7
    assert v["share_51_1h"] == pytest.approx(2 / 7) and v["share_05_1h"] == pytest.approx(1 / 7)
    assert v["share_91_96_1h"] == pytest.approx(2 / 7) and v["share_hard_1h"] == pytest.approx(1 / 7)


def _card(events: list[events_pb2.AttemptEvent]) -> EntityState:
    st = EntityState()
    for ev in events:
        st.add_recent(recent_entry(Attempt.from_event(ev)))
    return st


def test_card_windows_count_reattempts_after_declines() -> None:
    evs = [
        event("1", T0 - 20 * DAY, status="declined", code="51"),
        event("2", T0 - 19 * DAY, status="declined", code="51"),  # reattempt (30 d window)
        event("3", T0 - 2 * HOUR, status="declined", code="05"),  # reattempt, 18 d after #2
        event("4", T0, status="approved", amount_minor=2000),  # reattempt in 24 h
    ]
    v = evaluate(Entity.CARD_MERCHANT, _card(evs))
    assert v["reattempts_30d"] == 3 and v["reattempts_24h"] == 2
    assert v["last_decline_at"] == pytest.approx(T0 - 2 * HOUR)
    assert v["last_decline_class"] == DECLINE_CLASSES.index("do_not_honor")
    assert card_amount_rows(_card(evs)) == {
        "1000EUR": {"attempts_30d": 3.0},
        "2000EUR": {"attempts_30d": 1.0},
    }
    fresh = evaluate(Entity.CARD_MERCHANT, _card([event("a", T0)]))
    assert fresh == {
        "reattempts_24h": 0,
        "reattempts_30d": 0,
        "last_decline_at": -1.0,
        "last_decline_class": -1.0,
    }


def test_card_state_forgets_after_30_days_and_is_bounded() -> None:
    st = _card([event("old", T0 - 31 * DAY, status="declined", code="51"), event("new", T0)])
    assert [r.event_id for r in st.recent] == ["new"]
    many = _card([event(f"e{i}", T0 + i) for i in range(MAX_RECENT + 10)])
    assert len(many.recent) == MAX_RECENT and many.recent[-1].event_id == f"e{MAX_RECENT + 9}"


def test_snapshot_round_trip() -> None:
    card = _card(random_events(20))
    route = _route_state(random_events(50))
    for entity, st in ((Entity.CARD_MERCHANT, card), (Entity.ROUTE, route)):
        snap = to_snapshot(entity, "k", 3, st)
        assert snap.contract_hash == CONTRACT_HASH and snap.source_partition == 3
        back = from_snapshot(events_pb2.FeatureSnapshot.FromString(snap.SerializeToString()))
        assert back.as_of == st.as_of and back.recent == st.recent and back.events == st.events
        assert back.sums == pytest.approx(st.sums)


def _process(records: list[bytes], states: dict[bytes, bytes | None] | None = None):  # type: ignore[no-untyped-def]
    states = {} if states is None else states
    proc = FeatureProcessor(states)
    return proc.process(0, records, states.__setitem__), states


def test_processor_coalesces_one_snapshot_per_entity() -> None:
    evs = [event(f"e{i}", T0 + i, fingerprint=f"fp-{i % 2}") for i in range(10)]
    result, states = _process([e.SerializeToString() for e in evs])
    assert len(result.applied) == 10 and not result.dead
    kinds = sorted(k.decode().split(":", 1)[0] for k in result.snapshots)
    # one route, route x issuer, route x BIN and merchant; two cards; no declines -> no issuer row
    assert kinds == ["card_merchant", "card_merchant", "merchant", "route", "route_bin", "route_issuer"]
    snap = events_pb2.FeatureSnapshot.FromString(states[table_key(Entity.ROUTE, "acq-a", 0)] or b"")
    assert snap.events == 10 and snap.sums["attempts_24h"] == pytest.approx(
        sum(2 ** (-(9 - i) / DAY) for i in range(10))
    )


def test_processor_ignores_replayed_event_ids() -> None:
    first, states = _process([event("e1").SerializeToString(), event("e2", T0 + 1).SerializeToString()])
    again, _ = _process(
        [event("e2", T0 + 1).SerializeToString(), event("e3", T0 + 2).SerializeToString()], states
    )
    assert len(first.applied) == 2 and again.duplicates == 1 and [a.event_id for a in again.applied] == ["e3"]
    route = events_pb2.FeatureSnapshot.FromString(states[table_key(Entity.ROUTE, "acq-a", 0)] or b"")
    assert route.events == 3


def _events_of(states: dict[bytes, bytes | None], entity: Entity, key: str) -> int:
    raw = states.get(table_key(entity, key, 0))
    return events_pb2.FeatureSnapshot.FromString(raw).events if raw else 0


def _batch(n: int) -> list[bytes]:
    # Three cards, two routes, some declines: every kind of state is written by the batch.
    return [
        event(
            f"e{i}",
            T0 + i,
            fingerprint=f"fp-{i % 3}",
            route=f"acq-{'ab'[i % 2]}",
            status="declined" if i % 4 == 0 else "approved",
            code="05" if i % 4 == 0 else "",
        ).SerializeToString()
        for i in range(n)
    ]


@pytest.mark.parametrize("with_offsets", [True, False])
def test_a_replay_after_a_partial_write_counts_each_event_once(with_offsets: bool) -> None:
    """A worker killed while its batch's states reach the changelog one record at a time leaves any
    prefix of them written; the next owner replays the batch from the committed offset. With the
    records' offsets every state ends as if the batch were applied once; without them (the older
    way) some cuts count events twice (the double count chaos scenario 1b once saw) and others
    miss them (an aggregate whose write was lost, behind a card whose write was not)."""
    records, offsets = _batch(12), list(range(100, 112))
    writes: list[tuple[bytes, bytes]] = []
    wrong = {"twice": 0, "missing": 0}
    FeatureProcessor({}).process(
        0, records, lambda k, v: writes.append((k, v)), offsets if with_offsets else None, 100
    )
    exact = {key: events_pb2.FeatureSnapshot.FromString(v).events for key, v in writes}
    for cut in range(len(writes) + 1):
        table: dict[bytes, bytes | None] = dict(writes[:cut])
        FeatureProcessor(table).process(0, records, table.__setitem__, offsets if with_offsets else None, 100)
        counts = {key: events_pb2.FeatureSnapshot.FromString(table.get(key) or b"").events for key in exact}
        if with_offsets:
            assert counts == exact, cut
        wrong["twice"] += any(counts[k] > exact[k] for k in exact)
        wrong["missing"] += any(counts[k] < exact[k] for k in exact)
    assert _events_of(dict(writes), Entity.ROUTE, "acq-a") == 6
    if not with_offsets:  # the older way counts some twice and misses others: what offsets are for
        assert wrong["twice"] and wrong["missing"], wrong


def test_the_same_event_at_another_offset_is_a_second_report() -> None:
    states: dict[bytes, bytes | None] = {}
    proc = FeatureProcessor(states)
    rec = event("e1").SerializeToString()
    first = proc.process(
        0, [rec, event("e2", T0 + 1).SerializeToString(), rec], states.__setitem__, [5, 6, 7], 5
    )
    assert len(first.applied) == 2 and first.duplicates == 1
    again = FeatureProcessor(states).process(
        0, [rec, event("e2", T0 + 1).SerializeToString(), rec], states.__setitem__, [5, 6, 7], 5
    )
    assert again.applied == [] and again.duplicates == 3
    assert _events_of(states, Entity.ROUTE, "acq-a") == 2


def test_records_past_a_gap_do_not_claim_the_skipped_offsets() -> None:
    """Offsets 4-6 skipped (the worker seeks back for them): 7-9 are applied without moving any
    state's offset past 4, so 4-6 count when they come, and 7-9 again are duplicates."""
    records = _batch(10)
    states: dict[bytes, bytes | None] = {}
    proc = FeatureProcessor(states)
    proc.process(0, records[:4] + records[7:], states.__setitem__, [0, 1, 2, 3, 7, 8, 9], 0)
    assert _events_of(states, Entity.MERCHANT, "m-1") == 7
    again = proc.process(0, records[4:], states.__setitem__, list(range(4, 10)), 4)
    assert len(again.applied) == 3 and again.duplicates == 3
    assert _events_of(states, Entity.MERCHANT, "m-1") == 10


def test_a_dead_letter_is_no_gap() -> None:
    states: dict[bytes, bytes | None] = {}
    records = [event("e0").SerializeToString(), b"\xff junk", event("e2", T0 + 2).SerializeToString()]
    result = FeatureProcessor(states).process(0, records, states.__setitem__, [0, 1, 2], 0)
    assert len(result.dead) == 1 and len(result.applied) == 2
    route = events_pb2.FeatureSnapshot.FromString(states[table_key(Entity.ROUTE, "acq-a", 0)] or b"")
    assert route.next_offset == 3  # the offset moved on past the dead letter: no gap was seen


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        (b"\xff\xff not protobuf", DeadReason.UNDECODABLE, "AttemptEvent"),
        (event("").SerializeToString(), DeadReason.MISSING_FIELD, "outcome.event_id"),
        (event("x", route="").SerializeToString(), DeadReason.MISSING_FIELD, "outcome.route_id"),
        (event("x", fingerprint="").SerializeToString(), DeadReason.MISSING_FIELD, "fingerprint"),
        (event("x", amount_minor=-5).SerializeToString(), DeadReason.NEGATIVE_AMOUNT, "-5"),
        (
            event("x", T0 + 3600, received_at=T0).SerializeToString(),
            DeadReason.EVENT_IN_FUTURE,
            "3600s after",
        ),
        (
            event("x", T0 - 7200, received_at=T0).SerializeToString(),
            DeadReason.EVENT_TOO_LATE,
            "7200s before",
        ),
    ],
)
def test_processor_dead_letters(record: bytes, reason: DeadReason, field: str) -> None:
    result, _ = _process([event("ok").SerializeToString(), record])
    assert len(result.applied) == 1 and len(result.dead) == 1
    dead = result.dead[0]
    assert dead.index == 1 and dead.reason is reason and field in dead.detail


def test_out_of_order_within_lateness_is_applied_exactly() -> None:
    late = event("late", T0 - 1800, received_at=T0 + 10)
    result, states = _process([event("now", T0).SerializeToString(), late.SerializeToString()])
    assert len(result.applied) == 2
    route = from_snapshot(
        events_pb2.FeatureSnapshot.FromString(states[table_key(Entity.ROUTE, "acq-a", 0)] or b"")
    )
    assert route.as_of == T0 and route.sums["attempts_1h"] == pytest.approx(1 + 2**-0.5)


def test_replay_is_point_in_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    evs = random_events(200)
    path = tmp_path / "log.bin"
    assert write_log(path, evs) == 200
    records = list(read_log(path))
    assert records == [e.SerializeToString() for e in evs]
    seen_counts = []
    for i, (record, store) in enumerate(replay(records)):
        ev = evs[i]
        row = store.get(Entity.ROUTE, ev.outcome.route_id)
        # everything in the store is from earlier records: never this one, never a later one
        before = [e for e in evs[:i] if e.outcome.route_id == ev.outcome.route_id]
        if not before:
            assert row is None
        else:
            assert row is not None and row.as_of == max(Attempt.from_event(e).at for e in before)
        card = store.get(
            Entity.CARD_MERCHANT, f"{ev.outcome.attempt.card.fingerprint}|{ev.outcome.attempt.merchant.id}"
        )
        seen_counts.append(0 if card is None else 1)
        assert record == ev.SerializeToString()
    assert 0 < sum(seen_counts) < 200


def test_replay_final_matches_direct_arithmetic() -> None:
    evs = random_events(150)
    store = replay_final([e.SerializeToString() for e in evs])
    for route in ("acq-a", "acq-b", "acq-c"):
        row = store.get(Entity.ROUTE, route)
        direct = evaluate(Entity.ROUTE, _route_state([e for e in evs if e.outcome.route_id == route]))
        assert row is not None and dict(row.values) == pytest.approx(direct)
        assert store.age_s(Entity.ROUTE, route, now=row.as_of + 5) == pytest.approx(5)
    assert store.age_s(Entity.ROUTE, "never-seen") is None


def _ctx(at: float = T0) -> AttemptContext:
    return AttemptContext(1000, 1, 1, 1, 1, False, False, False, 1, 0, at=at)


def test_layout_smooths_sparse_pairs_toward_the_route() -> None:
    i = INPUT_LAYOUT.index("route_issuer.approval_rate_1h")
    route = {"approval_rate_1h": 0.9, "attempts_1h": 500.0}
    cold = encode_rows(_ctx(), [("acq-a", 0, {Entity.ROUTE: route})], {})[0][i]
    assert cold == pytest.approx(0.9)  # no pair data: the route's rate
    few = {"approval_rate_1h": 0.0, "attempts_1h": 2.0}
    k = SMOOTHING_PSEUDO_ATTEMPTS
    x = encode_rows(_ctx(), [("acq-a", 0, {Entity.ROUTE: route, Entity.ROUTE_ISSUER: few})], {})[0][i]
    assert x == pytest.approx(k * 0.9 / (2 + k))
    many = {"approval_rate_1h": 0.2, "attempts_1h": 10_000.0}
    y = encode_rows(_ctx(), [("acq-a", 0, {Entity.ROUTE: route, Entity.ROUTE_ISSUER: many})], {})[0][i]
    assert y == pytest.approx(0.2, abs=1e-3)


def test_layout_turns_decline_time_into_age_and_class_one_hot() -> None:
    row = {"last_decline_at": T0 - 600, "last_decline_class": float(DECLINE_CLASSES.index("hard"))}
    x = encode_rows(_ctx(T0), [("acq-a", 0, {})], {Entity.CARD_MERCHANT: row})[0]
    assert x[INPUT_LAYOUT.index("card_merchant.last_decline_age_s")] == pytest.approx(600)
    assert x[INPUT_LAYOUT.index("card_merchant.last_decline_class.hard")] == 1.0
    assert sum(x[INPUT_LAYOUT.index(f"card_merchant.last_decline_class.{c}")] for c in DECLINE_CLASSES) == 1.0
    none = encode_rows(_ctx(T0), [("acq-a", 0, {})], {})[0]
    assert none[INPUT_LAYOUT.index("card_merchant.last_decline_age_s")] == -1.0
    assert not any(math.isnan(v) for v in none)


def test_sums_stay_exact_over_days_of_events_in_any_order() -> None:
    # Long runs move the state's internal reference time (every ~8.5 h for the 1-minute rate).
    times = [T0 + i * 1800.0 for i in range(150)]  # 3 days, one attempt every 30 minutes
    for order in (times, times[::-1], times[::2] + times[1::2]):
        st = EntityState()
        for t in order:
            st.add(t, {"attempts_1m": 1.0, "attempts_1h": 1.0, "attempts_24h": 1.0})
        as_of = max(times)
        assert st.as_of == as_of
        for name, h in (("attempts_1m", 60.0), ("attempts_1h", 3600.0), ("attempts_24h", 86400.0)):
            expected = sum(2 ** (-(as_of - t) / h) for t in times)
            assert st.sums[name] == pytest.approx(expected, rel=1e-12), (name, order[:2])
