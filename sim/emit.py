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
- **serialization without message objects.** `EventEncoder` encodes the protobuf wire format with
  numpy: the Merchant, Card, route and result (status, code, MAC, Visa category) fields are
  serialized once per merchant, card, route and combination, the event-id stem, request id and
  Attempt fields once per payment; the varints (lengths, Timestamp seconds/nanos, latency) are
  computed column-wise, and every record of a chunk comes out of one masked gather. The bytes equal
  `SerializeToString()` of the messages `play._event` builds (`encode_event`, the one-event entry
  point, is compared with it in the tests).

Speed: about 2 x 10^5 attempts/s on one core, serialization and writing included, on the default
world (48k payments, ~59k attempts; `python -m bench.sim_emit`). `World.payments()` is not included:
it is the world's own cost (~0.5 s for those 48k payments).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from authopt.v1 import attempt_pb2
from model.layout import DELAY_BUCKETS_S
from server import rules
from sim.play import NETWORK_NAME
from sim.world import APPROVED, DECLINED, ERROR, Outcome, Payment, World

__all__ = ["EmitStats", "EventEncoder", "emit_log", "encode_event"]

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]
_U8 = npt.NDArray[np.uint8]
_Piece = tuple[_U8, _I64]  # padded bytes (n, width) and the length used of each row (n,)

_DAY = 86_400
_MACS = (0, 3, 25)  # World.outcome_arrays' `mac` values: none, "03", "25"
_STATUS_NAME = {APPROVED: "approved", DECLINED: "declined", ERROR: "error"}
_CHUNK = 1 << 16  # records encoded (and written) at a time
_FIELDS = ("index", "at", "merchant", "card", "amount_minor", "recurring", "channel", "u_funds", "u_persist")
_PAYMENT = np.dtype(  # the fields of sim.world.Payment, as columns
    [("index", np.int64), ("at", np.float64), ("merchant", np.int64), ("card", np.int64),
     ("amount_minor", np.int64), ("recurring", np.bool_), ("channel", np.int64), ("u_funds", np.float64),
     ("u_persist", np.float64)]
)  # fmt: skip


# --- wire format, column-wise --------------------------------------------------------------------


def _const(raw: bytes, n: int) -> _Piece:
    row = np.frombuffer(raw, dtype=np.uint8)
    return np.broadcast_to(row, (n, len(raw))), np.full(n, len(raw), dtype=np.int64)


