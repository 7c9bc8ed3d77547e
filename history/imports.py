"""`authopt log import`: a platform's history (Parquet or CSV, `history.schema`) into validated events.

Each row becomes an `AttemptOutcome` (the one event model) and is validated by the server's own
`validate_outcome`: an imported event is exactly what `ReportOutcome` would accept. A bad row never
stops an import and is never dropped silently: it goes to a rejects file with its row number, the
column and the reason (the server's validation reasons, plus `INVALID_VALUE` for a value that is not
of its column's type and `DUPLICATE_EVENT_ID`). A file with anything that looks like a full card
number, in any column, is refused whole: nothing of it is written, and the message names the column
and the row, never the number.

Accepted events are written as day-partitioned Parquet (`history.store`); what a file produced is
replaced when the same file is imported again, so an import can be re-run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from google.protobuf.timestamp_pb2 import Timestamp

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from history.columnar import Const, encode
from history.errors import HistoryError
from history.schema import COLUMNS, REQUIRED
from history.store import DayWriter, decision_id
from server.errors import InvalidArgument
from server.pan import MIN_PAN, RUN_PATTERN, contains_card_number
from server.validation import Limits, validate_outcome

__all__ = ["ImportRefused", "ImportSummary", "import_file", "import_files"]

PRODUCER = "authopt-log-import"
_KINDS = {c.name: c.kind for c in COLUMNS}
_STRING_COLUMNS = [c.name for c in COLUMNS if c.kind in ("string", "enum")]
# Where a validation error's field (under "outcome.") comes from in the import schema.
_FIELD_COLUMN = {
    "event_id": "event_id",
    "request_id": "request_id",
    "route_id": "route_id",
    "status": "status",
    "response_code": "response_code",
    "mastercard_mac": "mastercard_mac",
    "visa_category": "visa_category",
    "latency_ms": "latency_ms",
    "attempted_at": "time",
    "attempt": "payment_id",
    "attempt.merchant": "merchant_id",
    "attempt.merchant.id": "merchant_id",
    "attempt.merchant.mcc": "merchant_mcc",
    "attempt.merchant.country": "merchant_country",
    "attempt.amount_minor": "amount_minor",
    "attempt.currency": "currency",
    "attempt.card": "card_bin",
    "attempt.card.bin": "card_bin",
    "attempt.card.last4": "card_last4",
    "attempt.card.network": "card_network",
    "attempt.card.funding": "card_funding",
    "attempt.card.issuer_country": "issuer_country",
    "attempt.card.fingerprint": "card_fingerprint",
    "attempt.channel": "channel",
    "attempt.initiator": "initiator",
    "attempt.attempt_number": "attempt_number",
}
_ENUMS: dict[str, tuple[Any, str]] = {
    "card_network": (attempt_pb2.CardNetwork, "CARD_NETWORK_"),
    "card_funding": (attempt_pb2.CardFunding, "CARD_FUNDING_"),
    "channel": (attempt_pb2.Channel, "CHANNEL_"),
    "initiator": (attempt_pb2.Initiator, "INITIATOR_"),
    "status": (attempt_pb2.OutcomeStatus, "OUTCOME_STATUS_"),
}
_VISA_CATEGORIES = {v.number: v.number for v in attempt_pb2.VisaDeclineCategory.DESCRIPTOR.values if v.number}


class ImportRefused(HistoryError):
    """A whole file is refused (a card number in it, a required column missing, unreadable)."""


@dataclass
class ImportSummary:
    """What an import did."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    days: set[str] = field(default_factory=set)
    ignored_columns: set[str] = field(default_factory=set)
    decisions: int = 0  # first attempts with the logging policy's candidates and propensity
    rejects_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: ImportSummary) -> None:
        self.files += other.files
        self.rows += other.rows
        self.accepted += other.accepted
        self.rejected.update(other.rejected)
        self.days |= other.days
        self.ignored_columns |= other.ignored_columns
        self.decisions += other.decisions
        self.rejects_files += other.rejects_files
        self.seconds += other.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows": self.rows,
            "accepted": self.accepted,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "days": sorted(self.days),
            "ignored_columns": sorted(self.ignored_columns),
            "decisions": self.decisions,
            "rejects_files": self.rejects_files,
            "seconds": round(self.seconds, 3),
        }


class _RowError(NamedTuple):
    """Why one row is rejected (a value, not raised: it stands in a column's values in place of the
    bad value)."""

    column: str
    reason: str
    message: str


