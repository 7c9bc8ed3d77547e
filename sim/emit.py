"""Training logs at speed: the `Logging` policy played open-loop and vectorized, written as events.

`emit_log` writes the delimited `authopt.v1.AttemptEvent` log (streams.replay's format) of every
attempt the exploring `Logging` policy (sim.policies) makes on a world's payments, in
attempted-at order (ties by payment index, then attempt number). It is the same world and the same
policy as ``play(world, Logging())``, played differently:

- **open loop, in rounds.** The Logging policy never looks at features, so a payment's attempts
  depend only on its own history: round k plays attempt k of every payment still open with one call
  to `World.outcome_arrays` (the per-payment `Belief` carried between rounds as arrays). Outcomes use
  the world's counter-based draws, so attempt k of payment j turns out exactly as `World.attempt`
  would with `World.draws(payment, k)` (tests/test_sim_emit.py replays records through it).
- **the policy's choices from numpy.** First route: with probability `uniform` uniform over the
  eligible routes, else the merchant's primary; after a failure, with probability `retry_share`
  where the network rules permit, a retry at a uniformly random permitted delay of
  `model.layout.DELAY_BUCKETS_S` within the payment's window, on a uniformly random eligible route;
  at most `traffic.max_attempts` tries. Route errors are not declines: no rule applies to them. The
  random numbers come from one `np.random.default_rng(seed)`, not from `Logging`'s `random.Random`,
  so the log is a different sample of the same policy than the closed loop's.
- **network rules.** `server.rules.evaluate_retry` of a decline depends on (network, response code,
  MAC) and on two per-card counters (Visa: reattempts per card x merchant in 30 days, limit 15;
  Mastercard: attempts per card x merchant x amount in 30 days, limit 35). One payment makes at most
  `max_attempts` (<= 20, the config's bound) tries, so the counters only reach a limit where a card
  pays the same merchant often (popular cards do; how often depends on the world's card mix).
  Where the payments of a card x merchant cannot add up to a limit, the counters cannot change the
  answer and a table of `evaluate_retry` per (network, code, MAC) decides. For the others ("hot"
  card x merchant pairs) the rounds first play every retry the counter-free rules allow, then one
  pass in log order counts the attempts actually kept and calls `evaluate_retry` with the true
  counters at each of their declines; a refused retry cuts its payment's later attempts (they are
  its own and later in the log, so the pass stays exact).
- **serialization without message objects**: `sim.wire.EventEncoder` writes the records (its
  bytes equal `SerializeToString()` of the messages `play._event` builds).

Speed: about 2 x 10^5 attempts/s on one core, serialization and writing included, on the default
world (48k payments, ~59k attempts; `python -m bench.sim_emit`). `World.payments()` is not included:
it is the world's own cost (~0.5 s for those 48k payments).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from authopt.v1 import events_pb2
from model.layout import DELAY_BUCKETS_S
from server import rules
from sim.play import NETWORK_NAME
from sim.wire import EventEncoder
from sim.world import APPROVED, DECLINED, ERROR, MACS, Payment, World

__all__ = ["EmitStats", "emit_log", "logging_choices"]

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]

_DAY = 86_400
_STATUS_NAME = {APPROVED: "approved", DECLINED: "declined", ERROR: "error"}
_CHUNK = 1 << 16  # records encoded (and written) at a time


# --- the policy, open loop -----------------------------------------------------------------------


@dataclass
class EmitStats:
    payments: int = 0
    attempts: int = 0
    approved: int = 0  # attempts approved (= payments approved: an approval ends a payment)
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    bytes: int = 0
    hot_payments: int = 0  # payments whose card x merchant needed the counter pass
    limit_refusals: int = 0  # retries the counter limits refused

    @property
    def attempts_per_s(self) -> float:
        return self.attempts / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Rounds:
    """Every attempt played, round by round (concatenated at the end)."""

    pos: list[_I64] = field(default_factory=list)
    number: list[_I64] = field(default_factory=list)
    route: list[_I64] = field(default_factory=list)
    at: list[_F64] = field(default_factory=list)
    status: list[_I64] = field(default_factory=list)
    code: list[_I64] = field(default_factory=list)
    mac: list[_I64] = field(default_factory=list)
    latency: list[_I64] = field(default_factory=list)
    gated: list[npt.NDArray[np.bool_]] = field(default_factory=list)  # a retry follows a hot decline


def _eligible(world: World) -> tuple[_I64, _I64, _I64]:
    """Per (merchant, network): eligible routes (merchant's order, -1 padded), their count, primary."""
    n_m, n_net = len(world.merchant_ids), int(world.issuer_network.max()) + 1
    width = max(len(r) for r in world.merchant_routes)
    routes = np.full((n_m, n_net, width), -1, dtype=np.int64)
    count = np.zeros((n_m, n_net), dtype=np.int64)
    primary = np.full((n_m, n_net), -1, dtype=np.int64)
    for m in range(n_m):
        for net in range(n_net):
            ok = [r for r in world.merchant_routes[m] if net in world.route_networks[r]]
            if ok:
                routes[m, net, : len(ok)] = ok
                count[m, net] = len(ok)
                p = world.merchant_primary[m]
                primary[m, net] = p if p in ok else ok[0]
    return routes, count, primary


def logging_choices(
    world: World,
    payments: Sequence[Payment],
    events: Iterable[events_pb2.AttemptEvent],
    uniform: float = 0.5,
) -> dict[str, tuple[list[str], float]]:
    """By event id, for each first attempt of `emit_log`'s log (played with `uniform`): the routes
    the logging policy chose among (eligible for the merchant and the card's network, in the
    merchant's order) and the propensity of the route it chose — (1 - u) + u / k for the merchant's
    primary route, u / k for each other of the k candidates."""
    routes, count, primary = _eligible(world)
    ids = world.route_ids
    by_index = {p.index: p for p in payments}
    out: dict[str, tuple[list[str], float]] = {}
    for e in events:
        o = e.outcome
        if o.attempt.attempt_number != 1:
            continue
        p = by_index[int(o.request_id.removeprefix("pay-"))]
        net = int(world.card_network[p.card])
        k = int(count[p.merchant, net])
        first = ids[int(primary[p.merchant, net])]
        out[o.event_id] = (
            [ids[r] for r in routes[p.merchant, net, :k]],
            (1 - uniform) * (o.route_id == first) + uniform / k,
        )
    return out


def _rule_tables(world: World) -> tuple[npt.NDArray[np.bool_], _F64]:
    """`evaluate_retry` with zero counters per (network, code + 1, MAC index): allowed, wait in s."""
    n_net = int(world.issuer_network.max()) + 1
    allowed = np.ones((n_net, len(world.codes_all) + 1, len(MACS)), dtype=bool)
    wait = np.zeros(allowed.shape, dtype=np.float64)
    for net in range(n_net):
        for c, code in enumerate(("", *world.codes_all)):
            for m, mac in enumerate(MACS):
                decline = rules.Decline(code, f"{mac:02d}" if mac else "", 0, 0.0)
                r = rules.evaluate_retry(NETWORK_NAME.get(net, "other"), decline, rules.RetryCounters(), 0.0)
                allowed[net, c, m] = r.allowed
                wait[net, c, m] = r.earliest_at  # attempted_at + wait with attempted_at = now = 0
    return allowed, wait


def _limit(scope: str) -> int:
    limits = [r.max_attempts for r in rules.RULES if r.kind == rules.RuleKind.LIMIT and r.scope == scope]
    return min(limits, default=2**62)


def _hot(
    card: _I64, merchant: _I64, amount: _I64, max_attempts: int
) -> tuple[npt.NDArray[np.bool_], _I64, _I64]:
    """Payments whose card x merchant counters might reach a rule's limit, and the pair / triple ids.

    A payment makes at most `max_attempts` attempts (max_attempts - 1 reattempts), so a card x
    merchant with p payments counts at most p * (max_attempts - 1) reattempts, and a card x merchant
    x amount with q payments at most q * max_attempts attempts, whatever the window. Below the limits
    the counters cannot change `evaluate_retry`'s answer."""
    _, pair, pair_n = np.unique(
        card * (int(merchant.max()) + 1) + merchant, return_inverse=True, return_counts=True
    )
    _, amount_id = np.unique(amount, return_inverse=True)
    _, triple, triple_n = np.unique(
        pair * (int(amount_id.max()) + 1) + amount_id, return_inverse=True, return_counts=True
    )
    hot_triple = triple_n[triple] * max_attempts >= _limit(rules.SCOPE_CARD_MERCHANT_AMOUNT)
    hot_pair = pair_n * (max_attempts - 1) >= _limit(rules.SCOPE_CARD_MERCHANT)
    hot_pair |= np.bincount(pair, weights=hot_triple, minlength=pair_n.shape[0]) > 0
    return hot_pair[pair], pair, triple


def _counter_pass(
    world: World,
    card: _I64,
    pair: _I64,
    triple: _I64,
    r: dict[str, Any],
    hot_events: _I64,
    max_attempts: int,
    n: int,
) -> tuple[_I64, int]:
    """Walk the hot payments' attempts in log order with the true counters (see the module docstring);
    returns the last kept attempt number per payment position and how many retries were refused."""
    keep = np.full(n, max_attempts, dtype=np.int64)
    order = hot_events[np.lexsort((r["number"][hot_events], r["index"][hot_events], r["at"][hot_events]))]
    cols = [r[k][order].tolist() for k in ("pos", "number", "at", "gated", "code", "mac")]
    network = world.card_network[card].tolist()
    pair_l, triple_l = pair.tolist(), triple.tolist()
    reattempts: dict[int, deque[float]] = {}
    attempts: dict[int, deque[float]] = {}
    keep_l = keep.tolist()
    refused = 0
    window = 30 * _DAY
    for j, k, t, gated, code, mac in zip(*cols, strict=True):
        if k > keep_l[j]:
            continue
        ra = reattempts.setdefault(pair_l[j], deque())
        aa = attempts.setdefault(triple_l[j], deque())
        if k > 1:
            ra.append(t)
        aa.append(t)
        if not gated:
            continue
        since = t - window
        while ra and ra[0] <= since:
            ra.popleft()
        while aa and aa[0] <= since:
            aa.popleft()
        decline = rules.Decline(world.codes_all[code], f"{mac:02d}" if mac else "", 0, t)
        counters = rules.RetryCounters(len(ra), len(aa))
        if not rules.evaluate_retry(NETWORK_NAME.get(network[j], "other"), decline, counters, t).allowed:
            keep_l[j] = k
            refused += 1
    return np.array(keep_l, dtype=np.int64), refused


def emit_log(
    world: World,
    out: BinaryIO,
    *,
    payments: Sequence[Payment] | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    uniform: float = 0.5,
    retry_share: float = 0.85,
) -> EmitStats:
    """Play the Logging policy open-loop on `payments` (default: all of the world's) and write the
    delimited AttemptEvent log of every attempt to `out`, in attempted-at order. `progress` gets the
    number of records written so far after each chunk."""
    start = time.perf_counter()
    pays = world.payments() if payments is None else payments
    n = len(pays)
    tc = world.config.traffic
    max_attempts = tc.max_attempts
    # One payment's own attempts stay far below the rules' limits (15 / 35); what can reach them is a
    # card paying one merchant often, and the counter pass handles that (see the module docstring).
    assert 1 <= max_attempts <= 20, max_attempts
    stats = EmitStats(payments=n)
    enc = EventEncoder(world, pays)
    rng = np.random.default_rng(seed)
    merchant, amount = enc.merchant, enc.amount
    card, first_at, recurring = enc.cols["card"], enc.cols["at"], enc.cols["recurring"]
    u_funds, u_persist = enc.cols["u_funds"], enc.cols["u_persist"]
    net = world.card_network[card].astype(np.int64)
    window = np.where(recurring, tc.mit_patience_days * _DAY, tc.cit_patience_s)
    deadline = first_at + window
    routes, n_routes, primary = _eligible(world)
    allowed_t, wait_t = _rule_tables(world)
    hot, pair, triple = _hot(card, merchant, amount, max_attempts) if n else (np.zeros(0, bool), card, card)
    buckets = np.array(DELAY_BUCKETS_S, dtype=np.float64)
    funds_lo, funds_hi = np.zeros(n), np.ones(n)
    p_persist = world.issuer_persist_ok[world.card_issuer[card]].astype(np.float64)
    amount_f = amount.astype(np.float64)

    pos = np.arange(n, dtype=np.int64)
    t = first_at.copy()
    explore, pick = rng.random(n), rng.random(n)
    uniform_route = routes[merchant, net, (pick * n_routes[merchant, net]).astype(np.int64)]
    route = np.where(explore < uniform, uniform_route, primary[merchant, net])
    played = _Rounds()
    for number in range(1, max_attempts + 1):
        if pos.shape[0] == 0:
            break
        m = pos.shape[0]
        draws = world.draw_arrays(enc.index[pos], np.full(m, number, dtype=np.int64))
        res = world.outcome_arrays(
            card[pos], merchant[pos], amount_f[pos], recurring[pos], u_funds[pos], u_persist[pos],
            route, t, draws, funds_lo[pos], funds_hi[pos], p_persist[pos],
        )  # fmt: skip
        funds_lo[pos], funds_hi[pos], p_persist[pos] = res["funds_lo"], res["funds_hi"], res["p_persist_ok"]
        status = res["status"].astype(np.int64)
        code = res["code"].astype(np.int64)
        mac = res["mac"].astype(np.int64)
        for name, value in (
            ("pos", pos), ("number", np.full(m, number, dtype=np.int64)), ("route", route), ("at", t),
            ("status", status), ("code", code), ("mac", mac), ("latency", res["latency_ms"].astype(np.int64)),
        ):  # fmt: skip
            getattr(played, name).append(value)
        # The retry decision (Logging.retry, then play()'s checks of the plan).
        error = status == ERROR
        mac_i = np.searchsorted(np.array(MACS), mac)
        allowed = error | allowed_t[net[pos], code + 1, mac_i]
        earliest = t + np.where(error, 0.0, wait_t[net[pos], code + 1, mac_i])
        when = t[:, None] + buckets[None, :]
        fits = (when <= deadline[pos][:, None]) & (when >= earliest[:, None])
        n_fit = fits.sum(axis=1)
        coin, pick_bucket, pick_route = rng.random(m), rng.random(m), rng.random(m)
        go = (status != APPROVED) & (number < max_attempts) & allowed & (coin < retry_share) & (n_fit > 0)
        nth = (pick_bucket * n_fit).astype(np.int64)
        col = np.argmax(np.cumsum(fits, axis=1) > nth[:, None], axis=1)
        next_at = when[np.arange(m), col]
        go &= ~(next_at - first_at[pos] > window[pos]) & ~(next_at < t)
        played.gated.append(go & ~error & hot[pos])
        nxt = pos[go]
        pos, t = nxt, next_at[go]
        route = routes[
            merchant[nxt], net[nxt], (pick_route[go] * n_routes[merchant[nxt], net[nxt]]).astype(np.int64)
        ]

    r: dict[str, Any] = {
        k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in vars(played).items()
    }
    r["index"] = enc.index[r["pos"]]
    stats.hot_payments = int(hot.sum())
    hot_events = np.flatnonzero(hot[r["pos"]])
    if hot_events.shape[0]:
        keep, stats.limit_refusals = _counter_pass(world, card, pair, triple, r, hot_events, max_attempts, n)
        kept = np.flatnonzero(r["number"] <= keep[r["pos"]])
    else:
        kept = np.arange(r["pos"].shape[0])
    order = kept[np.lexsort((r["number"][kept], r["index"][kept], r["at"][kept]))]
    status_all = r["status"][order]
    stats.attempts = int(order.shape[0])
    stats.approved = int((status_all == APPROVED).sum())
    stats.by_status = {
        name: int((status_all == s).sum()) for s, name in _STATUS_NAME.items() if (status_all == s).any()
    }
    for lo in range(0, order.shape[0], _CHUNK):
        e = order[lo : lo + _CHUNK]
        chunk = enc.encode(
            r["pos"][e], r["number"][e], r["route"][e], r["at"][e], r["status"][e], r["code"][e],
            r["mac"][e], r["latency"][e],
        )  # fmt: skip
        out.write(chunk.tobytes())
        stats.bytes += int(chunk.shape[0])
        if progress is not None:
            progress(lo + e.shape[0])
    stats.seconds = time.perf_counter() - start
    return stats
