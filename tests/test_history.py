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


# --- the columnar path: the same import, faster ----------------------------------------------------

# A bad value of every kind the server or the schema rejects, for each column (None: absent).
_MUTATIONS: dict[str, list[Any]] = {
    "payment_id": ["", "p\x07", "x" * 130],
    "attempt_number": [-1, 2**33],
    "merchant_id": ["", "m\u00e9", "m" * 65],
    "merchant_mcc": ["541", "54a1", "", 5411],
    "merchant_country": ["de", "DEU", ""],
    "amount_minor": [0, -5, 10**13],
    "currency": ["eur", "XYZ", ""],
    "card_bin": ["41111", "411111111", "4111a1", ""],
    "card_last4": ["111", "11a1"],
    "card_network": ["dinersclubz", "", "VISA", "mastercard"],
    "card_funding": ["bogus", "debit"],
    "issuer_country": ["D1", "", "FR"],
    "network_token": [True],
    "card_fingerprint": ["", "f\n", "f" * 129],
    "channel": ["fax", "moto"],
    "initiator": ["robot", "merchant"],
    "route_id": ["", "r" * 65, "acq-\u00e4"],
    "status": ["maybe", "error", "declined", "approved"],
    "response_code": ["5", "0a", "00", "51", "N7"],
    "mastercard_mac": ["3", "03", "a1"],
    "visa_category": [7, 4, -1],
    "latency_ms": [-3, 2**32, 2**32 - 1],
    "request_id": ["r\x00", "q" * 129, "req-x"],
    "event_id": ["", "e" * 129, "dup-1", "dup-1"],
    "time": [NOW + timedelta(minutes=6), NOW - timedelta(days=3700), NOW + timedelta(minutes=4)],
}


def _mixed_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows, most good, about one in four with one or two values from _MUTATIONS, some with
    logged choices (good and bad) and some repeating an earlier row's event id."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = _row(
            i,
            card_fingerprint=f"fp-{rng.randrange(50)}",
            event_id="",
            candidate_routes="",
            logging_propensity=None,
        )
        for _ in range(rng.choice([0, 0, 0, 0, 0, 1, 2])):
            column = rng.choice(sorted(_MUTATIONS))
            row[column] = rng.choice(_MUTATIONS[column])
        if rng.random() < 0.3:
            row["candidate_routes"] = rng.choice(["acq-a;acq-b", "acq-b", "acq-a;acq-a", ""])
            row["logging_propensity"] = rng.choice([0.5, 1.0, 0.0, 1.5])
        if rng.random() < 0.03:
            row["payment_id"] = f"pay-{rng.randrange(max(i, 1))}"  # an earlier row's event id again
        rows.append(row)
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_the_columnar_path_accepts_rejects_and_writes_exactly_what_row_by_row_does(
    tmp_path: Path, fmt: str
) -> None:
    from history.store import read_records

    rows = _mixed_rows(3_000, seed=5)
    for row in rows:  # one type per column, as a file has it
        for name in ("amount_minor", "attempt_number", "latency_ms", "visa_category", "merchant_mcc"):
            if row.get(name) is not None:
                row[name] = str(row[name])
    src = (_write_parquet if fmt == "parquet" else _write_csv)(tmp_path / f"h.{fmt}", rows)
    # one clock, the rows' own: a reject's message says how far in the future, and NOW + 6 minutes
    # must still be ahead when this test runs late in a long suite
    summaries, now = {}, NOW.timestamp()
    for columnar in (True, False):
        out = tmp_path / f"out-{columnar}"
        summaries[columnar] = import_file(src, out, batch_rows=700, columnar=columnar, now=now)
        summaries[columnar].seconds = 0.0
    fast, slow = summaries[True], summaries[False]
    assert fast.as_dict() | {"rejects_files": []} == slow.as_dict() | {"rejects_files": []}
    assert 1_500 < fast.accepted < 2_900 and fast.decisions > 100 and len(fast.rejected) >= 15
    assert _rejects(fast.rejects_files) == _rejects(slow.rejects_files)
    for kind in ("attempts", "decisions"):
        a, b = read_records(tmp_path / "out-True", kind), read_records(tmp_path / "out-False", kind)  # type: ignore[arg-type]
        assert a == b and len(a.records) > 100