def _batches(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        elif suffix == ".csv":
            names = pacsv.open_csv(path).schema.names
            types = {n: pa.string() for n in names if n in _STRING_COLUMNS or n not in _KINDS}
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            )
            yield from reader
        else:
            raise ImportRefused(f"{path}: not a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ImportRefused(f"{path}: cannot be read: {exc}") from exc


def _scan_for_card_numbers(path: Path, batch: pa.RecordBatch, first_row: int) -> None:
    """Refuse the file if any column holds what looks like a card number (never quoting it)."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_integer(column.type):
            low, high = pc.min_max(column).values()
            if high.as_py() is None or max(abs(low.as_py()), abs(high.as_py())) < 10 ** (MIN_PAN - 1):
                continue  # fewer digits than any card number
            column = pc.cast(column, pa.string())
        elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        else:
            longest = pc.max(pc.binary_length(column)).as_py()
            if longest is None or longest < MIN_PAN:
                continue  # every value shorter than any card number
        hits = pc.match_substring_regex(column, RUN_PATTERN)
        if not pc.any(hits).as_py():
            continue
        for i in pc.indices_nonzero(hits).to_pylist():
            value = column[i].as_py()
            if value is not None and contains_card_number(value):
                raise ImportRefused(
                    f"{path}: column {name!r}, row {first_row + i}, holds what looks like a full card "
                    "number (PAN); nothing of this file was imported. Send the BIN, last4 and an "
                    "opaque fingerprint instead"
                )


def _epoch_us(column: pa.Array) -> list[int | None]:
    """The time column as epoch microseconds (None where absent or unparseable)."""
    if pa.types.is_timestamp(column.type):
        unit = column.type.unit
        scale = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0}[unit]
        raw = pc.cast(column, pa.int64()).to_pylist()
        if unit == "ns":
            return [None if v is None else v // 1000 for v in raw]
        return [None if v is None else v * scale for v in raw]
    if pa.types.is_integer(column.type):
        return [None if v is None else v * 1000 for v in column.to_pylist()]  # epoch milliseconds
    out: list[int | None] = []
    for text in column.to_pylist():
        try:
            stamp = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            out.append(None)
            continue
        if stamp.tzinfo is None:  # naive: UTC, as the schema says
            stamp = stamp.replace(tzinfo=UTC)
        out.append(round(stamp.timestamp() * 1_000_000))
    return out


def _enum_number(column: str, value: Any) -> int | _RowError:
    if value is None or value == "":
        return 0
    enum, prefix = _ENUMS[column]
    text = str(value).strip().upper()
    name = text if text.startswith(prefix) else prefix + text
    try:
        return int(enum.Value(name))
    except ValueError:
        return _RowError(column, "INVALID_ENUM", f"{column} {value!r} is not one of {_enum_choices(column)}")


def _enum_choices(column: str) -> str:
    enum, prefix = _ENUMS[column]
    return ", ".join(v.name[len(prefix) :].lower() for v in enum.DESCRIPTOR.values if v.number)


_INT64_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1
_INT_MAX = {"latency_ms": _UINT32_MAX, "attempt_number": _UINT32_MAX}  # uint32 fields of the event


def _int(column: str, value: Any) -> int | _RowError:
    if value is None or value == "":
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError):
        return _RowError(column, "INVALID_VALUE", f"{column} is not an integer")
    if number < 0 and column != "amount_minor":
        return _RowError(column, "INVALID_VALUE", f"{column} must not be negative")
    if number > _INT_MAX.get(column, _INT64_MAX) or number < -_INT64_MAX - 1:
        return _RowError(column, "INVALID_VALUE", f"{column} is too large")
    if column == "visa_category" and number and number not in _VISA_CATEGORIES:
        return _RowError(column, "INVALID_ENUM", "visa_category must be 1, 2, 3 or 4")
    return number


def _bool(column: str, value: Any) -> bool | _RowError:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "t", "y"):
        return True
    if text in ("false", "0", "no", "f", "n"):
        return False
    return _RowError(column, "INVALID_VALUE", f"{column} is not a boolean")


def _float(column: str, value: Any) -> float | _RowError:
    if value is None or value == "":
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return _RowError(column, "INVALID_VALUE", f"{column} is not a number")


def _column_values(name: str, column: pa.Array) -> list[Any]:
    """One column of a batch as Python values of its kind; a bad value is a _RowError in its place.
    Enum and typed columns convert each distinct value once (dictionary encoding), not each row."""
    kind = _KINDS[name]
    if kind == "string":
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())
        return ["" if v is None else v for v in column.to_pylist()]
    if kind == "int" and pa.types.is_integer(column.type) and name != "visa_category":
        low, high = pc.min_max(column).values()
        in_range = high.as_py() is None or high.as_py() <= _INT_MAX.get(name, _INT64_MAX)
        if in_range and (name == "amount_minor" or low.as_py() is None or low.as_py() >= 0):
            # else: per value, naming the bad ones
            return [0 if v is None else v for v in column.to_pylist()]
    if kind == "bool" and pa.types.is_boolean(column.type):
        return [bool(v) for v in column.to_pylist()]
    if kind == "float" and (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        return [0.0 if v is None else float(v) for v in column.to_pylist()]
    convert = {"enum": _enum_number, "int": _int, "bool": _bool, "float": _float}[kind]
    encoded = pc.dictionary_encode(column)
    mapped = [convert(name, v) for v in encoded.dictionary.to_pylist()]
    missing = convert(name, None)
    return [missing if i is None else mapped[i] for i in encoded.indices.to_pylist()]


_DEFAULTS: dict[str, Any] = {"string": "", "int": 0, "bool": False, "enum": 0, "float": 0.0}


def _timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(us)
    return ts


_TYPED = ("status", "latency_ms", "amount_minor", "card_network", "card_funding", "network_token",
          "channel", "initiator", "recurring", "attempt_number", "visa_category")  # fmt: skip


class _Row(NamedTuple):
    """One row: its outcome, and the logging policy's candidates and propensity ("" and 0: none)."""

    outcome: attempt_pb2.AttemptOutcome
    candidates: str
    propensity: float


def _outcomes(batch: pa.RecordBatch) -> Iterator[_Row | _RowError]:
    """Each row of `batch` as an AttemptOutcome (with its logged choice), or the _RowError that stops it."""
    n = batch.num_rows
    names = batch.schema.names
    cols = {
        c.name: _column_values(c.name, batch.column(c.name)) if c.name in names else [_DEFAULTS[c.kind]] * n
        for c in COLUMNS
        if c.name != "time"
    }
    times = _epoch_us(batch.column("time"))
    typed = [cols[name] for name in _TYPED]
    Outcome, Attempt, Merchant, Card = (
        attempt_pb2.AttemptOutcome, attempt_pb2.Attempt, attempt_pb2.Merchant, attempt_pb2.Card
    )  # fmt: skip
    event_id, payment_id, request_id, route_id = (
        cols["event_id"], cols["payment_id"], cols["request_id"], cols["route_id"]
    )  # fmt: skip
    response_code, mac = cols["response_code"], cols["mastercard_mac"]
    merchant_id, mcc, country = cols["merchant_id"], cols["merchant_mcc"], cols["merchant_country"]
    currency, bin_, last4 = cols["currency"], cols["card_bin"], cols["card_last4"]
    issuer, fingerprint = cols["issuer_country"], cols["card_fingerprint"]
    candidates, propensity = cols["candidate_routes"], cols["logging_propensity"]
    for i in range(n):
        at_us = times[i]
        if at_us is None:
            yield _RowError("time", "INVALID_VALUE", "time is missing or not a timestamp")
            continue
        values = [col[i] for col in typed]
        values.append(propensity[i])
        bad = next((v for v in values if isinstance(v, _RowError)), None)
        if bad is not None:
            yield bad
            continue
        status, latency, amount, network, funding, token, channel, initiator, recurring, number, visa, p = (
            values
        )
        outcome = Outcome(
            event_id=event_id[i] or f"{payment_id[i]}:{number}",
            request_id=request_id[i] or payment_id[i],
            route_id=route_id[i],
            status=status,
            response_code=response_code[i],
            mastercard_mac=mac[i],
            visa_category=visa,
            latency_ms=latency,
            attempted_at=_timestamp(at_us),
            attempt=Attempt(
                merchant=Merchant(id=merchant_id[i], mcc=mcc[i], country=country[i]),
                amount_minor=amount,
                currency=currency[i],
                card=Card(
                    bin=bin_[i],
                    last4=last4[i],
                    network=network,
                    funding=funding,
                    issuer_country=issuer[i],
                    network_token=token,
                    fingerprint=fingerprint[i],
                ),
                channel=channel,
                initiator=initiator,
                recurring=recurring,
                attempt_number=number,
            ),
        )
        yield _Row(outcome, candidates[i], p)


def _check_row(
    row: _Row | _RowError, limits: Limits, now: float
) -> tuple[attempt_pb2.AttemptOutcome, tuple[list[str], float] | None] | _RowError:
    """A row's validated outcome and logged choice, or why it is rejected (a repeated event id is
    found later, in row order, beside the rows the columnar path accepted)."""
    if isinstance(row, _RowError):
        return row
    try:
        validate_outcome(row.outcome, limits, now, field_prefix="", pan_checked=True)
    except InvalidArgument as err:
        return _RowError(_FIELD_COLUMN.get(err.field, err.field), err.reason, err.message)
    outcome = row.outcome
    choice = _logged_choice(outcome.attempt.attempt_number, outcome.route_id, row.candidates, row.propensity)
    if isinstance(choice, _RowError):
        return choice
    return outcome, choice


_MAX_CANDIDATES = 256
_MAX_ROUTE_ID = 64


def _logged_choice(
    attempt_number: int, route_id: str, candidates: str, propensity: float
) -> tuple[list[str], float] | _RowError | None:
    """The logging policy's candidates and propensity of a first attempt (None: not logged, or a
    retry, whose routing is not a first-position choice); a _RowError for an inconsistent pair."""
    if attempt_number != 1 or (not candidates and not propensity):
        return None
    if not 0 < propensity <= 1:
        return _RowError(
            "logging_propensity",
            "INVALID_VALUE",
            "logging_propensity must be in (0, 1] with candidate_routes",
        )
    routes = [r.strip() for r in candidates.split(";")]
    if not candidates or not all(routes) or len(set(routes)) != len(routes):
        return _RowError(
            "candidate_routes",
            "INVALID_VALUE",
            "candidate_routes must list distinct route ids separated by ';' (with logging_propensity)",
        )
    if len(routes) > _MAX_CANDIDATES or any(len(r) > _MAX_ROUTE_ID for r in routes):
        return _RowError(
            "candidate_routes", "INVALID_VALUE", "candidate_routes: too many or too long route ids"
        )
    if route_id not in routes:
        return _RowError("candidate_routes", "INVALID_VALUE", "route_id is not one of candidate_routes")
    return routes, propensity


def _decision(
    outcome: attempt_pb2.AttemptOutcome, routes: list[str], propensity: float
) -> events_pb2.DecisionRecord:
    """The platform's own routing decision as the decision log records authopt's: the request with
    its candidates, the route chosen first and its propensity (the only one the log knows)."""
    return events_pb2.DecisionRecord(
        request=optimizer_pb2.RecommendRequest(
            request_id=outcome.request_id,
            attempt=outcome.attempt,
            candidates=[attempt_pb2.Route(id=r) for r in routes],
        ),
        response=optimizer_pb2.RecommendResponse(
            request_id=outcome.request_id,
            routes=[optimizer_pb2.RankedRoute(route_id=outcome.route_id)],
            propensity=propensity,
        ),
        decided_at=outcome.attempted_at,
        producer=PRODUCER,
        first_position_propensities=[propensity],
    )


# --- the columnar path ----------------------------------------------------------------------------
#
# Most rows of a history are valid. `_columnar` finds, column by column, the rows that surely are —
# each distinct value of a column checked by the server's own `validate_outcome` on an otherwise
# valid outcome with that one field set (the checks are per field, status and response code as a
# pair), or, for a column with very many distinct values, by a pattern that only admits what the
# server accepts — and serializes them column-wise (`history.columnar`). Every other row takes the
# row-by-row path above, which names the first problem exactly as the server would; so the columnar
# path changes how fast, never what, an import accepts (tests/test_history_import.py compares both).

_DISTINCT = 4096  # a column without a pattern with more distinct values in a batch: row by row
_PRINTABLE = r"[\x20-\x7e]"
_SETTERS: dict[str, tuple[str, str | None]] = {  # column: (field path in the outcome, pattern)
    "event_id": ("event_id", f"^{_PRINTABLE}{{1,128}}$"),
    "request_id": ("request_id", f"^{_PRINTABLE}{{0,128}}$"),
    "merchant_id": ("attempt.merchant.id", f"^{_PRINTABLE}{{1,64}}$"),
    "merchant_mcc": ("attempt.merchant.mcc", "^[0-9]{4}$"),
    "merchant_country": ("attempt.merchant.country", "^[A-Z]{2}$"),
    "currency": ("attempt.currency", None),
    "card_bin": ("attempt.card.bin", "^[0-9]{6,8}$"),
    "card_last4": ("attempt.card.last4", "^([0-9]{4})?$"),
    "card_network": ("attempt.card.network", None),
    "card_funding": ("attempt.card.funding", None),
    "issuer_country": ("attempt.card.issuer_country", "^[A-Z]{2}$"),
    "card_fingerprint": ("attempt.card.fingerprint", f"^{_PRINTABLE}{{1,128}}$"),
    "channel": ("attempt.channel", None),
    "initiator": ("attempt.initiator", None),
    "route_id": ("route_id", f"^{_PRINTABLE}{{1,64}}$"),
    "mastercard_mac": ("mastercard_mac", "^([0-9]{2})?$"),
    "visa_category": ("visa_category", None),
}
_TIME_MARGIN_S = 1.0  # rows this close to the accepted time window's ends take the row-by-row path


def _template(now: float) -> attempt_pb2.AttemptOutcome:
    """A valid outcome: one field of it is set to each distinct value of a column to check that value."""
    return attempt_pb2.AttemptOutcome(
        event_id="e",
        route_id="r",
        status=attempt_pb2.OUTCOME_STATUS_APPROVED,
        attempted_at=_timestamp(int(now * 1_000_000)),
        attempt=attempt_pb2.Attempt(
            merchant=attempt_pb2.Merchant(id="m", mcc="5411", country="DE"),
            amount_minor=1,
            currency="EUR",
            card=attempt_pb2.Card(bin="411111", issuer_country="DE", fingerprint="f"),
        ),
    )


def _accepts(template: attempt_pb2.AttemptOutcome, limits: Limits, now: float, **values: Any) -> bool:
    """Whether the server accepts `template` with the fields at these paths ("attempt.currency") set."""
    outcome = attempt_pb2.AttemptOutcome()
    outcome.CopyFrom(template)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        message: Any = outcome
        for name in parents:
            message = getattr(message, name)
        setattr(message, leaf, value)
    try:
        validate_outcome(outcome, limits, now, field_prefix="", pan_checked=True)
    except InvalidArgument:
        return False
    return True


def _np(values: pa.Array, dtype: Any) -> npt.NDArray[Any]:
    array: npt.NDArray[Any] = np.asarray(values.to_numpy(zero_copy_only=False), dtype=dtype)
    return array


def _text(batch: pa.RecordBatch, name: str) -> pa.Array:
    """A text column with absent values as "" (a column the file lacks: all "")."""
    if name not in batch.schema.names:
        return pa.array([""] * batch.num_rows, pa.string())
    column = batch.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return pc.fill_null(column, "")


def _typed(batch: pa.RecordBatch, name: str, dtype: Any) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """A typed column as numpy values and where a value could not be converted (converted as the
    row-by-row path does: each distinct value once, by `_column_values`)."""
    n = batch.num_rows
    if name not in batch.schema.names:
        return np.zeros(n, dtype), np.zeros(n, np.bool_)
    column = batch.column(name)
    simple = (
        (dtype is np.int64 and pa.types.is_integer(column.type) and not pa.types.is_uint64(column.type))
        or (dtype is np.float64 and (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)))
        or (dtype is np.bool_ and pa.types.is_boolean(column.type))
    )
    if simple and _KINDS[name] != "enum":
        return _np(
            pc.fill_null(column, pa.scalar(0, column.type) if dtype is not np.bool_ else False), dtype
        ), (np.zeros(n, np.bool_))
    encoded = pc.dictionary_encode(column)
    distinct = _column_values(name, encoded.dictionary)
    missing = _column_values(name, pa.nulls(1, column.type))[0]
    bad = np.array([isinstance(v, _RowError) for v in distinct] + [isinstance(missing, _RowError)], np.bool_)
    table = np.array([0 if isinstance(v, _RowError) else v for v in [*distinct, missing]], dtype)
    indices = _np(pc.fill_null(encoded.indices, len(distinct)), np.int64)
    return table[indices], bad[indices]


