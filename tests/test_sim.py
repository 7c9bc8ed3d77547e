"""The simulated world: config validation, determinism, exact ground truth, closed-loop play."""

from __future__ import annotations

import math
import statistics

import pytest

from authopt.v1 import attempt_pb2
from sim import BUILTIN_WORLDS, World, WorldConfigError, load_world, parse_world
from sim.config import WorldConfig
from sim.play import play
from sim.policies import Cheapest, Ladder, Logging, Oracle, Static, SuccessRate
from sim.world import APPROVED, DECLINED, ERROR
from streams.contract import HARD_CODES


def small(
    name: str = "default", *, payments_per_hour: float = 400, hours: float = 6, **cards: int
) -> WorldConfig:
    config = load_world(name)
    return config.model_copy(
        update={
            "traffic": config.traffic.model_copy(
                update={"payments_per_hour": payments_per_hour, "hours": hours}
            ),
            "cards": config.cards.model_copy(update={"count": cards.get("count", 3000)}),
        }
    )


@pytest.mark.parametrize("name", BUILTIN_WORLDS)
def test_builtin_worlds_load_and_differ(name: str) -> None:
    config = load_world(name)
    assert config.name == name
    world = World(config, 0)
    assert len(world.payments()) == round(config.traffic.payments_per_hour * config.traffic.hours)


def test_builtin_worlds_are_structurally_different() -> None:
    configs = {n: load_world(n) for n in BUILTIN_WORLDS}
    outages = {n: World(c, 0) for n, c in configs.items()}
    heavy = sum(map(len, outages["outage-heavy"].issuer_outages)) + sum(
        map(len, outages["outage-heavy"].route_degradations)
    )
    default = sum(map(len, outages["default"].issuer_outages)) + sum(
        map(len, outages["default"].route_degradations)
    )
    assert heavy > 2 * default

    def foreign_share(c: WorldConfig) -> float:
        country = {i.id: i.country for i in c.issuers}
        share = {i.id: i.share for i in c.issuers}
        total = sum(share.values())
        return sum(
            m.share * sum(share[i] for i in share if country[i] != m.country) / total for m in c.merchants
        ) / sum(m.share for m in c.merchants)

    assert foreign_share(configs["cross-border"]) > foreign_share(configs["default"]) + 0.15


BASE = load_world("default").model_dump(mode="json")


def _toml(doc: dict[str, object]) -> str:
    """A minimal TOML writer for the config shapes (tables, arrays of tables, inline scalars)."""
    import json

    lines: list[str] = []

    def scalar(v: object) -> str:
        return (
            json.dumps(v)
            if not isinstance(v, dict)
            else "{ " + ", ".join(f'"{k}" = {scalar(x)}' for k, x in v.items()) + " }"
        )

    def value(v: object) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return scalar(v)

    for k, v in doc.items():
        if not isinstance(v, dict | list) or (isinstance(v, list) and not (v and isinstance(v[0], dict))):
            lines.append(f"{k} = {value(v)}")
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"[[{k}]]")
                lines += [f"{kk} = {value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _broken(path: tuple[object, ...], value: object) -> str:
    import copy

    doc = copy.deepcopy(BASE)
    node: object = doc
    for key in path[:-1]:
        node = node[key]  # type: ignore[index]
    node[path[-1]] = value  # type: ignore[index]
    return _toml(doc)


def test_the_toml_writer_round_trips_the_default_world() -> None:
    assert parse_world(_toml(BASE)) == load_world("default")


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (
            ("routes", 1, "cost_bps"),
            -5,
            "routes[1].cost_bps: Input should be greater than or equal to 0 (got -5)",
        ),
        (("issuers", 0, "base_approval"), 1.5, "issuers[0].base_approval"),
        (("issuers", 2, "bins"), ["12345"], "issuers[2].bins[0]"),
        (("merchants", 0, "primary_route"), "acq-nowhere", "primary_route 'acq-nowhere' is not in routes"),
        (("merchants", 1, "routes"), ["acq-eu", "acq-mars"], "unknown route 'acq-mars'"),
        (("cards", "debit"), 0.9, "credit + debit + prepaid must be 1"),
        (("traffic", "hours"), 0, "traffic.hours"),
        (("declines", "funds_codes"), {"5": 1.0}, "'5' is not a two-character ISO 8583 response code"),
        (("traffic", "payments_per_hours"), 10, "traffic.payments_per_hours: Extra inputs are not permitted"),
        (
            ("start",),
            "2026-11-02T00:00:00",
            "start: Value error, needs a UTC offset".removeprefix("start: Value error, "),
        ),
    ],
)
def test_invalid_config_names_the_key_and_the_value(
    path: tuple[object, ...], value: object, needle: str
) -> None:
    with pytest.raises(WorldConfigError) as err:
        parse_world(_broken(path, value), "w.toml")
    assert needle in str(err.value)
    assert "invalid world config w.toml" in str(err.value)