def _varint(values: npt.NDArray[Any]) -> _Piece:
    """Protobuf base-128 varints (negative int64 as their 10-byte two's complement, as protobuf does)."""
    v = np.asarray(values).astype(np.int64)
    n = v.shape[0]
    if n == 0:
        return np.zeros((0, 1), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    # int64 arithmetic is much faster than uint64 in numpy; negatives (never here) go the slow way.
    x: npt.NDArray[Any] = v if int(v.min()) >= 0 else v.view(np.uint64)
    top = int(x.max())
    width = 1
    while top >> (7 * width):
        width += 1
    mat = np.empty((n, width), dtype=np.uint8)
    size = np.ones(n, dtype=np.int64)
    for k in range(width):
        byte = (x & 0x7F).astype(np.uint8)
        x = x >> 7
        if k < width - 1:
            more = x != 0
            byte |= more.view(np.uint8) << 7
            size += more
        mat[:, k] = byte
    return mat, size


def _decimal(values: _I64) -> _Piece:
    """ASCII decimal digits of non-negative integers (what f"{value}" writes)."""
    n = values.shape[0]
    top = int(values.max()) if n else 0
    if top < 4096:  # small numbers (attempt numbers): a table
        return _take(_strings([str(k) for k in range(top + 1)]), values)
    width = len(str(top))
    size = np.ones(n, dtype=np.int64)
    for k in range(1, width):
        size += values >= 10**k
    right = np.empty((n, width), dtype=np.uint8)  # right-aligned digits, then shifted left per row
    x = values.copy()
    for k in range(width):
        right[:, width - 1 - k] = 48 + x % 10
        x //= 10
    idx = np.minimum(np.arange(width)[None, :] + (width - size)[:, None], width - 1)
    return np.take_along_axis(right, idx, axis=1), size


def _strings(values: Sequence[str]) -> _Piece:
    try:  # numpy encodes ASCII itself, much faster than str.encode() one by one
        mat = np.array(values, dtype="S")
        lens = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    except UnicodeEncodeError:
        raw = [v.encode() for v in values]
        mat = np.array(raw, dtype="S")
        lens = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
    if mat.itemsize == 0:  # every value empty
        return np.zeros((len(values), 1), dtype=np.uint8), lens
    return mat.view(np.uint8).reshape(len(values), mat.itemsize), lens


def _pick(values: Sequence[str], rows: list[int]) -> list[str]:
    return [values[rows[0]]] if len(rows) == 1 else list(itemgetter(*rows)(values))


def _table(items: Sequence[bytes]) -> _Piece:
    width = max(1, max((len(b) for b in items), default=1))
    mat = np.zeros((len(items), width), dtype=np.uint8)
    for i, b in enumerate(items):
        mat[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return mat, np.array([len(b) for b in items], dtype=np.int64)


def _take(table: _Piece, rows: npt.NDArray[Any]) -> _Piece:
    return np.take(table[0], rows, axis=0), np.take(table[1], rows)


def _omit(piece: _Piece, present: npt.NDArray[np.bool_]) -> _Piece:
    return piece[0], np.where(present, piece[1], 0)


def _int_field(tag: int, values: npt.NDArray[Any]) -> list[_Piece]:
    """A varint field (proto3: absent when zero)."""
    present = values != 0
    return [_omit(_const(bytes((tag,)), values.shape[0]), present), _omit(_varint(values), present)]


def _len_field(tag: int, body_len: _I64, *, omit_empty: bool) -> list[_Piece]:
    """The tag and length of a length-delimited field whose body pieces follow."""
    head = [_const(bytes((tag,)), body_len.shape[0]), _varint(body_len)]
    return [_omit(p, body_len > 0) for p in head] if omit_empty else head


def _str_field(tag: int, s: _Piece) -> list[_Piece]:
    return [*_len_field(tag, s[1], omit_empty=True), s]


def _length(pieces: Sequence[_Piece]) -> _I64:
    total = np.zeros(pieces[0][1].shape[0], dtype=np.int64)
    for _, lens in pieces:
        total = total + lens
    return total


def _flat(pieces: Sequence[_Piece]) -> _U8:
    """Every row's pieces, in order, rows one after the other: one masked gather."""
    n = pieces[0][1].shape[0]
    widths = [m.shape[1] for m, _ in pieces]
    kind = np.int8 if max(widths) < 2**7 else (np.int16 if max(widths) < 2**15 else np.int64)
    mats = np.empty((n, sum(widths)), dtype=np.uint8)
    lens = np.empty((n, len(pieces)), dtype=kind)
    col = 0
    for i, (m, used) in enumerate(pieces):
        mats[:, col : col + m.shape[1]] = m
        lens[:, i] = used
        col += m.shape[1]
    offset = np.concatenate([np.arange(w, dtype=kind) for w in widths])
    keep = np.repeat(lens, widths, axis=1) > offset[None, :]
    return np.compress(keep.ravel(), mats.ravel())


def _padded(pieces: Sequence[_Piece]) -> _Piece:
    lens = _length(pieces)
    width = max(1, int(lens.max()) if lens.shape[0] else 1)
    out = np.zeros((lens.shape[0], width), dtype=np.uint8)
    out[np.arange(width)[None, :] < lens[:, None]] = _flat(pieces)
    return out, lens


def _timestamp(tag: int, nanos: _I64) -> list[_Piece]:
    """A google.protobuf.Timestamp field set by FromNanoseconds(nanos) (always present)."""
    seconds, frac = nanos // 1_000_000_000, nanos % 1_000_000_000
    body = [*_int_field(0x08, seconds), *_int_field(0x10, frac)]
    return [*_len_field(tag, _length(body), omit_empty=False), *body]


class EventEncoder:
    """Serializes the `AttemptEvent`s of attempts of `payments` (positions into that sequence) exactly
    as `sim.play._event` does, without building messages: see the module docstring."""

    def __init__(self, world: World, payments: Sequence[Payment]) -> None:
        self.world = world
        c = world.config
        n = len(payments)
        rows = np.fromiter(map(attrgetter(*_FIELDS), payments), dtype=_PAYMENT, count=n)
        self.cols: dict[str, npt.NDArray[Any]] = {k: np.ascontiguousarray(rows[k]) for k in _FIELDS}
        self.index = self.cols["index"]
        self.merchant = self.cols["merchant"]
        card = self.cols["card"]
        self.amount = self.cols["amount_minor"]
        recurring = self.cols["recurring"].astype(np.int64)
        channel = self.cols["channel"]
        cards, card_row = np.unique(card, return_inverse=True)
        self.visa = (world.card_network[card] == 1).astype(np.int64)
        merchants = _table(
            [attempt_pb2.Attempt(merchant=attempt_pb2.Merchant(id=m.id, mcc=m.mcc, country=m.country))
             .SerializeToString() for m in c.merchants]
        )  # fmt: skip
        currencies = _table(
            [attempt_pb2.Attempt(currency=m.currency).SerializeToString() for m in c.merchants]
        )
        n_channels = max(attempt_pb2.Channel.values()) + 1
        tails = _table(
            [attempt_pb2.Attempt(
                channel=ch,  # type: ignore[arg-type]
                initiator=attempt_pb2.INITIATOR_MERCHANT if r else attempt_pb2.INITIATOR_CUSTOMER,
                recurring=bool(r),
            ).SerializeToString() for ch in range(n_channels) for r in (0, 1)]
        )  # fmt: skip
        self.routes = _table(
            [attempt_pb2.AttemptOutcome(route_id=r).SerializeToString() for r in world.route_ids]
        )
        self.n_codes = len(world.codes_all)
        results = []
        for status in range(4):
            for code in ("", *world.codes_all):
                for mac in _MACS:
                    for visa in (0, 1):
                        results.append(
                            attempt_pb2.AttemptOutcome(
                                status=status,  # type: ignore[arg-type]
                                response_code=code,
                                mastercard_mac=f"{mac:02d}" if mac else "",
                                visa_category=rules.visa_category(code) if code and visa else 0,  # type: ignore[arg-type]
                            ).SerializeToString()
                        )
        self.results = _table(results)
        # Per payment: the event id up to the attempt number, the request id field, and the Attempt's
        # fields but the attempt number.
        index = _decimal(self.index)
        self.stems = _padded([_const(f"{c.name}-{world.seed}-".encode(), n), index, _const(b"-", n)])
        self.request_ids = _padded(
            [*_len_field(0x12, 4 + index[1], omit_empty=False), _const(b"pay-", n), index]
        )
        self.statics = _padded([
            _take(merchants, self.merchant),
            *_int_field(0x10, self.amount),
            _take(currencies, self.merchant),
            _take(self._card_table(cards), card_row),
            _take(tails, channel * 2 + recurring),
        ]) if n else (np.zeros((0, 1), dtype=np.uint8), np.zeros(0, dtype=np.int64))  # fmt: skip

    def _card_table(self, cards: _I64) -> _Piece:
        """Field 4 of `Attempt` (the Card message) of each card, as attempt_message() builds it."""
        w = self.world
        cl = cards.tolist()
        body = [
            *_str_field(0x0A, _strings(_pick(w.card_bin, cl))),
            *_str_field(0x12, _strings(_pick(w.card_last4, cl))),
            *_int_field(0x18, w.card_network[cards].astype(np.int64)),
            *_int_field(0x20, w.card_funding[cards].astype(np.int64)),
            *_str_field(0x2A, _take(_strings(w.issuer_country), w.card_issuer[cards])),
            *_int_field(0x30, w.card_token[cards].astype(np.int64)),
            *_str_field(0x3A, _strings(_pick(w.card_fingerprint, cl))),
        ]
        return _padded([*_len_field(0x22, _length(body), omit_empty=False), *body])

    def encode(
        self,
        pos: _I64,
        number: _I64,
        route: _I64,
        at: _F64,
        status: _I64,
        code: _I64,
        mac: _I64,
        latency_ms: _I64,
    ) -> _U8:
        """The delimited records (varint size, then the AttemptEvent) of these attempts, in order.

        `pos`: position of the payment in this encoder's `payments`; `code`: index into
        `world.codes_all` (-1 = none); `mac`: 0, 3 or 25 (World.outcome_arrays' conventions).
        """
        n = pos.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        stem, attempt_no = _take(self.stems, pos), _decimal(number)
        static, number_field = _take(self.statics, pos), _int_field(0x40, number)
        mac_i = np.searchsorted(np.array(_MACS), mac)
        if not np.array_equal(np.take(np.array(_MACS), np.minimum(mac_i, len(_MACS) - 1)), mac):
            raise ValueError(f"mac must be one of {_MACS}")
        key = ((status * (self.n_codes + 1) + code + 1) * len(_MACS) + mac_i) * 2 + self.visa[pos]
        attempted = (at * 1e9).astype(np.int64)  # int(at * 1e9), as _event() does
        received = ((at + latency_ms / 1000) * 1e9).astype(np.int64)
        outcome = [
            *_len_field(0x0A, _length([stem, attempt_no]), omit_empty=True),
            stem,
            attempt_no,
            _take(self.request_ids, pos),
            *_len_field(0x1A, _length([static, *number_field]), omit_empty=False),
            static,
            *number_field,
            _take(self.routes, route),
            _take(self.results, key),
            *_int_field(0x48, latency_ms),
            *_timestamp(0x52, attempted),
        ]
        event = [
            *_len_field(0x0A, _length(outcome), omit_empty=False),
            *outcome,
            *_timestamp(0x12, received),
            _const(b"\x1a\x03sim", n),
        ]
        return _flat([_varint(_length(event)), *event])


def encode_event(world: World, payment: Payment, number: int, route: int, at: float, o: Outcome) -> bytes:
    """The serialized `AttemptEvent` of one attempt (not delimited): `play._event`'s bytes, through the
    encoder `emit_log` uses."""
    code = world.codes_all.index(o.response_code) if o.response_code else -1
    record = EventEncoder(world, [payment]).encode(
        np.zeros(1, dtype=np.int64),
        np.array([number], dtype=np.int64),
        np.array([route], dtype=np.int64),
        np.array([at], dtype=np.float64),
        np.array([o.status], dtype=np.int64),
        np.array([code], dtype=np.int64),
        np.array([int(o.mastercard_mac or 0)], dtype=np.int64),
        np.array([o.latency_ms], dtype=np.int64),
    )
    size = 1
    while record[size - 1] & 0x80:
        size += 1
    return record[size:].tobytes()


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


def _rule_tables(world: World) -> tuple[npt.NDArray[np.bool_], _F64]:
    """`evaluate_retry` with zero counters per (network, code + 1, MAC index): allowed, wait in s."""
    n_net = int(world.issuer_network.max()) + 1
    allowed = np.ones((n_net, len(world.codes_all) + 1, len(_MACS)), dtype=bool)
    wait = np.zeros(allowed.shape, dtype=np.float64)
    for net in range(n_net):
        for c, code in enumerate(("", *world.codes_all)):
            for m, mac in enumerate(_MACS):
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
        mac_i = np.searchsorted(np.array(_MACS), mac)
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
