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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from google.protobuf.timestamp_pb2 import Timestamp

from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from history.errors import HistoryError
from history.schema import COLUMNS, REQUIRED
from history.store import DayWriter, decision_id
from server.errors import InvalidArgument
from server.pan import RUN_PATTERN, contains_card_number
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
            column = pc.cast(column, pa.string())
        elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
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


def _int(column: str, value: Any) -> int | _RowError:
    if value is None or value == "":
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError):
        return _RowError(column, "INVALID_VALUE", f"{column} is not an integer")
    if number < 0 and column != "amount_minor":
        return _RowError(column, "INVALID_VALUE", f"{column} must not be negative")
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
        low = pc.min(column).as_py()
        if name == "amount_minor" or low is None or low >= 0:  # else: per value, naming the bad ones
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
    row: _Row | _RowError, limits: Limits, now: float, seen: set[str]
) -> tuple[attempt_pb2.AttemptOutcome, tuple[list[str], float] | None] | _RowError:
    """A row's validated outcome and logged choice, or why it is rejected."""
    if isinstance(row, _RowError):
        return row
    try:
        validate_outcome(row.outcome, limits, now, field_prefix="", pan_checked=True)
    except InvalidArgument as err:
        return _RowError(_FIELD_COLUMN.get(err.field, err.field), err.reason, err.message)
    if row.outcome.event_id in seen:
        return _RowError("event_id", "DUPLICATE_EVENT_ID", "event id repeats an earlier row")
    choice = _logged_choice(row)
    if isinstance(choice, _RowError):
        return choice
    return row.outcome, choice


_MAX_CANDIDATES = 256
_MAX_ROUTE_ID = 64


def _logged_choice(row: _Row) -> tuple[list[str], float] | _RowError | None:
    """The logging policy's candidates and propensity of a first attempt (None: not logged, or a
    retry, whose routing is not a first-position choice); a _RowError for an inconsistent pair."""
    if row.outcome.attempt.attempt_number != 1 or (not row.candidates and not row.propensity):
        return None
    if not 0 < row.propensity <= 1:
        return _RowError(
            "logging_propensity",
            "INVALID_VALUE",
            "logging_propensity must be in (0, 1] with candidate_routes",
        )
    routes = [r.strip() for r in row.candidates.split(";")]
    if not row.candidates or not all(routes) or len(set(routes)) != len(routes):
        return _RowError(
            "candidate_routes",
            "INVALID_VALUE",
            "candidate_routes must list distinct route ids separated by ';' (with logging_propensity)",
        )
    if len(routes) > _MAX_CANDIDATES or any(len(r) > _MAX_ROUTE_ID for r in routes):
        return _RowError(
            "candidate_routes", "INVALID_VALUE", "candidate_routes: too many or too long route ids"
        )
    if row.outcome.route_id not in routes:
        return _RowError("candidate_routes", "INVALID_VALUE", "route_id is not one of candidate_routes")
    return routes, row.propensity


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


def _file_key(path: Path) -> str:
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    return f"{path.stem}-{digest}"


def import_file(
    path: Path,
    out_dir: Path,
    *,
    now: float | None = None,
    max_age_days: float = 3650,
    batch_rows: int = 65_536,
    progress: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Import one file into `out_dir`; raises ImportRefused for a file refused whole."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    limits = Limits(max_past_age_s=max_age_days * 86_400)
    key = _file_key(path)
    summary = ImportSummary(files=[str(path)])
    rejects_path = out_dir / "rejects" / f"{key}.csv"
    writer = DayWriter(out_dir, key)
    decisions = DayWriter(out_dir, key, "decisions")
    seen: set[str] = set()
    rejects: list[tuple[int, str, str, str]] = []
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
            n = batch.num_rows
            for i, row in enumerate(_outcomes(batch)):
                checked = _check_row(row, limits, now, seen)
                if isinstance(checked, _RowError):
                    rejects.append((first_row + i, checked.column, checked.reason, checked.message))
                    continue
                built, choice = checked
                seen.add(built.event_id)
                at_us = built.attempted_at.ToMicroseconds()
                received = at_us + 1000 * built.latency_ms
                event = events_pb2.AttemptEvent(
                    outcome=built, received_at=_timestamp(received), producer=PRODUCER
                )
                writer.add(built.event_id, at_us, event.SerializeToString())
                if choice is not None:
                    decision = _decision(built, *choice)
                    decisions.add(decision_id(decision), at_us, decision.SerializeToString())
                    summary.decisions += 1
            first_row += n
            if progress is not None:
                progress(n)
    except BaseException:
        writer.abort()
        decisions.abort()
        raise
    summary.days = writer.commit()
    decisions.commit()
    summary.rows = first_row - 1
    summary.accepted = len(seen)
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
