"""The route column's selection correction: its arithmetic, its fit, the manifest and the server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model import Manifest, make_tiny_artifact
from server.decision import model_scores
from server.models import load_model_dir
from server.policy import SelectionCorrection, shift_logits
from server.selection import (
    MIN_DECISIONS,
    Decisions,
    chosen_ece,
    fit_correction,
    fit_correction_by_issuer,
)
from tests.conftest import ROUTES, ServerFactory, make_request


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_identity_changes_nothing() -> None:
    p = [0.9, 0.42, 0.7]
    assert SelectionCorrection().is_identity
    assert SelectionCorrection().apply(p) == p


def test_correction_keeps_the_order_and_shrinks_the_differences() -> None:
    p = [0.9, 0.42, 0.7, 0.55]
    c = SelectionCorrection(intercept=0.1, mean_scale=1.2, spread_scale=0.5)
    q = c.apply(p)
    assert sorted(range(4), key=lambda i: q[i]) == sorted(range(4), key=lambda i: p[i])
    z, zq = [_logit(v) for v in p], [_logit(v) for v in q]
    m = sum(z) / 4
    for i in range(4):
        assert zq[i] == pytest.approx(0.1 + 1.2 * m + 0.5 * (z[i] - m))
        assert zq[i] - zq[0] == pytest.approx(0.5 * (z[i] - z[0]))
    # One candidate: no spread, only intercept and mean scale.
    assert _logit(c.apply([0.8])[0]) == pytest.approx(0.1 + 1.2 * _logit(0.8))
    # Extreme inputs stay probabilities.
    assert all(0.0 < v < 1.0 for v in c.apply([0.0, 1.0, 1e-12]))


def _winners_curse(rng: np.random.Generator, n: int, noise: float) -> tuple[Decisions, float]:
    """Decisions of a policy that picks the highest of noisy estimates of 3-4 routes' true logits;
    returns them and the chosen routes' mean true probability."""
    d = Decisions()
    true_chosen = []
    for _ in range(n):
        k = int(rng.integers(3, 5))
        t = rng.normal(1.3, 0.5, size=k)
        z = t + rng.normal(0, noise, size=k)
        c = int(np.argmax(z))
        p_true = 1 / (1 + math.exp(-t[c]))
        d.route_p.append([float(1 / (1 + math.exp(-v))) for v in z])
        d.chosen.append(c)
        d.approved.append(bool(rng.random() < p_true))
        true_chosen.append(p_true)
    return d, float(np.mean(true_chosen))


def test_fit_removes_the_winners_curse_on_fresh_decisions() -> None:
    rng = np.random.default_rng(7)
    train, _ = _winners_curse(rng, 20_000, noise=0.5)
    fresh, true_mean = _winners_curse(rng, 20_000, noise=0.5)
    c = fit_correction(train)
    assert 0 < c.spread_scale < 0.9  # noise in the estimates: their differences are shrunk
    before = np.mean([p[i] for p, i in zip(fresh.route_p, fresh.chosen, strict=True)])
    after = np.mean([c.apply(p)[i] for p, i in zip(fresh.route_p, fresh.chosen, strict=True)])
    assert before - true_mean > 0.03  # the chosen route's estimate is biased upward ...
    assert abs(after - true_mean) < 0.01  # ... and the correction removes it out of sample
    assert chosen_ece(fresh, c) < 0.5 * chosen_ece(fresh, SelectionCorrection())


def test_fit_recovers_known_parameters() -> None:
    rng = np.random.default_rng(3)
    want = SelectionCorrection(-0.2, 1.1, 0.7)
    d = Decisions()
    for _ in range(30_000):
        p = rng.uniform(0.3, 0.97, size=3).tolist()
        c = int(np.argmax(p))
        d.route_p.append(p)
        d.chosen.append(c)
        d.approved.append(bool(rng.random() < want.apply(p)[c]))
    got = fit_correction(d)
    assert got.intercept == pytest.approx(want.intercept, abs=0.15)
    assert got.mean_scale == pytest.approx(want.mean_scale, abs=0.1)
    assert got.spread_scale == pytest.approx(want.spread_scale, abs=0.1)
    assert fit_correction(d) == got  # deterministic


def test_weights_count_a_decision_as_often_as_its_weight() -> None:
    """Importance weights (a log's decisions weighted by 1 / propensity) are frequency weights."""
    rng = np.random.default_rng(11)
    d, _ = _winners_curse(rng, 3000, noise=0.5)
    twice = Decisions(
        d.route_p + d.route_p[:1000], d.chosen + d.chosen[:1000], d.approved + d.approved[:1000]
    )
    weighted = Decisions(d.route_p, d.chosen, d.approved, weight=[2.0] * 1000 + [1.0] * 2000)
    a, b = fit_correction(twice), fit_correction(weighted)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-9)
    assert a != fit_correction(d)


