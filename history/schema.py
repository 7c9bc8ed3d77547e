"""The public import schema: a platform's authorization history, one row per attempt.

One table (`COLUMNS`) says each column's name, type, whether it is required and what it means;
`docs/history.md` shows it (tests/test_history.py checks the two agree) and `history.imports` reads
files by it. Values map onto `authopt.v1.AttemptOutcome`, the one event model, and are validated by
the server's own `validate_outcome`, so an imported event is exactly what `ReportOutcome` accepts.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["COLUMNS", "REQUIRED", "Column", "markdown_table"]

Kind = Literal["time", "string", "int", "bool", "enum", "float"]


class Column(NamedTuple):
    name: str
    kind: Kind
    required: bool
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("time", "time", True, "when the attempt was made: a Parquet timestamp, an ISO-8601 string "
           "(UTC unless it carries an offset) or epoch milliseconds"),
    Column("payment_id", "string", True, "the platform's payment id (with attempt_number: the event id)"),
    Column("attempt_number", "int", True, "1 for a payment's first attempt, 2 for its first retry, ..."),
    Column("merchant_id", "string", True, "the merchant's id"),
    Column("merchant_mcc", "string", True, "merchant category code, 4 digits"),
    Column("merchant_country", "string", True, "ISO 3166-1 alpha-2"),
    Column("amount_minor", "int", True, "amount in minor units of the currency"),
    Column("currency", "string", True, "ISO 4217 alphabetic code"),
    Column("card_bin", "string", True, "the card's first 6-8 digits (never the full number)"),
    Column("card_last4", "string", False, "the card's last 4 digits"),
    Column("card_network", "enum", True, "visa, mastercard, amex, discover, ... (authopt.v1.CardNetwork)"),
    Column("card_funding", "enum", False, "credit, debit or prepaid"),
    Column("issuer_country", "string", True, "ISO 3166-1 alpha-2 of the issuer"),
    Column("network_token", "bool", False, "true when the attempt used a network token"),
    Column("card_fingerprint", "string", True, "an opaque, stable id of the card (never the card number)"),
    Column("channel", "enum", False, "ecommerce, recurring or moto"),
    Column("initiator", "enum", False, "customer or merchant"),
    Column("recurring", "bool", False, "true for a recurring (subscription) payment"),
    Column("route_id", "string", True, "the acquirer route the attempt was sent through"),
    Column("status", "enum", True, "approved, declined or error"),
    Column("response_code", "string", False, "ISO 8583 response code; required when declined"),
    Column("mastercard_mac", "string", False, "Mastercard Merchant Advice Code, 2 digits"),
    Column("visa_category", "int", False, "Visa decline category 1-4"),
    Column("latency_ms", "int", False, "route latency from send to answer, milliseconds"),
    Column("request_id", "string", False, "the Recommend request id whose decision the attempt followed; "
           "default payment_id (a payment's attempts share it: training groups attempts by it)"),
    Column("event_id", "string", False, "a unique id of the attempt; default <payment_id>:<attempt_number>"),
    Column("candidate_routes", "string", False, "first attempts: the routes the platform's routing chose "
           "among, `;`-separated, route_id one of them (with logging_propensity)"),
    Column("logging_propensity", "float", False, "first attempts: the probability with which the "
           "platform's routing chose route_id among candidate_routes, in (0, 1]: what off-policy "
           "evaluation weighs by"),
)  # fmt: skip

REQUIRED = tuple(c.name for c in COLUMNS if c.required)


def markdown_table() -> str:
    """The schema as the Markdown table docs/history.md shows."""
    rows = ["| column | type | required | meaning |", "|---|---|---|---|"]
    rows += [f"| `{c.name}` | {c.kind} | {'yes' if c.required else 'no'} | {c.meaning} |" for c in COLUMNS]
    return "\n".join(rows)
