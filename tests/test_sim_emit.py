"""sim.emit and sim.wire: the open-loop Logging-policy log is the closed loop's events, bytes, rules."""

from __future__ import annotations

import io
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from authopt.v1 import events_pb2
from model.layout import DELAY_BUCKETS_S
from server import rules
from sim import World, load_world
from sim.emit import EmitStats, emit_log
from sim.play import RuleCounters, _event
from sim.wire import EventEncoder, encode_event
from sim.world import APPROVED, DECLINED, ERROR, Belief, Outcome, Payment
from streams.replay import ReplayStats, read_log, replay, replay_final

_DAY = 86_400
_NETWORK = {1: "visa", 2: "mastercard"}


def _small_world(payments: int = 2000, cards: int = 3000, *, name: str = "default", seed: int = 7) -> World:
    base = load_world("default")
    config = base.model_copy(
        update={
            "name": name,
            "traffic": base.traffic.model_copy(update={"payments_per_hour": payments / base.traffic.hours}),
            "cards": base.cards.model_copy(update={"count": cards}),
        }
    )
    return World(config, seed)


@pytest.fixture(scope="module")
def world() -> World:
    return _small_world()


@pytest.fixture(scope="module")
def hot_world() -> World:
    """Few cards: the same card pays the same merchant often, so the rules' counters bind."""
    return _small_world(3000, 20, seed=11)


def _emit(world: World, seed: int = 0) -> tuple[bytes, EmitStats]:
    buf = io.BytesIO()
    stats = emit_log(world, buf, seed=seed)
    return buf.getvalue(), stats


@pytest.fixture(scope="module")
def emitted(world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EmitStats]:
    path = tmp_path_factory.mktemp("emit") / "log.bin"
    with path.open("wb") as out:
        stats = emit_log(world, out, seed=3)
    return path, stats


class _Tried:
    """One record of the log, its exact attempt time recovered and its scalar replay."""

    def __init__(self, raw: bytes, event: events_pb2.AttemptEvent, at: float, outcome: Outcome) -> None:
        self.raw, self.event, self.at, self.outcome = raw, event, at, outcome


def _replayed(world: World, path: Path) -> tuple[list[_Tried], dict[int, list[_Tried]]]:
    """Every record, in log order, with the exact attempt time (the first try is at payment.at, a retry
    at a delay bucket after the one before: the only delay that gives the recorded nanoseconds) and the
    outcome of the scalar `World.attempt` with the payment's `Belief` carried in attempt order."""
    pays = {p.index: p for p in world.payments()}
    beliefs: dict[int, Belief] = {}
    chains: dict[int, list[_Tried]] = defaultdict(list)
    log: list[_Tried] = []
    for raw in read_log(path):
        ev = events_pb2.AttemptEvent.FromString(raw)
        o = ev.outcome
        j = int(o.request_id.removeprefix("pay-"))
        p = pays[j]
        chain = chains[j]
        number = o.attempt.attempt_number
        assert number == len(chain) + 1, f"payment {j}: attempt {number} after {len(chain)}"
        nanos = o.attempted_at.ToNanoseconds()
        if number == 1:
            at = p.at
        else:
            fits = [chain[-1].at + d for d in DELAY_BUCKETS_S if int((chain[-1].at + d) * 1e9) == nanos]
            assert fits, f"payment {j}: attempt {number} is not a delay bucket after the one before"
            at = fits[0]
        assert int(at * 1e9) == nanos
        route = world.route_index[o.route_id]
        belief = beliefs.setdefault(j, world.prior_belief(p))
        outcome = world.attempt(p, route, at, world.draws(p, number), belief)
        tried = _Tried(raw, ev, at, outcome)
        chain.append(tried)
        log.append(tried)
    return log, chains


# --- the encoder against the generated code ---------------------------------------------------------


def _outcomes(world: World) -> list[Outcome]:
    out = [Outcome(APPROVED, "", "", 231, "approved"), Outcome(ERROR, "", "", 8000, "error")]
    out += [Outcome(APPROVED, "", "", lat, "approved") for lat in (0, 1, 127, 128, 16383, 16384)]
    for code in world.codes_all:
        for mac in ("", "03", "25"):
            out.append(Outcome(DECLINED, code, mac, 412, "transient"))
    return out


