"""Attempt events written out in the public import schema (`history.schema`): the inverse of an import.

What `authopt world history` writes: a simulated world's history as a platform would hand it over
(Parquet or CSV, one row per attempt, enums as their lower-case names), so that a model trained with
`authopt train --log` learns through the same door as a platform's own data. An event written here
and imported again is the same `AttemptOutcome` (tests/test_history.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from authopt.v1 import attempt_pb2, events_pb2
from history.errors import HistoryError
from history.schema import COLUMNS

__all__ = ["history_table", "write_history"]

_TYPES: dict[str, pa.DataType] = {
    "time": pa.timestamp("us", tz="UTC"),
    "string": pa.string(),
    "enum": pa.string(),
    "int": pa.int64(),
    "bool": pa.bool_(),
    "float": pa.float64(),
}


def _names(enum: Any, prefix: str) -> dict[int, str]:
    return {v.number: v.name[len(prefix) :].lower() if v.number else "" for v in enum.DESCRIPTOR.values}


_NETWORK = _names(attempt_pb2.CardNetwork, "CARD_NETWORK_")
_FUNDING = _names(attempt_pb2.CardFunding, "CARD_FUNDING_")
_CHANNEL = _names(attempt_pb2.Channel, "CHANNEL_")
_INITIATOR = _names(attempt_pb2.Initiator, "INITIATOR_")
_STATUS = _names(attempt_pb2.OutcomeStatus, "OUTCOME_STATUS_")


LoggedChoice = tuple[Sequence[str], float]  # (candidate routes, propensity of the route chosen)


def history_table(
    events: Iterable[events_pb2.AttemptEvent], choices: Mapping[str, LoggedChoice] | None = None
) -> pa.Table:
    """The events' outcomes as one table in the import schema. The payment id is the request id
    (a payment's attempts share it); the event id is kept as it is. `choices` gives, by event id,
    the logging policy's candidates and propensity of first attempts (`candidate_routes`,
    `logging_propensity`)."""
    cols: dict[str, list[Any]] = {c.name: [] for c in COLUMNS}
    choices = choices or {}
    for event in events:
        o = event.outcome
        candidates, propensity = choices.get(o.event_id, ((), None))
        a, m, c = o.attempt, o.attempt.merchant, o.attempt.card
        row = {
            "time": o.attempted_at.ToMicroseconds(),
            "payment_id": o.request_id,
            "attempt_number": a.attempt_number,
            "merchant_id": m.id,
            "merchant_mcc": m.mcc,
            "merchant_country": m.country,
            "amount_minor": a.amount_minor,
            "currency": a.currency,
            "card_bin": c.bin,
            "card_last4": c.last4,
            "card_network": _NETWORK[c.network],
            "card_funding": _FUNDING[c.funding],
            "issuer_country": c.issuer_country,
            "network_token": c.network_token,
            "card_fingerprint": c.fingerprint,
            "channel": _CHANNEL[a.channel],
            "initiator": _INITIATOR[a.initiator],
            "recurring": a.recurring,
            "route_id": o.route_id,
            "status": _STATUS[o.status],
            "response_code": o.response_code,
            "mastercard_mac": o.mastercard_mac,
            "visa_category": int(o.visa_category),
            "latency_ms": o.latency_ms,
            "request_id": o.request_id,
            "event_id": o.event_id,
            "candidate_routes": ";".join(candidates) or None,
            "logging_propensity": propensity,
        }
        for name, value in row.items():
            cols[name].append(value)
    return pa.table({c.name: pa.array(cols[c.name], _TYPES[c.kind]) for c in COLUMNS})


def write_history(
    events: Iterable[events_pb2.AttemptEvent], path: Path, choices: Mapping[str, LoggedChoice] | None = None
) -> int:
    """Write the events to `path` (.parquet or .csv) in the import schema; returns the row count."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise HistoryError(f"{path}: write a .parquet or .csv file")
    table = history_table(events, choices)
    tmp = path.with_name(f".{path.name}.tmp")
    if suffix == ".parquet":
        pq.write_table(table, tmp, compression="zstd")
    else:
        pacsv.write_csv(table, tmp)
    tmp.replace(path)
    return int(table.num_rows)