def _checked_by_value(
    column: pa.Array | npt.NDArray[Any], path: str, pattern: str | None, accepts: Callable[..., bool]
) -> npt.NDArray[np.bool_]:
    """Where each value of a column is one the server accepts in `path`: by `pattern` (what the
    server's check for that field admits, tests/test_history_import.py shows), else each distinct
    value checked once (more than _DISTINCT of them: no row is known good)."""
    if pattern is not None:
        assert isinstance(column, pa.Array)
        return _np(pc.match_substring_regex(column, pattern), np.bool_)
    if isinstance(column, np.ndarray):
        distinct, indices = np.unique(column, return_inverse=True)
        if len(distinct) > _DISTINCT:
            return np.zeros(len(column), np.bool_)
        checked: npt.NDArray[np.bool_] = np.array([accepts(**{path: v.item()}) for v in distinct], np.bool_)
        return checked[indices]
    encoded = pc.dictionary_encode(column)
    if len(encoded.dictionary) > _DISTINCT:
        return np.zeros(len(column), np.bool_)
    good = np.array([accepts(**{path: v}) for v in encoded.dictionary.to_pylist()], np.bool_)
    by_row: npt.NDArray[np.bool_] = good[_np(encoded.indices, np.int64)]
    return by_row


class _Columns(NamedTuple):
    """A batch's rows that surely are valid (`good`), with every field of their events as columns."""

    good: npt.NDArray[np.bool_]
    text: dict[str, pa.Array]
    typed: dict[str, npt.NDArray[Any]]
    at_us: npt.NDArray[np.int64]