def test_encode_event_is_play_event_bytes(world: World) -> None:
    pays = world.payments()
    visa = [p for p in pays if world.card_network[p.card] == 1]
    mastercard = [p for p in pays if world.card_network[p.card] == 2]
    sample = [
        visa[0],
        mastercard[0],
        next(p for p in pays if p.recurring),
        next(p for p in pays if p.channel == 3),
    ]
    sample += [pays[-1], Payment(10**12 + 7, pays[0].at, 0, 5, 123_456_789_012, False, 1, 0.5, 0.5)]
    times = [pays[0].at, 1_790_000_000.0, 1_790_000_000.123456789, 0.5, 1e-9, 2_000_000_000.999]
    for p in sample:
        for k, o in enumerate(_outcomes(world)):
            number = (1, 2, 9, 10, 20, 127, 128, 300, 5000, 2**32 - 1)[k % 10]
            route = k % len(world.route_ids)
            at = times[k % len(times)]
            want = _event(world, p, number, route, at, o)
            got = encode_event(world, p, number, route, at, o)
            assert got == want, (p, number, route, at, o)
            assert events_pb2.AttemptEvent.FromString(got) == events_pb2.AttemptEvent.FromString(want)


def test_encode_event_names_and_seeds_of_any_length() -> None:
    w = _small_world(50, 40, name="wörld-" + "x" * 150, seed=12_345_678_901)
    p = w.payments()[3]
    o = Outcome(DECLINED, "51", "25", 300, "funds")
    assert encode_event(w, p, 2, 1, p.at + 3600, o) == _event(w, p, 2, 1, p.at + 3600, o)


def test_batch_encoding_is_the_records_one_after_the_other(world: World) -> None:
    pays = world.payments()[:50]
    enc = EventEncoder(world, pays)
    rng = np.random.default_rng(0)
    n = 400
    pos = rng.integers(0, len(pays), n)
    number = rng.integers(1, 5, n)
    route = rng.integers(0, len(world.route_ids), n)
    at = np.array([pays[j].at for j in pos]) + rng.choice(DELAY_BUCKETS_S, n)
    status = rng.choice([APPROVED, DECLINED, ERROR], n)
    code = np.where(status == DECLINED, rng.integers(0, len(world.codes_all), n), -1)
    mac = np.where(status == DECLINED, rng.choice([0, 3, 25], n), 0)
    latency = rng.integers(0, 9000, n)
    records = _records(enc.encode(pos, number, route, at, status, code, mac, latency).tobytes())
    assert len(records) == n
    for i, raw in enumerate(records):
        o = Outcome(
            int(status[i]),
            world.codes_all[code[i]] if code[i] >= 0 else "",
            f"{mac[i]:02d}" if mac[i] else "",
            int(latency[i]),
            "",
        )
        assert raw == _event(world, pays[pos[i]], int(number[i]), int(route[i]), float(at[i]), o)


def _records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        size = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append(data[pos : pos + size])
        pos += size
    return out


# --- the log -----------------------------------------------------------------------------------------


def test_records_are_what_the_closed_loop_would_write(world: World, emitted: tuple[Path, EmitStats]) -> None:
    """Every record: the scalar `World.attempt` of the same (payment, number, route, time, belief)
    gives the same outcome, and `play._event` the same bytes."""
    path, stats = emitted
    log, chains = _replayed(world, path)
    pays = {p.index: p for p in world.payments()}
    assert len(log) == stats.attempts and len(chains) == stats.payments == len(pays)
    for t in log:
        o = t.event.outcome
        got = (o.status, o.response_code, o.mastercard_mac, o.latency_ms)
        assert got == (
            t.outcome.status,
            t.outcome.response_code,
            t.outcome.mastercard_mac,
            t.outcome.latency_ms,
        )
        p = pays[int(o.request_id[4:])]
        number = o.attempt.attempt_number
        assert t.raw == _event(world, p, number, world.route_index[o.route_id], t.at, t.outcome)
    statuses = [t.outcome.status for t in log]
    assert stats.approved == statuses.count(APPROVED)
    assert stats.by_status == {
        name: statuses.count(s)
        for s, name in ((APPROVED, "approved"), (DECLINED, "declined"), (ERROR, "error"))
        if s in statuses
    }
    assert stats.bytes == path.stat().st_size
    assert stats.seconds > 0


