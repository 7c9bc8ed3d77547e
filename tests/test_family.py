"""The random world family (sim/family.py, `authopt world random`): every draw valid, playable and
the same for the same seed, the TOML round trip exact, the family varied, the ranges documented."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cli.main import main
from sim import World
from sim.config import parse_world
from sim.family import RANGES, random_world, world_toml
from sim.play import play
from sim.policies import Oracle, Static

ROOT = Path(__file__).resolve().parent.parent


def test_every_draw_is_valid_the_same_for_its_seed_and_round_trips_through_toml() -> None:
    for seed in range(120):
        config = random_world(seed)  # WorldConfig's own checks ran
        assert random_world(seed) == config
        assert parse_world(world_toml(config), f"random-{seed}") == config, seed
        networks = {i.network for i in config.issuers}
        routes = {r.id: r for r in config.routes}
        for m in config.merchants:  # each merchant can route each card its issuers issue
            assert all(any(n in routes[r].networks for r in m.routes) for n in networks), (seed, m.id)
    assert random_world(1) != random_world(2)


def test_the_family_spans_its_ranges() -> None:
    worlds = [random_world(seed) for seed in range(60)]
    assert {len(w.routes) for w in worlds} == {2, 3, 4, 5}
    assert {len(w.issuers) for w in worlds} == set(range(3, 9))
    assert {len(w.merchants) for w in worlds} == set(range(3, 9))
    approvals = [i.base_approval for w in worlds for i in w.issuers]
    low, high = RANGES["issuer.base_approval"]
    assert low <= min(approvals) < low + 0.03 and high - 0.03 < max(approvals) <= high
    assert len({m.currency for w in worlds for m in w.merchants}) >= 8
    assert any(m.recurring_share > 0.4 for w in worlds for m in w.merchants)


def test_a_drawn_world_plays_and_routing_matters_in_it() -> None:
    for seed in (0, 1, 2):
        world = World(random_world(seed, payments_per_hour=600, hours=1, cards=2_000), 1)
        payments = world.payments()
        static, oracle = play(world, Static(), payments=payments), play(world, Oracle(), payments=payments)
        assert len(static.first_approved) == len(payments) >= 500
        assert sum(oracle.first_approved) > sum(static.first_approved), seed


def test_authopt_world_random_writes_what_load_world_reads(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["world", "random", "--seed", "3", "--hours", "6"])
    assert shown.exit_code == 0, shown.output
    assert parse_world(shown.output) == random_world(3, hours=6)
    out = tmp_path / "w.toml"
    written = runner.invoke(main, ["world", "random", "--seed", "3", "--out", str(out)])
    assert written.exit_code == 0 and parse_world(out.read_text()) == random_world(3)
    checked = runner.invoke(main, ["world", "check", str(out)])
    assert checked.exit_code == 0 and "world 'random-3'" in checked.output
    assert runner.invoke(main, ["world", "random", "--seed", "-1"]).exit_code == 2


def test_every_range_is_documented() -> None:
    doc = (ROOT / "docs" / "simulator.md").read_text()
    missing = [name for name in RANGES if f"`{name}`" not in doc]
    assert not missing, f"docs/simulator.md does not list {missing}"
