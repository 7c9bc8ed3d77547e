"""The `AttemptEvent` log's records in the protobuf wire format, encoded column-wise with numpy.

`EventEncoder` serializes the events of many attempts without building messages: the Merchant,
Card, route and result (status, code, MAC, Visa category) fields are serialized once per merchant,
card, route and combination, the event-id stem, request id and Attempt fields once per payment; the
varints (lengths, Timestamp seconds/nanos, latency) are computed column-wise, and every record of a
chunk comes out of one masked gather. The bytes equal `SerializeToString()` of the messages
`sim.play._event` builds (`encode_event`, the one-event entry point, is compared with it in
tests/test_sim_emit.py). `sim.emit.emit_log` writes the logging policy's log with it.

A field in the making is a `_Piece`: a (rows, width) byte matrix and the number of bytes of each
row in use; a record is a list of pieces, flattened into bytes at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from authopt.v1 import attempt_pb2
from server import rules
from sim.world import MACS, Outcome, Payment, World

__all__ = ["EventEncoder", "encode_event"]

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]
_U8 = npt.NDArray[np.uint8]
_Piece = tuple[_U8, _I64]  # padded bytes (n, width) and the length used of each row (n,)

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


# --- AttemptEvent ----------------------------------------------------------------------------------


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
                for mac in MACS:
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
        mac_i = np.searchsorted(np.array(MACS), mac)
        if not np.array_equal(np.take(np.array(MACS), np.minimum(mac_i, len(MACS) - 1)), mac):
            raise ValueError(f"mac must be one of {MACS}")
        key = ((status * (self.n_codes + 1) + code + 1) * len(MACS) + mac_i) * 2 + self.visa[pos]
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