def test_each_column_pattern_admits_only_what_the_server_accepts() -> None:
    """The columnar path takes a row as good when its text matches its column's pattern: every
    match must be a value the server's validation accepts in that field."""
    import pyarrow.compute as pc
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from history import imports

    limits, now = Limits(max_past_age_s=3650 * 86400), time.time()
    template = imports._template(now)
    alphabet = st.sampled_from([*"0123456789AZaz -_:\x00\x07\x7f\x1f~é٣", "\U0001f4b3"])
    patterned = {k: v for k, v in imports._SETTERS.items() if v[1] is not None}
    examples = {"merchant_mcc": "5411", "card_bin": "41111111", "card_last4": "", "mastercard_mac": "03"}

    @settings(max_examples=300, deadline=None)
    @given(text=st.text(alphabet, max_size=12) | st.text(alphabet, min_size=60, max_size=140))
    def check(text: str) -> None:
        for column, (path, pattern) in patterned.items():
            assert pattern is not None
            if pc.match_substring_regex(pa.array([text]), pattern)[0].as_py():
                assert imports._accepts(template, limits, now, **{path: text}), (column, text)

    check()
    for column, (path, pattern) in patterned.items():  # and a usual value matches: the path is used
        value = examples.get(column, "DE" if "country" in column else "abc-1")
        assert pc.match_substring_regex(pa.array([value]), pattern)[0].as_py(), column
        assert imports._accepts(template, limits, now, **{path: value}), column


def test_values_an_event_cannot_hold_are_rejected_not_a_crash(tmp_path: Path) -> None:
    rows = [_row(0), _row(1, latency_ms=2**32), _row(2, attempt_number=2**40), _row(3, amount_minor=2**64)]
    for columnar in (True, False):
        summary = import_file(
            _write_csv(tmp_path / "h.csv", rows), tmp_path / f"o{columnar}", columnar=columnar
        )
        assert summary.accepted == 1
        assert [(r["column"], r["reason"]) for r in _rejects(summary.rejects_files)] == [
            ("latency_ms", "INVALID_VALUE"),
            ("attempt_number", "INVALID_VALUE"),
            ("amount_minor", "INVALID_VALUE"),
        ]


def test_messages_serialized_column_wise_equal_serialize_to_string() -> None:
    import random

    import numpy as np
    from google.protobuf.timestamp_pb2 import Timestamp

    from authopt.v1 import events_pb2
    from history.columnar import Const, encode

    rng = random.Random(3)
    n = 400
    text = [rng.choice(["", "a", "é" * 70, "x" * 200, "pay-1:1"]) for _ in range(n)]
    amount = np.array([rng.choice([0, 1, 127, 128, 2**35, -1, -(2**63), 2**63 - 1]) for _ in range(n)])
    status = np.array([rng.randrange(4) for _ in range(n)])
    flag = np.array([rng.random() < 0.5 for _ in range(n)])
    seconds = np.array([rng.choice([0, 1_700_000_000, 2**33]) for _ in range(n)])
    fields = {
        "outcome": {
            "event_id": pa.array(text),
            "attempt": {
                "merchant": {"id": pa.array(text), "mcc": Const("5411"), "country": Const("")},
                "amount_minor": amount,
                "recurring": flag,
            },
            "status": status,
            "attempted_at": {"seconds": seconds},
        },
        "producer": Const("authopt-test"),
    }
    got = encode(events_pb2.AttemptEvent.DESCRIPTOR, fields, n).to_pylist()
    for i in range(n):
        want = events_pb2.AttemptEvent(
            outcome=attempt_pb2.AttemptOutcome(
                event_id=text[i],
                attempt=attempt_pb2.Attempt(
                    merchant=attempt_pb2.Merchant(id=text[i], mcc="5411"),
                    amount_minor=int(amount[i]),
                    recurring=bool(flag[i]),
                ),
                status=int(status[i]),
                attempted_at=Timestamp(seconds=int(seconds[i])),
            ),
            producer="authopt-test",
        )
        assert got[i] == want.SerializeToString(), i
    with pytest.raises(KeyError, match="no field"):
        encode(events_pb2.AttemptEvent.DESCRIPTOR, {"nope": Const(1)}, n)
