"""Off-policy estimators on logs whose truth is known: IPS, SNIPS and DR recover a target policy's
value from an exploring log; DM is only as good as its reward model; no propensities, no weights;
the rejection-sampling replay recovers a policy that learns from its own outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from history.ope import LoggedDecisions, evaluate_policy, logging_value, replay_policy, uplift

P_TRUE = np.array([0.60, 0.75, 0.85])  # each route's true approval probability
AMOUNT, COST = 10_000.0, np.array([10.0, 20.0, 30.0])


def exploring_log(
    n: int, seed: int, *, mu: np.ndarray | None = None, propensities: bool = True
) -> LoggedDecisions:
    """`n` decisions over the three routes, chosen with probabilities `mu` (uniform by default)."""
    rng = np.random.default_rng(seed)
    mu = np.full(3, 1 / 3) if mu is None else mu
    log = LoggedDecisions()
    for _ in range(n):
        a = int(rng.choice(3, p=mu))
        log.candidates.append(["a", "b", "c"])
        log.cost.append(COST.copy())
        log.amount.append(AMOUNT)
        log.chosen.append(a)
        log.propensity.append(float(mu[a]) if propensities else math.nan)
        log.approved.append(float(rng.random() < P_TRUE[a]))
    return log


def always(route: int, n: int) -> list[np.ndarray]:
    return [np.eye(3)[route] for _ in range(n)]


@pytest.mark.parametrize("route", [0, 1, 2])
def test_ips_snips_and_dr_recover_a_policys_value_within_their_intervals(route: int) -> None:
    log = exploring_log(6000, seed=route)
    wrong_model = [np.full(3, 0.5) for _ in range(len(log))]  # a reward model that knows nothing
    value = evaluate_policy(log, always(route, len(log)), wrong_model, seed=1)
    truth = {"approval": P_TRUE[route], "net_revenue": AMOUNT * P_TRUE[route] - COST[route]}
    for metric, want in truth.items():
        for estimator in ("ips", "snips", "dr"):
            est = value.estimates[metric][estimator]
            assert est.low <= want <= est.high, (metric, estimator, est, want)
        dm = value.estimates[metric]["dm"]
        assert not dm.low <= want <= dm.high  # the direct method carries its model's bias
    assert value.ess == pytest.approx(len(log) / 3, rel=0.1)  # a third of the rows match the policy


def test_dr_with_a_right_reward_model_is_tighter_than_ips() -> None:
    log = exploring_log(6000, seed=7)
    right = [P_TRUE.copy() for _ in range(len(log))]
    value = evaluate_policy(log, always(2, len(log)), right, seed=2)
    ips, dr = value.estimates["approval"]["ips"], value.estimates["approval"]["dr"]
    assert dr.low <= P_TRUE[2] <= dr.high
    assert dr.high - dr.low < (ips.high - ips.low) / 2


def test_without_propensities_only_the_direct_method_is_estimated() -> None:
    log = exploring_log(500, seed=3, propensities=False)
    value = evaluate_policy(log, always(1, len(log)), [P_TRUE.copy() for _ in range(len(log))])
    assert set(value.estimates["approval"]) == {"dm"} and math.isnan(value.ess)
    assert value.rows_weighted == 0


def test_logging_value_is_the_logged_mean_and_uplift_is_paired() -> None:
    mu = np.array([0.7, 0.2, 0.1])
    log = exploring_log(8000, seed=5, mu=mu)
    assert logging_value(log)["approval"].low <= float(mu @ P_TRUE) <= logging_value(log)["approval"].high
    model = [P_TRUE.copy() for _ in range(len(log))]
    best, worst = (evaluate_policy(log, always(r, len(log)), model) for r in (2, 0))
    gain = uplift(best, worst, "approval")
    assert gain.low > 0 and gain.low <= P_TRUE[2] - P_TRUE[0] <= gain.high
    assert uplift(worst, best, "approval").high < 0


class Greedy:
    """Learns from its own outcomes: the route with the best running approval (a Beta(1, 1) prior)
    with probability 1 − h, every route h / 3 — success-rate routing's shape, without the world."""

    def __init__(self, hedging: float = 0.1) -> None:
        self.hedging = hedging
        self.wins, self.tries = np.ones(3), np.full(3, 2.0)

    def probabilities(self, log: LoggedDecisions, i: int) -> np.ndarray:
        pi = np.full(3, self.hedging / 3)
        pi[int(np.argmax(self.wins / self.tries))] += 1 - self.hedging
        return pi

    def learn(self, log: LoggedDecisions, i: int, chosen: int) -> None:
        self.wins[chosen] += log.approved[i]
        self.tries[chosen] += 1


def greedy_truth(steps: int, runs: int = 400) -> float:
    """Greedy's mean approval over its first `steps` decisions, served on-policy (Monte Carlo)."""
    rng = np.random.default_rng(99)
    total = 0.0
    for _ in range(runs):
        g = Greedy()
        for u, v in rng.random((steps, 2)):
            a = min(int(np.searchsorted(np.cumsum(g.probabilities(LoggedDecisions(), 0)), u)), 2)
            ok = float(v < P_TRUE[a])
            g.wins[a] += ok
            g.tries[a] += 1
            total += ok
    return total / (runs * steps)


@pytest.mark.parametrize("mu", [None, np.array([0.6, 0.3, 0.1])], ids=["uniform", "skewed"])
def test_replay_recovers_a_policy_that_learns_from_its_own_outcomes(mu: np.ndarray | None) -> None:
    log = exploring_log(3000, seed=11, mu=mu)
    value = replay_policy(log, lambda r: Greedy(), replays=10, seed=4)
    bound = 3.0 if mu is None else 10.0  # 1 / the smallest logged propensity
    assert value.bound == pytest.approx(bound) and value.over_bound == 0
    assert value.accepted == pytest.approx(len(log) / bound, rel=0.15)  # each decision kept w.p. 1/M
    truth = greedy_truth(round(value.accepted))
    est = value.estimates["approval"]
    assert est.low <= truth <= est.high, (est, truth)
    # It is the learner's value, not the log's: well above the logged routing's, below the best route's.
    assert est.value > logging_value(log)["approval"].high and truth < P_TRUE[2]
    revenue = value.estimates["net_revenue"]
    assert revenue.low < AMOUNT * truth - float(COST @ [0.05, 0.05, 0.9]) < revenue.high


def test_replay_without_propensities_estimates_nothing() -> None:
    value = replay_policy(exploring_log(200, seed=3, propensities=False), lambda r: Greedy())
    assert value.rows == 0 and math.isnan(value.estimates["approval"].value)
