"""Time-to-react per route incident (`sim.react`): a policy that moves off a route a known time after
its incident starts, and back a known time after it ends, is measured at those times; static routing
never reacts; the oracle reacts within seconds; the world without route incidents is the same world."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from model.artifacts import DEFAULT_MODEL_DIR
from server import policy as server_policy
from sim import World
from sim.config import Episode, WorldConfig
from sim.evaluate import evaluate_world, write_results
from sim.play import AttemptView, Decision, play
from sim.policies import Oracle, Static, candidates
from sim.react import (
    incident_reactions,
    route_incidents,
    share_series,
    summarize_reactions,
    without_route_incidents,
)
from tests.conftest import small_default_world

START_H, MINUTES = 1.0, 40.0
REACT_S, RETURN_S = 300.0, 120.0


def world_with_incident() -> tuple[WorldConfig, str]:
    """The default world, smaller, with no random incidents and one scheduled degradation of the route
    most merchants route to first."""
    config = small_default_world(3000, 3, 3000)
    calm = without_route_incidents(config)
    world = World(calm, 1)
    busiest = Counter(world.route_ids[world.merchant_primary[p.merchant]] for p in world.payments())
    route = busiest.most_common(1)[0][0]
    episode = Episode(start_hour=START_H, minutes=MINUTES, severity=0.9)
    routes = [r.model_copy(update={"degradations": [episode]}) if r.id == route else r for r in calm.routes]
    return calm.model_copy(update={"routes": routes}), route


class Late(Static):
    """Static routing that, in the world with the incident, leaves the degraded route `REACT_S` after
    the incident starts and comes back `RETURN_S` after it ends (it reads the schedule: a stand-in
    with known reaction times)."""

    name = "late"

    def __init__(self, world: World, route: int, start: float, end: float) -> None:
        super().__init__()
        self.world, self.route_index, self.start, self.end = world, route, start, end

    def route(self, view: AttemptView) -> Decision:
        pick = super().route(view)
        away = view.world is self.world and self.start + REACT_S <= view.now < self.end + RETURN_S
        if away and pick.route == self.route_index and len(view.routes) > 1:
            return Decision(next(r for r in view.routes if r != self.route_index))
        return pick


class Shy(Oracle):
    """The oracle, except that in the world with the incident it stays off the degraded route until
    `return_s` after the incident ends (the next best route instead): what coming back late costs."""

    def __init__(self, world: World, route: int, start: float, end: float, return_s: float) -> None:
        super().__init__()
        self.world, self.route_index, self.start, self.end = world, route, start, end
        self.return_s = return_s
        self.name = f"shy-{return_s:.0f}"

    def route(self, view: AttemptView) -> Decision:
        w = view.world
        here = w is self.world and self.start <= view.now < self.end + self.return_s
        if not here or self.route_index not in view.routes or len(view.routes) < 2:
            return super().route(view)
        p = w.p_approve(view.payment, view.routes, view.now, view.belief)
        ranked = server_policy.rank_by_value(view.payment.amount_minor, candidates(view), p)
        avoid = w.route_ids[self.route_index]
        return Decision(next(w.route_index[r.route_id] for r in ranked if r.route_id != avoid))


@pytest.fixture(scope="module")
def played() -> tuple[World, list, dict, dict, str]:
    config, route = world_with_incident()
    world, calm = World(config, 1), World(without_route_incidents(config), 1)
    payments = world.payments()
    (incident,) = route_incidents(world, payments)
    r = world.route_index[route]

    def policies() -> dict:
        return {
            "static": Static(),
            "oracle": Oracle(),
            "late": Late(world, r, incident.start, incident.end),
            "shy-120": Shy(world, r, incident.start, incident.end, 120.0),
            "shy-900": Shy(world, r, incident.start, incident.end, 900.0),
        }

    results = {n: play(world, p, payments=payments) for n, p in policies().items()}
    without = {n: play(calm, p, payments=payments) for n, p in policies().items()}
    return world, payments, results, without, route


def test_the_world_without_route_incidents_is_the_same_world() -> None:
    config, _ = world_with_incident()
    a, b = World(config, 1), World(without_route_incidents(config), 1)
    pa, pb = a.payments(), b.payments()
    assert [(p.at, p.card, p.amount_minor) for p in pa] == [(p.at, p.card, p.amount_minor) for p in pb]
    assert a.draws(pa[7], 1) == b.draws(pb[7], 1)
    assert len(route_incidents(a, pa)) == 1 and route_incidents(b, pb) == []


def test_reaction_times_are_measured_where_they_happen(played: tuple) -> None:
    world, payments, results, without, route = played
    (row,) = incident_reactions(world, payments, results, without)
    assert row["route"] == route and row["minutes"] == MINUTES and row["payments"] > 500
    late = row["policies"]["late"]
    assert late["measured"] and late["share_before"] == 1.0
    assert late["react_s"] == pytest.approx(REACT_S, abs=15)  # ~1.5 payments a second on the route
    assert late["return_s"] == pytest.approx(RETURN_S, abs=15)
    static = row["policies"]["static"]
    assert static["measured"] and static["react_s"] is None and static["return_s"] is None
    assert static["lost_vs_oracle_pp"] > late["lost_vs_oracle_pp"] > 0  # reacting late still loses some
    oracle = row["policies"]["oracle"]
    assert oracle["react_s"] is not None and oracle["react_s"] < 30 and oracle["lost_vs_oracle_pp"] == 0
    # after the incident: the later a policy comes back to the better route, the more it loses
    soon, later = row["policies"]["shy-120"], row["policies"]["shy-900"]
    assert later["return_s"] == pytest.approx(900, abs=15) and soon["return_s"] == pytest.approx(120, abs=15)
    assert oracle["lost_after_vs_oracle_pp"] == 0 and soon["lost_vs_oracle_pp"] == later["lost_vs_oracle_pp"]
    assert later["lost_after_vs_oracle_pp"] > 2 * soon["lost_after_vs_oracle_pp"] > 0
    assert later["lost_before_vs_oracle_pp"] == soon["lost_before_vs_oracle_pp"] == 0  # the oracle's, then
    assert static["lost_before_vs_oracle_pp"] > 0  # static routing's usual gap
    assert row["isolated"]

    summary = summarize_reactions([row, row])
    assert summary["late"]["median_react_s"] == late["react_s"] and summary["late"]["reacted"] == 2
    assert summary["static"]["median_react_s"] is None and summary["static"]["measured"] == 2  # "never"
    assert summary["late"]["mean_lost_after_vs_oracle_pp"] == pytest.approx(late["lost_after_vs_oracle_pp"])
    apart = {**row, "isolated": False}
    summary = summarize_reactions([row, apart, apart])
    assert summary["late"]["isolated_measured"] == 1 and summary["late"]["measured"] == 3
    assert summary["shy-900"]["isolated_median_return_s"] == later["return_s"]


def test_incidents_close_to_another_are_not_isolated() -> None:
    config, route = world_with_incident()
    second = Episode(start_hour=START_H + MINUTES / 60 + 0.25, minutes=10.0, severity=0.9)  # 15 min after
    routes = [
        r.model_copy(update={"degradations": [*r.degradations, second]}) if r.id == route else r
        for r in config.routes
    ]
    world = World(config.model_copy(update={"routes": routes}), 1)
    payments = world.payments()
    rows = incident_reactions(world, payments, {"static": play(world, Static(), payments=payments)}, {})
    assert [row["isolated"] for row in rows] == [False, False]
    assert incident_reactions(world, payments, {}, {}, lookback_s=600)[0]["isolated"]  # 15 min > 10 min


def test_the_share_series_shows_the_step(played: tuple) -> None:
    world, payments, results, _, route = played
    (row,) = incident_reactions(world, payments, results, {})
    series = share_series(world, payments, results, route, row["start_s"], row["start_s"] + 60 * MINUTES)
    minutes, late = series["minutes"], series["share"]["late"]
    before = [y for m, y in zip(minutes, late, strict=True) if m < 0 and y is not None]
    away = [
        y for m, y in zip(minutes, late, strict=True) if REACT_S / 60 + 1 <= m < MINUTES and y is not None
    ]
    assert min(before) > 0.3 and max(away) == 0.0
    static = [
        y
        for m, y in zip(minutes, series["share"]["static"], strict=True)
        if 0 <= m < MINUTES and y is not None
    ]
    assert min(static) > 0.3  # static routing stays on the route through the incident
    assert len(minutes) == len(late) == pytest.approx(MINUTES + 60, abs=2)


@pytest.mark.slow
def test_evaluate_reports_the_reactions_with_a_plot(tmp_path: Path) -> None:
    config, route = world_with_incident()
    doc = evaluate_world(
        config, DEFAULT_MODEL_DIR, [1], policies=("static", "success-rate", "oracle", "authopt"), ope=False
    )
    (row,) = doc["reactions"]["incidents"]
    assert row["seed"] == 1 and row["route"] == route
    summary = doc["reactions"]["summary"]
    assert summary["static"]["reacted"] == 0 and summary["oracle"]["reacted"] == 1
    assert summary["authopt"]["measured"] == 1  # the bundled model routes to the busiest route
    write_results([doc], tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())["worlds"][0]
    assert saved["reactions"]["incidents"][0]["route"] == route and "_react_series" not in saved
    report = (tmp_path / "report.md").read_text()
    assert "| policy | incidents measured | reacted | median time-to-react (s)" in report
    assert f"| 1 | {route} | {START_H:.2f} | {MINUTES:.0f} |" in report
    assert (tmp_path / "default-incident-share.png").stat().st_size > 1000


def test_route_health_behind_a_round_robin_keeps_one_health_per_replica() -> None:
    """`Authopt(replicas=3)` plays route health as three servers behind the platform's round-robin:
    decisions and outcome reports each go to the next replica in turn, so each replica judges the
    route from its third of the outcomes, most of them without the expectation of the replica that
    made the decision (and demotes it on its own evidence, when it has enough:
    docs/model.md has the reaction with 1 and 3 replicas)."""
    from server.health import HealthSettings
    from server.models import load_model_dir
    from sim.policies import Authopt

    config, route = world_with_incident()
    world = World(config, 1)
    payments = world.payments()
    (incident,) = route_incidents(world, payments)
    window = [p for p in payments if incident.start - 1800 <= p.at < incident.start + 900]
    policy = Authopt(load_model_dir(DEFAULT_MODEL_DIR), seed=1, health=HealthSettings(), replicas=3)
    assert len(policy.healths) == 3
    observed, unexpected, asked, demoted_at = Counter(), Counter(), Counter(), {}
    for i, health in enumerate(policy.healths):

        def observe(*args, i=i, inner=health.observe, **kwargs):  # type: ignore[no-untyped-def]
            observed[i] += 1
            unexpected[i] += args[4] is None
            return inner(*args, **kwargs)

        def demoted(route_ids, issuer, now, i=i, inner=health.demoted):  # type: ignore[no-untyped-def]
            asked[i] += 1
            out = inner(route_ids, issuer, now)
            if route in out:
                demoted_at.setdefault(i, now)
            return out

        health.observe, health.demoted = observe, demoted  # type: ignore[method-assign]
    result = play(world, policy, payments=window)

    firsts = len(result.first_approved)
    assert sum(observed.values()) == firsts == len(window)
    assert all(0.28 < n / firsts < 0.39 for n in observed.values())  # about a third each (retries'
    # reports take their turns too)
    assert max(asked.values()) - min(asked.values()) <= 1  # decisions in turn too
    # only the replica that decided knows what it expected: about two outcomes in three reach
    # another one, which judges them against the route's usual rate instead
    assert 0.5 < sum(unexpected.values()) / firsts < 0.8
    assert demoted_at  # a replica demoted it from its own share of the outcomes
    assert all(incident.start <= t < incident.start + 900 for t in demoted_at.values())

    with pytest.raises(ValueError, match="replicas"):
        Authopt(load_model_dir(DEFAULT_MODEL_DIR), replicas=0)


def test_with_the_platform_echoing_the_expectation_every_replica_judges_against_it() -> None:
    """`Authopt(replicas=3, echo=True)`: the platform echoes each decision's expected approval in
    the outcome it reports (`AttemptOutcome.expected_approval`), so every replica that is reported a
    first attempt judges it against what the deciding replica expected, not the route's usual rate."""
    from server.health import HealthSettings
    from server.models import load_model_dir
    from sim.policies import Authopt

    config, _ = world_with_incident()
    world = World(config, 1)
    window = world.payments()[:300]
    model = load_model_dir(DEFAULT_MODEL_DIR)
    expectations: dict[bool, list[float | None]] = {True: [], False: []}
    for echo, seen in expectations.items():
        policy = Authopt(model, seed=1, health=HealthSettings(), replicas=3, echo=echo)
        for health in policy.healths:

            def observe(*args, inner=health.observe, seen=seen, **kwargs):  # type: ignore[no-untyped-def]
                seen.append(args[4])
                return inner(*args, **kwargs)

            health.observe = observe  # type: ignore[method-assign]
        play(world, policy, payments=window)
    assert len(expectations[True]) == len(expectations[False]) == len(window)
    assert all(e is not None and 0.0 < e < 1.0 for e in expectations[True])
    assert sum(e is None for e in expectations[False]) > len(window) / 2  # without it, most come bare