def test_not_toml_and_missing_file_are_clear(tmp_path: object) -> None:
    with pytest.raises(WorldConfigError, match="not valid TOML"):
        parse_world("name = ", "x.toml")
    with pytest.raises(WorldConfigError, match="neither a built-in world"):
        load_world("no-such-world")


def test_same_seed_same_world_other_seed_other_traffic() -> None:
    config = small()
    a, b, c = World(config, 7), World(config, 7), World(config, 8)
    pa, pb, pc = a.payments(), b.payments(), c.payments()
    assert pa == pb
    assert [p.card for p in pa] != [p.card for p in pc]
    assert a.draws(pa[3], 2) == b.draws(pb[3], 2) != a.draws(pa[3], 1)


def test_ground_truth_matches_outcome_frequencies_first_and_retry() -> None:
    """The true P(approve) is what the draws realise: first attempts, and retries given a decline."""
    world = World(small(payments_per_hour=4000, hours=6, count=20000), 3)
    payments = world.payments()
    first_p, first_ok, retry_p, retry_ok = [], [], [], []
    for p in payments:
        route = world.eligible_routes(p)[0]
        belief = world.prior_belief(p)
        first_p.append(world.p_approve(p, [route], p.at, belief)[0])
        o = world.attempt(p, route, p.at, world.draws(p, 1), belief)
        first_ok.append(o.status == APPROVED)
        if o.status != APPROVED:
            later = p.at + 3 * 86400
            other = world.eligible_routes(p)[-1]
            retry_p.append(world.p_approve(p, [other], later, belief)[0])
            retry_ok.append(world.attempt(p, other, later, world.draws(p, 2), belief).status == APPROVED)
    for ps, oks in ((first_p, first_ok), (retry_p, retry_ok)):
        n = len(ps)
        se = math.sqrt(sum(x * (1 - x) for x in ps)) / n
        assert abs(sum(oks) / n - sum(ps) / n) < 4 * se + 1e-9, (sum(oks) / n, sum(ps) / n, n)


def test_decline_causes_behave_like_their_codes() -> None:
    """Hard declines never recover; insufficient funds recover on the next payday, not at once."""
    world = World(small(payments_per_hour=3000, hours=6, count=20000), 5)
    hard_later, funds_now, funds_later = [], [], []
    for p in world.payments():
        route = world.eligible_routes(p)[0]
        belief = world.prior_belief(p)
        o = world.attempt(p, route, p.at, world.draws(p, 1), belief)
        if o.stage == "persistent" and o.response_code in HARD_CODES:
            hard_later.append(world.p_approve(p, [route], p.at + 10 * 86400, belief)[0])
        elif o.stage == "funds":
            funds_now.append(world.p_approve(p, [route], p.at + 1, belief)[0])
            payday = min(t for t in world.payday_ts.tolist() if t > p.at - world.card_pay_shift[p.card])
            payday += world.card_pay_shift[p.card]
            funds_later.append(world.p_approve(p, [route], payday + 3600, belief)[0])
    assert hard_later and max(hard_later) < 0.05
    assert funds_now and statistics.fmean(funds_now) < 0.02
    assert statistics.fmean(funds_later) > 0.1 > 5 * statistics.fmean(funds_now)