def test_fit_is_the_identity_without_enough_evidence() -> None:
    few = Decisions(
        [[0.9, 0.5]] * (MIN_DECISIONS - 1), [0] * (MIN_DECISIONS - 1), [True, False] * 249 + [True]
    )
    assert fit_correction(few).is_identity
    one_class = Decisions([[0.9, 0.5]] * 2000, [0] * 2000, [True] * 2000)
    assert fit_correction(one_class).is_identity


def test_manifest_carries_and_checks_the_correction(tmp_path: Path) -> None:
    sel = {"intercept": -0.18, "mean_scale": 1.17, "spread_scale": 0.77}
    path = make_tiny_artifact(tmp_path, "1", route_selection=sel)
    manifest = Manifest.from_json((path / "manifest.json").read_text())
    assert manifest.route_selection == sel
    assert load_model_dir(path).selection == SelectionCorrection(-0.18, 1.17, 0.77)
    assert load_model_dir(make_tiny_artifact(tmp_path, "2")).selection is None  # none recorded
    for bad, message in [
        ({"intercept": 0.0, "mean_scale": 1.0}, "exactly the keys"),
        ({**sel, "spread_scale": 0.0}, "spread_scale must be positive"),
        ({**sel, "mean_scale": -1.0}, "mean_scale must be positive"),
        ({**sel, "intercept": "x"}, "intercept must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_tiny_artifact(tmp_path, "bad", route_selection=bad)
    doc = json.loads((path / "manifest.json").read_text())
    with pytest.raises(ValueError, match="must be an object"):
        Manifest.from_json(json.dumps({**doc, "route_selection": [1, 2]}))


def test_model_scores_apply_the_correction_to_the_route_column_only() -> None:
    rows = [[0.9, 0.1, 0.2], [0.6, 0.3, 0.4]]
    c = SelectionCorrection(0.0, 1.0, 0.5)
    s = model_scores(rows, "v", [0, 3600], c)
    assert s.p_approve == pytest.approx(c.apply([0.9, 0.6]))
    assert s.p_retry == [[0.1, 0.2], [0.3, 0.4]]
    assert model_scores(rows, "v", [0, 3600]).p_approve == [0.9, 0.6]


async def test_server_reports_corrected_probabilities(start_server: ServerFactory, tmp_path: Path) -> None:
    plain, corrected = tmp_path / "plain", tmp_path / "corrected"
    make_tiny_artifact(plain, "1", seed=4)
    c = SelectionCorrection(-0.3, 1.0, 0.5)
    make_tiny_artifact(corrected, "1", seed=4, route_selection=c._asdict())
    a = await (await start_server(model_dir=plain)).stub.Recommend(make_request(), timeout=5)
    b = await (await start_server(model_dir=corrected)).stub.Recommend(make_request(), timeout=5)
    order = [r[0] for r in ROUTES]
    pa = {r.route_id: r.approval_probability for r in a.routes}
    pb = {r.route_id: r.approval_probability for r in b.routes}
    want = c.apply([pa[r] for r in order])
    assert [pb[r] for r in order] == pytest.approx(want, abs=1e-5)
    assert [pb[r] for r in order] != pytest.approx([pa[r] for r in order], abs=1e-3)
    for r in b.routes:
        assert r.expected_value_minor == pytest.approx(12_500 * r.approval_probability - r.cost_minor)


def _biased_by_issuer(
    rng: np.random.Generator, n: int, bias: dict[str, float], want: SelectionCorrection
) -> Decisions:
    """Decisions whose outcomes follow `want` plus a logit bias per issuer key (issuers drawn with
    equal odds): a model whose level is off by issuer."""
    keys = sorted(bias)
    d = Decisions(issuer=[])
    assert d.issuer is not None
    for _ in range(n):
        p = rng.uniform(0.3, 0.97, size=3).tolist()
        c = int(np.argmax(p))
        key = keys[int(rng.integers(len(keys)))]
        truth = shift_logits([want.apply(p)[c]], bias[key])[0]
        d.route_p.append(p)
        d.chosen.append(c)
        d.issuer.append(key)
        d.approved.append(bool(rng.random() < truth))
    return d


def test_shift_logits_moves_every_candidate_alike_and_keeps_the_order() -> None:
    p = [0.9, 0.42, 0.7]
    assert shift_logits(p, 0.0) == p
    q = shift_logits(p, -0.6)
    assert [_logit(b) - _logit(a) for a, b in zip(p, q, strict=True)] == pytest.approx([-0.6] * 3)
    assert sorted(range(3), key=lambda i: q[i]) == sorted(range(3), key=lambda i: p[i])


def test_fit_by_issuer_recovers_each_issuers_offset() -> None:
    rng = np.random.default_rng(5)
    want = SelectionCorrection(-0.2, 1.1, 0.7)
    bias = {"US|411111": 0.5, "GB|522222": -0.4, "DE|433333": 0.0}
    d = _biased_by_issuer(rng, 30_000, bias, want)
    got, offsets = fit_correction_by_issuer(d)
    assert set(offsets) == set(bias)
    # The offsets are identified up to the shared intercept: compare their differences.
    for k in bias:
        assert offsets[k] - offsets["DE|433333"] == pytest.approx(bias[k], abs=0.12)
        assert offsets[k] + got.intercept == pytest.approx(bias[k] + want.intercept, abs=0.15)
    assert got.spread_scale == pytest.approx(want.spread_scale, abs=0.1)
    # On fresh decisions, the offsets take out what the three numbers alone cannot.
    fresh = _biased_by_issuer(rng, 30_000, bias, want)
    plain = fit_correction(d)
    assert chosen_ece(fresh, got, offsets) < 0.6 * chosen_ece(fresh, plain)
    assert fit_correction_by_issuer(d) == (got, offsets)  # deterministic


def test_fit_by_issuer_leaves_rare_and_one_class_issuers_without_an_offset() -> None:
    rng = np.random.default_rng(9)
    d = _biased_by_issuer(rng, 5_000, {"US|411111": 0.3, "GB|522222": -0.3}, SelectionCorrection())
    assert d.issuer is not None
    # 150 decisions of a third issuer (below MIN_ISSUER_DECISIONS) and 300 all approved of a fourth
    for key, n, approved in (("FR|455555", 150, None), ("IT|466666", 300, True)):
        for _ in range(n):
            d.route_p.append([0.8, 0.6])
            d.chosen.append(0)
            d.issuer.append(key)
            d.approved.append(bool(rng.random() < 0.8) if approved is None else approved)
    _, offsets = fit_correction_by_issuer(d)
    assert set(offsets) == {"US|411111", "GB|522222"}
    # the most frequent only, when capped
    _, capped = fit_correction_by_issuer(d, max_issuers=1)
    assert len(capped) == 1
    # no issuer keys recorded: the plain fit, no offsets
    plain = Decisions(d.route_p, d.chosen, d.approved)
    assert fit_correction_by_issuer(plain) == (fit_correction(plain), {})
    with pytest.raises(ValueError, match="issuer keys"):
        fit_correction_by_issuer(Decisions(d.route_p, d.chosen, d.approved, issuer=d.issuer[:-1]))


def test_manifest_carries_and_checks_the_issuer_offsets(tmp_path: Path) -> None:
    sel = {"intercept": -0.18, "mean_scale": 1.17, "spread_scale": 0.77}
    offsets = {"US|411111": 0.25, "GB|522222": -0.5}
    path = make_tiny_artifact(tmp_path, "1", route_selection=sel, route_selection_issuer=offsets)
    model = load_model_dir(path)
    assert model.manifest.route_selection_issuer == offsets
    assert model.issuer_offset("US", "41111199") == 0.25  # the ISSUER key: country | first six digits
    assert model.issuer_offset("GB", "522222") == -0.5
    assert model.issuer_offset("US", "52222211") == 0.0  # not named: none
    assert load_model_dir(make_tiny_artifact(tmp_path, "2")).issuer_offset("US", "411111") == 0.0
    for bad, message in [
        ({"US|411111": float("nan")}, "finite number"),
        ({"US|411111": 11.0}, "within"),
        ({"": 0.1}, "non-empty strings"),
        ({"US|411111": True}, "finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_tiny_artifact(tmp_path, "bad", route_selection=sel, route_selection_issuer=bad)
    doc = json.loads((path / "manifest.json").read_text())
    with pytest.raises(ValueError, match="must be an object"):
        Manifest.from_json(json.dumps({**doc, "route_selection_issuer": [1]}))
    del doc["route_selection_issuer"]  # an older manifest: none
    assert Manifest.from_json(json.dumps(doc)).route_selection_issuer == {}


async def test_server_shifts_the_probabilities_by_the_cards_issuer(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    c = SelectionCorrection(-0.3, 1.0, 0.5)
    req = make_request()
    card = req.attempt.card
    key = f"{card.issuer_country}|{card.bin[:6]}"
    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    make_tiny_artifact(plain, "1", seed=4, route_selection=c._asdict())
    make_tiny_artifact(
        shifted,
        "1",
        seed=4,
        route_selection=c._asdict(),
        route_selection_issuer={key: -0.7, "XX|000000": 2.0},
    )
    a = await (await start_server(model_dir=plain)).stub.Recommend(req, timeout=5)
    b = await (await start_server(model_dir=shifted)).stub.Recommend(req, timeout=5)
    pa = {r.route_id: r.approval_probability for r in a.routes}
    pb = {r.route_id: r.approval_probability for r in b.routes}
    assert set(pa) == set(pb) == {r[0] for r in ROUTES}
    for route, p in pa.items():
        assert _logit(pb[route]) - _logit(p) == pytest.approx(-0.7, abs=1e-4)
    for r in b.routes:
        assert r.expected_value_minor == pytest.approx(12_500 * r.approval_probability - r.cost_minor)
