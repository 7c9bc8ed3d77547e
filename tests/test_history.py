"""`authopt log import`: a platform's history in the public schema into validated, day-partitioned events."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from authopt.v1 import attempt_pb2
from history import ImportRefused, import_file, read_events
from history.schema import COLUMNS, REQUIRED, markdown_table
from server.validation import Limits, validate_outcome

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.now(UTC).replace(microsecond=0)


def _row(i: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "time": NOW - timedelta(days=2, hours=i),
        "payment_id": f"pay-{i}",
        "attempt_number": 1,
        "merchant_id": "m-1",
        "merchant_mcc": "5411",
        "merchant_country": "DE",
        "amount_minor": 1_000 + i,
        "currency": "EUR",
        "card_bin": "41111111",
        "card_last4": "1111",
        "card_network": "visa",
        "card_funding": "credit",
        "issuer_country": "DE",
        "network_token": False,
        "card_fingerprint": f"fp-{i % 3}",
        "channel": "ecommerce",
        "initiator": "customer",
        "recurring": False,
        "route_id": "acq-a" if i % 2 else "acq-b",
        "status": "approved" if i % 3 else "declined",
        "response_code": "" if i % 3 else "51",
        "mastercard_mac": "",
        "visa_category": 2 if i % 3 == 0 else None,
        "latency_ms": 200 + i,
        "request_id": f"req-{i}",
    }
    row.update(overrides)
    return row


# Each bad row and the (column, reason) it must be rejected with.
BAD = [
    (_row(100, currency="XYZ"), ("currency", "UNKNOWN_CURRENCY")),
    (_row(101, card_bin="41a1"), ("card_bin", "INVALID_BIN")),
    (_row(102, amount_minor=0), ("amount_minor", "INVALID_AMOUNT")),
    (_row(103, time=NOW + timedelta(days=1)), ("time", "TIMESTAMP_IN_FUTURE")),
    (_row(104, card_network="dinersclubz"), ("card_network", "INVALID_ENUM")),
    (_row(105, status="declined", response_code=""), ("response_code", "INVALID_RESPONSE_CODE")),
    (_row(106, amount_minor="12,50"), ("amount_minor", "INVALID_VALUE")),
    (_row(1, payment_id="pay-1"), ("event_id", "DUPLICATE_EVENT_ID")),  # row 1's event id again
]


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {c.name: [r.get(c.name) for r in rows] for c in COLUMNS if any(c.name in r for r in rows)}
    # amount_minor holds a bad string in one row: a string column then, as a CSV export would have it
    if any(isinstance(v, str) for v in cols["amount_minor"]):
        cols["amount_minor"] = [None if v is None else str(v) for v in cols["amount_minor"]]
    return pa.table(cols)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(_table(rows), path)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    names = [c.name for c in COLUMNS if c.name in rows[0]]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(names)
        for r in rows:
            values = [r.get(n) for n in names]
            out.writerow(
                ["" if v is None else v.isoformat() if isinstance(v, datetime) else str(v).lower()
                 if isinstance(v, bool) else v for v in values]
            )  # fmt: skip
    return path


def _rejects(summary_files: list[str]) -> list[dict[str, str]]:
    assert len(summary_files) == 1
    with open(summary_files[0], newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_import_accepts_valid_rows_and_rejects_each_bad_one_with_row_column_and_reason(
    tmp_path: Path, fmt: str
) -> None:
    good = [_row(i) for i in range(60)]
    rows = good[:30] + [b for b, _ in BAD] + good[30:]
    src = (_write_parquet if fmt == "parquet" else _write_csv)(tmp_path / f"history.{fmt}", rows)
    out = tmp_path / "logs"
    summary = import_file(src, out)
    assert (summary.rows, summary.accepted) == (len(rows), len(good))
    assert sum(summary.rejected.values()) == len(BAD)
    rejects = _rejects(summary.rejects_files)
    got = [(int(r["row"]), r["column"], r["reason"]) for r in rejects]
    assert got == [(31 + k, column, reason) for k, (_, (column, reason)) in enumerate(BAD)]
    assert all(r["message"] and r["file"] == str(src) for r in rejects)
    # The events: every accepted row, each what ReportOutcome would accept, in time order.
    events = list(read_events(out))
    assert sorted(e.outcome.event_id for e in events) == sorted(f"pay-{i}:1" for i in range(60))
    times = [e.outcome.attempted_at.ToMicroseconds() for e in events]
    assert times == sorted(times)
    for e in events:
        validate_outcome(e.outcome, Limits(max_past_age_s=3650 * 86400), time.time())
        assert (
            e.received_at.ToMicroseconds()
            == e.outcome.attempted_at.ToMicroseconds() + 1000 * e.outcome.latency_ms
        )
    first = next(e for e in events if e.outcome.event_id == "pay-0:1")
    assert first.outcome.status == attempt_pb2.OUTCOME_STATUS_DECLINED and first.outcome.response_code == "51"
    assert first.outcome.visa_category == attempt_pb2.VISA_DECLINE_CATEGORY_2_CANNOT_APPROVE_NOW
    assert first.outcome.attempt.card.network == attempt_pb2.CARD_NETWORK_VISA
    assert first.outcome.attempt.card.bin == "41111111" and first.outcome.request_id == "req-0"
    # Day partitions: 60 hourly rows from two days back span three or four UTC days.
    days = sorted(p.parent.name for p in (out / "attempts").glob("day=*/*.parquet"))
    assert days == sorted(f"day={d}" for d in summary.days) and len(days) >= 3
    assert (
        json.loads((out / "imports" / f"{Path(summary.rejects_files[0]).stem}.json").read_text())["accepted"]
        == 60
    )


def test_importing_a_file_again_replaces_what_it_produced(tmp_path: Path) -> None:
    src = _write_parquet(tmp_path / "h.parquet", [_row(i) for i in range(40)])
    out = tmp_path / "logs"
    import_file(src, out)
    import_file(src, out)
    assert len(list(read_events(out))) == 40
    _write_parquet(src, [_row(i) for i in range(5)])  # the file shrank: days it no longer has go
    summary = import_file(src, out)
    assert len(list(read_events(out))) == 5
    assert len(list((out / "attempts").glob("day=*/*.parquet"))) == len(summary.days)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("merchant_id", "4111 1111 1111 1111"),
        ("card_fingerprint", "fp-5555555555554444"),
        ("note", "customer card 3782-822463-10005"),  # a column outside the schema is scanned too
        ("card_number", 4111111111111111),  # as an integer
    ],
)
def test_a_file_with_a_card_number_is_refused_whole_and_the_number_is_never_written(
    tmp_path: Path, column: str, value: Any
) -> None:
    rows = [_row(i) for i in range(10)]
    good_src = _write_parquet(tmp_path / "good.parquet", rows)
    rows[7][column] = value
    table = _table(rows)
    if column not in table.column_names:
        filler = 0 if isinstance(value, int) else ""
        table = table.append_column(column, pa.array([r.get(column, filler) for r in rows]))
    src = tmp_path / "bad.parquet"
    pq.write_table(table, src)
    out = tmp_path / "logs"
    import_file(good_src, out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ImportRefused) as exc:
        import_file(src, out)
    message = str(exc.value)
    assert f"column {column!r}, row 8" in message and "card number" in message
    digits = "".join(ch for ch in str(value) if ch.isdigit())
    assert digits not in message.replace(" ", "").replace("-", "")
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing of the refused file written
    for path in out.rglob("*"):
        if path.is_file():
            assert digits.encode() not in path.read_bytes()


def test_a_file_missing_required_columns_is_refused_naming_them(tmp_path: Path) -> None:
    table = _table([_row(i) for i in range(3)]).drop_columns(["currency", "route_id"])
    src = tmp_path / "h.parquet"
    pq.write_table(table, src)
    with pytest.raises(ImportRefused, match="required columns missing: currency, route_id"):
        import_file(src, tmp_path / "logs")


def test_unreadable_and_unknown_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "h.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ImportRefused, match="cannot be read"):
        import_file(junk, tmp_path / "logs")
    other = tmp_path / "h.json"
    other.write_text("{}")
    with pytest.raises(ImportRefused, match=r"not a \.parquet or \.csv file"):
        import_file(other, tmp_path / "logs")


def test_docs_show_the_schema_the_code_reads() -> None:
    doc = (ROOT / "docs" / "history.md").read_text()
    assert markdown_table() in doc
    assert set(REQUIRED) <= {c.name for c in COLUMNS}


def test_cli_imports_and_prints_a_summary(tmp_path: Path) -> None:
    src = _write_csv(tmp_path / "h.csv", [_row(i) for i in range(20)] + [BAD[0][0]])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "log",
            "import",
            str(src),
            "--out",
            str(tmp_path / "logs"),
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["rows"], summary["accepted"], summary["rejected_by_reason"]) == (
        21,
        20,
        {"UNKNOWN_CURRENCY": 1},
    )
    bad = _write_csv(tmp_path / "bad.csv", [_row(0, merchant_id="6011 0009 9013 9424")])
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "log", "import", str(bad), "--out", str(tmp_path / "logs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "merchant_id" in proc.stderr and "6011" not in proc.stderr


def test_the_platforms_first_attempt_choices_become_decisions_and_bad_pairs_are_rejected(
    tmp_path: Path,
) -> None:
    from history.store import read_decisions

    rows = [
        _row(1, route_id="acq-b", candidate_routes="acq-a; acq-b", logging_propensity=0.25),
        _row(
            2, payment_id="pay-1", attempt_number=2, candidate_routes="x;y", logging_propensity=7.0
        ),  # retry
        _row(3),  # no logged choice: an attempt, no decision
        _row(4, route_id="acq-c", candidate_routes="acq-a;acq-b", logging_propensity=0.5),
        _row(5, candidate_routes="acq-a;acq-a", logging_propensity=0.5),
        _row(6, route_id="acq-a", candidate_routes="acq-a;acq-b", logging_propensity=1.5),
        _row(7, route_id="acq-a", candidate_routes="", logging_propensity=0.5),
    ]
    for fmt, write in (("parquet", _write_parquet), ("csv", _write_csv)):
        out = tmp_path / fmt
        summary = import_file(write(tmp_path / f"h.{fmt}", rows), out)
        assert (summary.accepted, summary.decisions) == (3, 1), fmt
        assert [(r["row"], r["column"]) for r in _rejects(summary.rejects_files)] == [
            ("4", "candidate_routes"),
            ("5", "candidate_routes"),
            ("6", "logging_propensity"),
            ("7", "candidate_routes"),
        ], fmt
        (decision,) = read_decisions(out)
        assert [c.id for c in decision.request.candidates] == ["acq-a", "acq-b"]
        assert decision.request.request_id == "req-1" and decision.response.routes[0].route_id == "acq-b"
        assert list(decision.first_position_propensities) == [0.25] == [decision.response.propensity]
        assert (
            decision.decided_at
            == next(e for e in read_events(out) if e.outcome.request_id == "req-1").outcome.attempted_at
        )