def test_codes_statuses_and_macs_are_realistic() -> None:
    world = World(small(payments_per_hour=3000, hours=6, count=20000), 5)
    codes, statuses, macs = set(), set(), set()
    for p in world.payments():
        o = world.attempt(p, world.eligible_routes(p)[0], p.at, world.draws(p, 1), world.prior_belief(p))
        statuses.add(o.status)
        codes.add(o.response_code)
        macs.add(o.mastercard_mac)
        assert (o.status == DECLINED) == bool(o.response_code)
        if o.mastercard_mac:
            assert int(world.card_network[p.card]) == 2
    assert statuses == {APPROVED, DECLINED, ERROR}
    assert {"51", "05", "91", "96", "14", "54", "41", "43", "57", "62", "59"} <= codes
    assert {"03", "25"} <= macs


@pytest.fixture(scope="module")
def plays() -> dict[str, object]:
    world = World(small(payments_per_hour=600, hours=8), 11)
    payments = world.payments()
    return {
        pol.name: play(world, pol, payments=payments)
        for pol in (Static(), Cheapest(), SuccessRate(seed=1), Oracle(), Logging(seed=1))
    }


def test_the_oracle_is_the_limit_and_nobody_breaks_the_rules(plays: dict[str, object]) -> None:
    first = {n: sum(r.first_approved) / r.payments for n, r in plays.items()}  # type: ignore[attr-defined]
    truth = {n: sum(r.first_p_true) / r.payments for n, r in plays.items()}  # type: ignore[attr-defined]
    assert truth["oracle"] == pytest.approx(
        sum(plays["oracle"].first_best_p_true) / plays["oracle"].payments,
        abs=0.01,  # type: ignore[attr-defined]
    )
    for name in ("static", "cheapest", "success-rate", "logging"):
        assert truth["oracle"] > truth[name]
        assert first["oracle"] > first[name] - 0.01
    for r in plays.values():
        assert r.violations == 0, r.violation_examples  # type: ignore[attr-defined]


def test_every_policy_plays_the_same_payments(plays: dict[str, object]) -> None:
    amounts = {tuple(r.amount) for r in plays.values()}  # type: ignore[attr-defined]
    assert len(amounts) == 1


def test_ladder_retries_on_its_schedule_within_the_window() -> None:
    config = small(payments_per_hour=600, hours=8)
    world = World(config, 4)
    seen: list[tuple[bool, float]] = []

    class Spy(Static):
        def retry(self, view):  # type: ignore[no-untyped-def]
            plan = Ladder().retry(view)
            if plan is not None:
                seen.append((view.payment.recurring, plan.at - view.history[0].at))
            return plan

    r = play(world, Spy())
    assert r.violations == 0
    cit = [d for rec, d in seen if not rec]
    mit = [d for rec, d in seen if rec]
    assert cit and max(cit) <= config.traffic.cit_patience_s
    assert mit and all(d >= 86400 - 1 for d in mit)
    assert max(r.attempts) <= config.traffic.max_attempts


@pytest.mark.parametrize("name", sorted(BUILTIN_WORLDS))
def test_no_simulated_card_looks_like_a_card_number(name: str) -> None:
    """The server refuses anything that could be a PAN; a simulated card must never be one."""
    from server.validation import find_card_number
    from sim.play import attempt_message

    w = World(load_world(name), 7)
    for card in range(w.config.cards.count):
        assert find_card_number(attempt_pb2.Card(**w.card_fields(card))) is None, w.card_fields(card)  # type: ignore[arg-type]
    for p in w.payments()[:500]:
        assert find_card_number(attempt_message(w, p, 1)) is None


def test_incidents_are_listed_by_time_and_overlap() -> None:
    config = load_world("default")
    w = World(config, 1)
    t0 = config.start.timestamp()
    day = w.incidents(t0, t0 + 86_400)
    fixed = [i for i in day if i.kind == "issuer" and i.id == "us-bank-a"]
    assert [(i.start - t0, i.end - i.start, i.severity) for i in fixed] == [(14 * 3600, 35 * 60, 0.85)]
    assert [i.start for i in day] == sorted(i.start for i in day)
    inside = w.incidents(t0 + 14.2 * 3600, t0 + 14.2 * 3600 + 1)
    assert any(i.id == "us-bank-a" for i in inside)
    assert not any(i.id == "us-bank-a" for i in w.incidents(t0 + 15 * 3600, t0 + 16 * 3600))