def test_log_is_in_attempt_time_order(world: World, emitted: tuple[Path, EmitStats]) -> None:
    log, _ = _replayed(world, emitted[0])
    keys = [(t.at, int(t.event.outcome.request_id[4:]), t.event.outcome.attempt.attempt_number) for t in log]
    assert keys == sorted(keys)


def _check_retries(world: World, path: Path) -> int:
    """Retries only after a failure, at a delay bucket, within the window, at most max_attempts, never
    where the network rules (with the card's counters from the log itself) forbid; returns retries."""
    tc = world.config.traffic
    pays = {p.index: p for p in world.payments()}
    log, chains = _replayed(world, path)
    for j, chain in chains.items():
        p = pays[j]
        window = tc.mit_patience_days * _DAY if p.recurring else tc.cit_patience_s
        assert 1 <= len(chain) <= tc.max_attempts
        assert chain[0].at == p.at
        for prev, nxt in itertools.pairwise(chain):
            assert prev.outcome.status != APPROVED
            assert nxt.at - prev.at in DELAY_BUCKETS_S
            assert nxt.at - p.at <= window
    counters = RuleCounters()
    retries = 0
    for t in log:
        o = t.event.outcome
        p = pays[int(o.request_id[4:])]
        number = o.attempt.attempt_number
        counters.add(p, number, t.at)
        chain = chains[p.index]
        if number == len(chain) or t.outcome.status == ERROR:
            continue
        retries += 1
        network = _NETWORK.get(int(world.card_network[p.card]), "other")
        decline = rules.Decline(t.outcome.response_code, t.outcome.mastercard_mac, 0, t.at)
        c = rules.evaluate_retry(network, decline, counters.at(p, t.at), t.at)
        assert c.allowed, f"payment {p.index} retried after attempt {number}: {c.reason}"
        assert chain[number].at >= c.earliest_at, c.reason
    return retries


def test_retries_follow_the_policy_and_the_rules(world: World, emitted: tuple[Path, EmitStats]) -> None:
    assert _check_retries(world, emitted[0]) > 50


def test_counter_limits_bind_where_cards_repeat(hot_world: World, tmp_path: Path) -> None:
    path = tmp_path / "hot.bin"
    with path.open("wb") as out:
        stats = emit_log(hot_world, out, seed=1)
    assert stats.hot_payments > 0 and stats.limit_refusals > 0
    _check_retries(hot_world, path)


def test_every_eligible_route_is_tried(world: World, emitted: tuple[Path, EmitStats]) -> None:
    pays = {p.index: p for p in world.payments()}
    seen: dict[tuple[int, int], set[int]] = defaultdict(set)
    count: dict[tuple[int, int], int] = defaultdict(int)
    for raw in read_log(emitted[0]):
        o = events_pb2.AttemptEvent.FromString(raw).outcome
        p = pays[int(o.request_id[4:])]
        key = (p.merchant, int(world.card_network[p.card]))
        seen[key].add(world.route_index[o.route_id])
        count[key] += 1
    checked = 0
    for p in pays.values():
        key = (p.merchant, int(world.card_network[p.card]))
        if count[key] >= 100:
            assert seen[key] == set(world.eligible_routes(p)), key
            checked += 1
    assert checked > len(pays) / 2


def test_same_seed_same_bytes_other_seed_other_log(world: World) -> None:
    a, stats = _emit(world, seed=5)
    b, _ = _emit(world, seed=5)
    c, _ = _emit(world, seed=6)
    assert a == b and a != c
    assert len(a) == stats.bytes


def test_subset_of_payments(world: World) -> None:
    pays = world.payments()[100:160]
    buf = io.BytesIO()
    stats = emit_log(world, buf, payments=pays, progress=lambda done: None)
    got = {
        int(events_pb2.AttemptEvent.FromString(r).outcome.request_id[4:]) for r in _records(buf.getvalue())
    }
    assert got == {p.index for p in pays} and stats.payments == 60
    empty = io.BytesIO()
    assert emit_log(world, empty, payments=[]).attempts == 0 and empty.getvalue() == b""


def test_log_replays_without_dead_letters(emitted: tuple[Path, EmitStats]) -> None:
    path, stats = emitted
    replay_stats = ReplayStats()
    for _ in replay(read_log(path), stats=replay_stats):
        pass
    assert replay_stats.dead == {} and replay_stats.duplicates == 0
    assert replay_stats.applied == stats.attempts
    store = replay_final(read_log(path))
    assert store is not None