def _columnar(batch: pa.RecordBatch, limits: Limits, now: float) -> _Columns:
    n = batch.num_rows
    text = {name: _text(batch, name) for name in _STRING_COLUMNS if _KINDS[name] == "string"}
    kinds = {"int": np.int64, "enum": np.int64, "bool": np.bool_, "float": np.float64}
    typed: dict[str, npt.NDArray[Any]] = {}
    good = np.ones(n, np.bool_)
    for c in COLUMNS:
        if c.kind in kinds:
            typed[c.name], bad = _typed(batch, c.name, kinds[c.kind])
            good &= ~bad
    number = typed["attempt_number"]
    good &= (number >= 0) & (number <= _UINT32_MAX) & (typed["latency_ms"] >= 0)
    good &= typed["latency_ms"] <= _UINT32_MAX
    good &= (typed["amount_minor"] > 0) & (typed["amount_minor"] <= limits.max_amount_minor)
    payment_id = text["payment_id"]
    text["event_id"] = pc.if_else(
        pc.equal(text["event_id"], ""),
        pc.binary_join_element_wise(payment_id, pa.array(number).cast(pa.string()), ":"),
        text["event_id"],
    )
    text["request_id"] = pc.if_else(pc.equal(text["request_id"], ""), payment_id, text["request_id"])
    times = _epoch_us(batch.column("time"))
    known = np.array([t is not None for t in times], np.bool_)
    at_us = np.array([0 if t is None else t for t in times], np.int64)
    at_s = at_us / 1e6
    good &= known
    good &= at_s <= now + limits.max_future_skew_s - _TIME_MARGIN_S
    good &= at_s >= now - limits.max_past_age_s + _TIME_MARGIN_S
    template = _template(now)

    def accepts(**values: Any) -> bool:
        return _accepts(template, limits, now, **values)

    for name, (path, pattern) in _SETTERS.items():
        if not good.any():
            break
        values = text[name] if name in text else typed[name]
        good &= _checked_by_value(values, path, pattern, accepts)
    # status and response code are checked as a pair
    codes = pc.dictionary_encode(text["response_code"])
    if good.any() and len(codes.dictionary) <= _DISTINCT:
        code_list = codes.dictionary.to_pylist()
        pair = typed["status"] * len(code_list) + _np(codes.indices, np.int64)
        distinct, indices = np.unique(pair, return_inverse=True)
        ok = [
            accepts(status=int(p) // len(code_list), response_code=code_list[int(p) % len(code_list)])
            for p in distinct
        ]
        good &= np.array(ok, np.bool_)[indices]
    else:
        good[:] = False
    return _Columns(good, text, typed, at_us)


def _events(columns: _Columns, rows: npt.NDArray[np.int64]) -> pa.BinaryArray:
    """The serialized AttemptEvents of `rows` (as the row-by-row path's `SerializeToString()`)."""
    text = {k: v.take(rows) for k, v in columns.text.items()}
    typed = {k: v[rows] for k, v in columns.typed.items()}
    at_us = columns.at_us[rows]
    received = at_us + 1000 * typed["latency_ms"]

    def stamp(us: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.int64]]:
        return {"seconds": us // 1_000_000, "nanos": us % 1_000_000 * 1000}

    card = {
        "bin": text["card_bin"],
        "last4": text["card_last4"],
        "network": typed["card_network"],
        "funding": typed["card_funding"],
        "issuer_country": text["issuer_country"],
        "network_token": typed["network_token"],
        "fingerprint": text["card_fingerprint"],
    }
    merchant = {"id": text["merchant_id"], "mcc": text["merchant_mcc"], "country": text["merchant_country"]}
    attempt = {
        "merchant": merchant,
        "amount_minor": typed["amount_minor"],
        "currency": text["currency"],
        "card": card,
        "channel": typed["channel"],
        "initiator": typed["initiator"],
        "recurring": typed["recurring"],
        "attempt_number": typed["attempt_number"],
    }
    outcome = {
        "event_id": text["event_id"],
        "request_id": text["request_id"],
        "attempt": attempt,
        "route_id": text["route_id"],
        "status": typed["status"],
        "response_code": text["response_code"],
        "mastercard_mac": text["mastercard_mac"],
        "visa_category": typed["visa_category"],
        "latency_ms": typed["latency_ms"],
        "attempted_at": stamp(at_us),
    }
    fields = {"outcome": outcome, "received_at": stamp(received), "producer": Const(PRODUCER)}
    return encode(events_pb2.AttemptEvent.DESCRIPTOR, fields, len(rows))


def _file_key(path: Path) -> str:
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    return f"{path.stem}-{digest}"


_Choice = tuple[list[str], float]
_Checked = tuple[attempt_pb2.AttemptOutcome, _Choice | None]


class _Import:
    """One file's import in progress: each batch's rows sorted into rejects and accepted events."""

    def __init__(self, out_dir: Path, key: str, limits: Limits, now: float, columnar: bool) -> None:
        self.limits, self.now, self.columnar = limits, now, columnar
        self.writer = DayWriter(out_dir, key)
        self.decisions = DayWriter(out_dir, key, "decisions")
        self.seen: set[str] = set()
        self.rejects: list[tuple[int, str, str, str]] = []
        self.decided = 0

    def batch(self, batch: pa.RecordBatch, first_row: int) -> None:
        n = batch.num_rows
        columns = _columnar(batch, self.limits, self.now) if self.columnar else None
        good = columns.good if columns is not None else np.zeros(n, np.bool_)
        # the rows not surely good, row by row: an outcome and choice, or why not
        slow = np.flatnonzero(~good)
        outcomes = _outcomes(batch.take(slow))
        checked = dict(
            zip(slow.tolist(), (_check_row(r, self.limits, self.now) for r in outcomes), strict=True)
        )
        choices = _fast_choices(columns) if columns is not None else {}
        errors = {i: r for i, r in checked.items() if isinstance(r, _RowError)}
        errors.update((i, c) for i, c in choices.items() if isinstance(c, _RowError))
        ids = columns.text["event_id"].to_pylist() if columns is not None else [""] * n
        for i, result in checked.items():
            if not isinstance(result, _RowError):
                ids[i] = result[0].event_id
        accepted = self._accept(ids, errors, first_row)
        rows = np.array([i for i in accepted if good[i]], np.int64)
        if columns is not None and len(rows):
            self._write_columns(columns, rows, choices)
        for i in accepted:
            if not good[i]:
                self._write_row(*checked[i])  # type: ignore[misc]

    def _accept(self, ids: list[str], errors: dict[int, _RowError], first_row: int) -> list[int]:
        """The rows accepted, in order: not in `errors` and the first of their event id; the rest
        go to the rejects."""
        keep = np.ones(len(ids), np.bool_)
        keep[list(errors)] = False
        accepted: list[int] = np.flatnonzero(keep).tolist()
        kept_ids = [ids[i] for i in accepted] if errors else ids
        new_ids = set(kept_ids)
        if len(new_ids) == len(kept_ids) and self.seen.isdisjoint(new_ids):  # no repeated event id
            self.seen |= new_ids
            self.rejects += [
                (first_row + i, e.column, e.reason, e.message) for i, e in sorted(errors.items())
            ]
            return accepted
        accepted = []
        for i, event_id in enumerate(ids):
            error = errors.get(i)
            if error is None and event_id in self.seen:
                error = _RowError("event_id", "DUPLICATE_EVENT_ID", "event id repeats an earlier row")
            if error is not None:
                self.rejects.append((first_row + i, error.column, error.reason, error.message))
            else:
                self.seen.add(event_id)
                accepted.append(i)
        return accepted

    def _write_columns(
        self, columns: _Columns, rows: npt.NDArray[np.int64], choices: dict[int, _Choice | _RowError]
    ) -> None:
        events = _events(columns, rows)
        self.writer.add_many(columns.text["event_id"].take(rows), columns.at_us[rows], events)
        for j, i in enumerate(rows.tolist()):
            choice = choices.get(i)
            if choice is not None and not isinstance(choice, _RowError):
                self._write_decision(events_pb2.AttemptEvent.FromString(events[j].as_py()).outcome, choice)

    def _write_row(self, outcome: attempt_pb2.AttemptOutcome, choice: _Choice | None) -> None:
        at_us = outcome.attempted_at.ToMicroseconds()
        received = _timestamp(at_us + 1000 * outcome.latency_ms)
        event = events_pb2.AttemptEvent(outcome=outcome, received_at=received, producer=PRODUCER)
        self.writer.add(outcome.event_id, at_us, event.SerializeToString())
        if choice is not None:
            self._write_decision(outcome, choice)

    def _write_decision(self, outcome: attempt_pb2.AttemptOutcome, choice: _Choice) -> None:
        decision = _decision(outcome, *choice)
        at_us = outcome.attempted_at.ToMicroseconds()
        self.decisions.add(decision_id(decision), at_us, decision.SerializeToString())
        self.decided += 1


def _fast_choices(columns: _Columns) -> dict[int, _Choice | _RowError]:
    """The logged choices of the surely good rows (first attempts with candidates or a propensity)."""
    typed, text = columns.typed, columns.text
    logged = columns.good & (typed["attempt_number"] == 1)
    logged &= _np(pc.not_equal(text["candidate_routes"], ""), np.bool_) | (typed["logging_propensity"] != 0)
    choices: dict[int, _Choice | _RowError] = {}
    for i in np.flatnonzero(logged).tolist():
        route, candidates = text["route_id"][i].as_py(), text["candidate_routes"][i].as_py()
        choice = _logged_choice(1, route, candidates, float(typed["logging_propensity"][i]))
        if choice is not None:
            choices[i] = choice
    return choices


def import_file(
    path: Path,
    out_dir: Path,
    *,
    now: float | None = None,
    max_age_days: float = 3650,
    batch_rows: int = 65_536,
    progress: Callable[[int], None] | None = None,
    columnar: bool = True,
) -> ImportSummary:
    """Import one file into `out_dir`; raises ImportRefused for a file refused whole. `columnar`:
    the surely valid rows are checked and serialized column-wise (False: every row row by row; the
    same result, slower)."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    key = _file_key(path)
    summary = ImportSummary(files=[str(path)])
    rejects_path = out_dir / "rejects" / f"{key}.csv"
    run = _Import(out_dir, key, Limits(max_past_age_s=max_age_days * 86_400), now, columnar)
    writer, decisions = run.writer, run.decisions
    first_row = 1
    try:
        for batch in _batches(path, batch_rows):
            if first_row == 1:
                missing = [c for c in REQUIRED if c not in batch.schema.names]
                if missing:
                    raise ImportRefused(
                        f"{path}: required columns missing: {', '.join(missing)} (docs/history.md)"
                    )
                summary.ignored_columns = {n for n in batch.schema.names if n not in _KINDS}
            _scan_for_card_numbers(path, batch, first_row)
            run.batch(batch, first_row)
            first_row += batch.num_rows
            if progress is not None:
                progress(batch.num_rows)
    except BaseException:
        writer.abort()
        decisions.abort()
        raise
    summary.days = writer.commit()
    decisions.commit()
    summary.rows = first_row - 1
    summary.accepted = len(run.seen)
    summary.decisions = run.decided
    rejects = run.rejects
    summary.rejected = Counter(r[2] for r in rejects)
    if rejects:
        _write_rejects(rejects_path, path, rejects)
        summary.rejects_files = [str(rejects_path)]
    else:
        rejects_path.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - started
    meta = out_dir / "imports" / f"{key}.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def _write_rejects(target: Path, source: Path, rejects: Sequence[tuple[int, str, str, str]]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file", "row", "column", "reason", "message"])
        out.writerows((str(source), *r) for r in rejects)


def import_files(
    paths: Iterable[Path],
    out_dir: Path,
    *,
    now: float | None = None,
    max_age_days: float = 3650,
    progress: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Import every file in order. A refused file raises ImportRefused; the files before it stay
    imported and nothing of the refused one is written."""
    total = ImportSummary()
    for path in paths:
        total.add(import_file(path, out_dir, now=now, max_age_days=max_age_days, progress=progress))
    return total
