"""Request validation for the optimizer API.

Every check raises :class:`~server.errors.InvalidArgument` with a stable ``reason`` and the dotted proto
path of the offending ``field`` (``"attempt.card.bin"``, ``"candidates[3].id"``). The first failing check
wins, in this order: card numbers anywhere in the message (``PAN_DETECTED``), then the fields top-down.

Messages name the field and what is expected. They quote a value only when it is shorter than 12
characters, so no message can carry a card number (12-19 digits).

Reason conventions:

- ``MISSING_FIELD``: an identifier, the BIN, the currency, a sub-message or a timestamp is absent.
- Other formatted codes have one reason each, also when empty: ``INVALID_MCC``, ``INVALID_COUNTRY``,
  ``INVALID_RESPONSE_CODE`` (required on prior attempts and DECLINED outcomes).
- ``INVALID_ENUM``: a number not defined by the proto enum, and an unset ``OutcomeStatus``.
- ``INVALID_COST``: a candidate's ``cost_bps`` over 10000 or ``fixed_fee_minor`` outside
  0..``max_amount_minor``.

This runs on every request: the hot path reads fields directly and builds strings only on failure. The
only reflection is in :func:`find_card_number`: per-type field lists built once from the descriptors,
walked only when a cheap scan of the serialized message finds 12 digits in a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from authopt.v1 import attempt_pb2, optimizer_pb2
from server.currencies import MINOR_UNITS
from server.errors import InvalidArgument
from server.pan import MIN_PAN as _MIN_PAN
from server.pan import contains_card_number as _has_pan

__all__ = [
    "Limits",
    "find_card_number",
    "validate_outcome",
    "validate_outcomes",
    "validate_recommend",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a request must stay within."""

    max_candidates: int = 16
    max_prior_attempts: int = 32
    #: Timestamps more than this many seconds after the server's clock are rejected.
    max_future_skew_s: float = 300.0
    #: Prior attempts and outcomes older than this many seconds are rejected.
    max_past_age_s: float = 400 * 86400
    #: Largest accepted amount, in minor currency units.
    max_amount_minor: int = 10**12
    #: Most outcomes in one ReportOutcomes call.
    max_batch: int = 500
    #: Largest accepted RecommendRequest.latency_budget_ms.
    max_latency_budget_ms: int = 10_000


# --- card numbers -------------------------------------------------------------------------------------

# Pre-filter over the wire bytes. String fields are stored verbatim, so after mapping every digit to "0",
# everything else but the separators to "x", and deleting the separators, a message holding a card number
# has twelve "0" in a row. Two C calls; most requests stop here.
_WIRE_TABLE = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_WIRE_SEPARATORS = b" -"
_WIRE_NEEDLE = b"0" * _MIN_PAN
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


@dataclass(frozen=True, slots=True)
class _TextFields:
    """Where a message type can hold text: its string fields and the sub-messages that may have some.

    Built once per message type from its descriptor, so the walk reads fields by name instead of calling
    ``ListFields()`` (which costs more than all the other checks together) on every sub-message.
    """

    strings: tuple[str, ...]
    repeated_strings: tuple[str, ...]
    messages: tuple[str, ...]
    repeated_messages: tuple[str, ...]
    # name, key is a string, value kind (_STRING, _MESSAGE or another type)
    maps: tuple[tuple[str, bool, int], ...]

    @property
    def empty(self) -> bool:
        return not (
            self.strings or self.repeated_strings or self.messages or self.repeated_messages or self.maps
        )


_PLANS: dict[str, _TextFields] = {}  # by message full name, while building
_PLANS_BY_TYPE: dict[type[Message], _TextFields] = {}  # by class, for the walk


def _plan(descriptor: Any) -> _TextFields:
    # ``Any``: the upb runtime's descriptor type is not the one typeshed declares.
    plan = _PLANS.get(descriptor.full_name)
    if plan is not None:
        return plan
    # Placeholder first: a recursive message type refers to itself while its plan is being built.
    _PLANS[descriptor.full_name] = _TextFields(("",), (), (), (), ())
    strings: list[str] = []
    repeated_strings: list[str] = []
    messages: list[str] = []
    repeated_messages: list[str] = []
    maps: list[tuple[str, bool, int]] = []
    for field in descriptor.fields:
        sub = field.message_type
        if field.type == _STRING:
            (repeated_strings if field.is_repeated else strings).append(field.name)
        elif sub is not None and sub.GetOptions().map_entry:
            key, value = sub.fields_by_name["key"], sub.fields_by_name["value"]
            if (
                key.type == _STRING
                or value.type == _STRING
                or (value.message_type is not None and not _plan(value.message_type).empty)
            ):
                maps.append((field.name, key.type == _STRING, value.type))
        elif sub is not None and not _plan(sub).empty:
            (repeated_messages if field.is_repeated else messages).append(field.name)
    plan = _TextFields(
        tuple(strings), tuple(repeated_strings), tuple(messages), tuple(repeated_messages), tuple(maps)
    )
    _PLANS[descriptor.full_name] = plan
    return plan


def _find_in_map(entries: Any, key_is_text: bool, value_kind: int, path: str) -> str | None:
    for key, value in entries.items():
        if key_is_text and _has_pan(key):
            return f"{path}[<key>]"  # never the key itself: it is the card number
        if value_kind == _STRING and _has_pan(value):
            return f"{path}[{key!r}]"
        if value_kind == _MESSAGE:
            hit = _find_in(value, f"{path}[{key!r}].")
            if hit is not None:
                return hit
    return None


def _find_in_text(msg: Message, plan: _TextFields, prefix: str) -> str | None:
    for name in plan.strings:
        if _has_pan(getattr(msg, name)):
            return prefix + name
    for name in plan.repeated_strings:
        for i, text in enumerate(getattr(msg, name)):
            if _has_pan(text):
                return f"{prefix}{name}[{i}]"
    return None


def _find_in(msg: Message, prefix: str) -> str | None:
    plan = _PLANS_BY_TYPE.get(type(msg))
    if plan is None:
        plan = _PLANS_BY_TYPE[type(msg)] = _plan(msg.DESCRIPTOR)
    hit = _find_in_text(msg, plan, prefix)
    if hit is not None:
        return hit
    for name in plan.messages:
        if msg.HasField(name):
            hit = _find_in(getattr(msg, name), f"{prefix}{name}.")
            if hit is not None:
                return hit
    for name in plan.repeated_messages:
        for i, item in enumerate(getattr(msg, name)):
            hit = _find_in(item, f"{prefix}{name}[{i}].")
            if hit is not None:
                return hit
    for name, key_is_text, value_kind in plan.maps:
        hit = _find_in_map(getattr(msg, name), key_is_text, value_kind, prefix + name)
        if hit is not None:
            return hit
    return None


def find_card_number(msg: Message) -> str | None:
    """The dotted path of the first string field that holds a full card number, or ``None``.

    Looks at every string field, recursively, including repeated fields and map keys and values, for
    a run of 12-19 ASCII digits (single spaces or dashes allowed between digits) that is a card number:
    in a network's issuer range, at one of its lengths, with a valid Luhn check digit (`server.pan`).
    Bytes fields are not text and are not inspected.
    """
    wire = msg.SerializeToString().translate(_WIRE_TABLE, _WIRE_SEPARATORS)
    if _WIRE_NEEDLE not in wire:
        return None
    return _find_in(msg, "")


# --- field checks --------------------------------------------------------------------------------------


def _enum_numbers(enum: Any) -> frozenset[int]:
    return frozenset(v.number for v in enum.DESCRIPTOR.values)


_NETWORKS = _enum_numbers(attempt_pb2.CardNetwork)
_FUNDINGS = _enum_numbers(attempt_pb2.CardFunding)
_CHANNELS = _enum_numbers(attempt_pb2.Channel)
_INITIATORS = _enum_numbers(attempt_pb2.Initiator)
_VISA_CATEGORIES = _enum_numbers(attempt_pb2.VisaDeclineCategory)
_OUTCOME_STATUSES = _enum_numbers(attempt_pb2.OutcomeStatus) - {attempt_pb2.OUTCOME_STATUS_UNSPECIFIED}
_PRIOR_STATUSES = {
    attempt_pb2.OUTCOME_STATUS_UNSPECIFIED,
    attempt_pb2.OUTCOME_STATUS_DECLINED,
    attempt_pb2.OUTCOME_STATUS_ERROR,
}
_APPROVED = attempt_pb2.OUTCOME_STATUS_APPROVED
_DECLINED = attempt_pb2.OUTCOME_STATUS_DECLINED

_MAX_REQUEST_ID = 128
_MAX_ROUTE_ID = 64
_MAX_MERCHANT_ID = 64
_MAX_FINGERPRINT = 128
_MAX_EVENT_ID = 128
_MAX_COST_BPS = 10_000


def _fail(reason: str, field: str, message: str) -> NoReturn:
    raise InvalidArgument(reason, message, field=field)


def _show(value: str) -> str:
    """``value`` quoted when it is too short to hold a card number; its length otherwise."""
    return repr(value) if len(value) < _MIN_PAN else f"a {len(value)}-character value"


def _digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _id_ok(value: str, max_len: int) -> bool:
    return len(value) <= max_len and value.isascii() and value.isprintable()


# The checks below take the field's path as ``prefix`` + ``name`` and join them only on failure.


def _check_id(value: str, prefix: str, name: str, max_len: int) -> None:
    if not value:
        _fail("MISSING_FIELD", prefix + name, f"{prefix}{name} is required")
    if not _id_ok(value, max_len):
        field = prefix + name
        _fail("INVALID_ID", field, f"{field} must be 1-{max_len} printable ASCII characters")


def _check_country(value: str, prefix: str, name: str) -> None:
    if not (len(value) == 2 and value.isascii() and value.isalpha() and value.isupper()):
        field = prefix + name
        _fail(
            "INVALID_COUNTRY",
            field,
            f'{field} must be an ISO 3166-1 alpha-2 country code in upper case (e.g. "DE"), '
            f"got {_show(value)}",
        )


def _check_enum(value: int, allowed: frozenset[int], prefix: str, name: str, enum_name: str) -> None:
    if value not in allowed:
        field = prefix + name
        _fail("INVALID_ENUM", field, f"{field} is {value}, which authopt.v1.{enum_name} does not define")


def _response_code_ok(code: str) -> bool:
    return len(code) == 2 and code.isascii() and code.isalnum() and code.upper() == code


def _check_mac(value: str, prefix: str, name: str) -> None:
    if value and not (len(value) == 2 and _digits(value)):
        field = prefix + name
        _fail("INVALID_MAC", field, f'{field} must be empty or 2 digits (e.g. "03"), got {_show(value)}')


def _check_time(seconds: int, nanos: int, field: str, limits: Limits, now: float) -> None:
    at = seconds + nanos * 1e-9
    if at > now + limits.max_future_skew_s:
        _fail(
            "TIMESTAMP_IN_FUTURE",
            field,
            f"{field} is {at - now:.0f} s in the future; at most {limits.max_future_skew_s:g} s of "
            "clock skew is allowed",
        )
    if at < now - limits.max_past_age_s:
        _fail(
            "TIMESTAMP_TOO_OLD",
            field,
            f"{field} is {(now - at) / 86400:.1f} days old; at most "
            f"{limits.max_past_age_s / 86400:g} days are accepted",
        )


# --- messages ------------------------------------------------------------------------------------------


def _validate_merchant(merchant: attempt_pb2.Merchant, p: str) -> None:
    _check_id(merchant.id, p, "id", _MAX_MERCHANT_ID)
    mcc = merchant.mcc
    if not (len(mcc) == 4 and _digits(mcc)):
        _fail(
            "INVALID_MCC",
            f"{p}mcc",
            f"{p}mcc must be an ISO 18245 code of exactly 4 digits, got {_show(mcc)}",
        )
    _check_country(merchant.country, p, "country")


def _validate_card(card: attempt_pb2.Card, p: str) -> None:
    bin_ = card.bin
    if not bin_:
        _fail("MISSING_FIELD", f"{p}bin", f"{p}bin is required")
    if not (6 <= len(bin_) <= 8 and _digits(bin_)):
        _fail("INVALID_BIN", f"{p}bin", f"{p}bin must be the first 6 to 8 digits of the card number")
    last4 = card.last4
    if last4 and not (len(last4) == 4 and _digits(last4)):
        _fail("INVALID_LAST4", f"{p}last4", f"{p}last4 must be empty or exactly 4 digits")
    _check_enum(card.network, _NETWORKS, p, "network", "CardNetwork")
    _check_enum(card.funding, _FUNDINGS, p, "funding", "CardFunding")
    _check_country(card.issuer_country, p, "issuer_country")
    _check_id(card.fingerprint, p, "fingerprint", _MAX_FINGERPRINT)


def _validate_attempt(attempt: attempt_pb2.Attempt, limits: Limits, p: str) -> None:
    if not attempt.HasField("merchant"):
        _fail("MISSING_FIELD", f"{p}merchant", f"{p}merchant is required")
    _validate_merchant(attempt.merchant, f"{p}merchant.")
    amount = attempt.amount_minor
    if amount <= 0:
        _fail("INVALID_AMOUNT", f"{p}amount_minor", f"{p}amount_minor must be > 0 (minor currency units)")
    if amount > limits.max_amount_minor:
        _fail(
            "INVALID_AMOUNT",
            f"{p}amount_minor",
            f"{p}amount_minor must be at most {limits.max_amount_minor} (minor currency units)",
        )
    currency = attempt.currency
    if not currency:
        _fail("MISSING_FIELD", f"{p}currency", f"{p}currency is required")
    if currency not in MINOR_UNITS:
        _fail(
            "UNKNOWN_CURRENCY",
            f"{p}currency",
            f'{p}currency must be an active ISO 4217 alphabetic code in upper case (e.g. "EUR"), '
            f"got {_show(currency)}",
        )
    if not attempt.HasField("card"):
        _fail("MISSING_FIELD", f"{p}card", f"{p}card is required")
    _validate_card(attempt.card, f"{p}card.")
    _check_enum(attempt.channel, _CHANNELS, p, "channel", "Channel")
    _check_enum(attempt.initiator, _INITIATORS, p, "initiator", "Initiator")


def _validate_candidates(
    candidates: Sequence[attempt_pb2.Route], limits: Limits, *, require_candidates: bool
) -> None:
    count = len(candidates)
    if count > limits.max_candidates:
        _fail(
            "TOO_MANY_CANDIDATES",
            "candidates",
            f"candidates lists {count} routes; at most {limits.max_candidates} are allowed",
        )
    if count == 0 and require_candidates:
        _fail("NO_CANDIDATES", "candidates", "candidates must list at least one route")
    seen: dict[str, int] = {}
    for i, route in enumerate(candidates):
        route_id = route.id
        if not route_id or not _id_ok(route_id, _MAX_ROUTE_ID):
            _check_id(route_id, f"candidates[{i}].", "id", _MAX_ROUTE_ID)
        first = seen.setdefault(route_id, i)
        if first != i:
            _fail(
                "DUPLICATE_CANDIDATE",
                f"candidates[{i}].id",
                f"candidates[{i}].id repeats the route of candidates[{first}].id",
            )
        if route.cost_bps > _MAX_COST_BPS:
            _fail(
                "INVALID_COST",
                f"candidates[{i}].cost_bps",
                f"candidates[{i}].cost_bps must be at most {_MAX_COST_BPS} (100 %)",
            )
        fee = route.fixed_fee_minor
        if fee < 0 or fee > limits.max_amount_minor:
            _fail(
                "INVALID_COST",
                f"candidates[{i}].fixed_fee_minor",
                f"candidates[{i}].fixed_fee_minor must be between 0 and {limits.max_amount_minor} "
                "(minor currency units)",
            )


def _check_decline_details(
    msg: attempt_pb2.PriorAttempt | attempt_pb2.AttemptOutcome, limits: Limits, now: float, p: str
) -> None:
    """The fields a prior attempt and a reported outcome share: MAC, Visa category, attempt time."""
    _check_mac(msg.mastercard_mac, p, "mastercard_mac")
    _check_enum(msg.visa_category, _VISA_CATEGORIES, p, "visa_category", "VisaDeclineCategory")
    if not msg.HasField("attempted_at"):
        _fail("MISSING_FIELD", f"{p}attempted_at", f"{p}attempted_at is required")
    at = msg.attempted_at
    _check_time(at.seconds, at.nanos, f"{p}attempted_at", limits, now)


def _validate_prior_attempt(prior: attempt_pb2.PriorAttempt, limits: Limits, now: float, p: str) -> None:
    _check_id(prior.route_id, p, "route_id", _MAX_ROUTE_ID)
    if prior.status not in _PRIOR_STATUSES:
        _fail(
            "INVALID_STATUS",
            f"{p}status",
            f"{p}status must be OUTCOME_STATUS_DECLINED, OUTCOME_STATUS_ERROR or unset (declined) for a "
            f"prior attempt, got {prior.status}",
        )
    errored = prior.status == attempt_pb2.OUTCOME_STATUS_ERROR
    if not (errored and not prior.response_code) and not _response_code_ok(prior.response_code):
        _fail(
            "INVALID_RESPONSE_CODE",
            f"{p}response_code",
            f"{p}response_code is required (unless status is OUTCOME_STATUS_ERROR): an ISO 8583 "
            f'response code of exactly 2 upper-case letters or digits (e.g. "05", "N7"), '
            f"got {_show(prior.response_code)}",
        )
    _check_decline_details(prior, limits, now, p)


def _pan_detected(path: str) -> NoReturn:
    _fail(
        "PAN_DETECTED",
        path,
        f"field {path} looks like a full card number (PAN); send BIN, last4 and a fingerprint instead",
    )


def validate_recommend(
    req: optimizer_pb2.RecommendRequest, limits: Limits, now: float, *, require_candidates: bool
) -> None:
    """Checks a RecommendRequest; raises :class:`InvalidArgument` on the first problem found.

    ``now`` is the server's clock in Unix seconds. ``require_candidates`` is true when the server has no
    configured routes to fall back on, so the request must bring its own.
    """
    pan = find_card_number(req)
    if pan is not None:
        _pan_detected(pan)
    _check_id(req.request_id, "", "request_id", _MAX_REQUEST_ID)
    if not req.HasField("attempt"):
        _fail("MISSING_FIELD", "attempt", "attempt is required")
    _validate_attempt(req.attempt, limits, "attempt.")
    if req.latency_budget_ms > limits.max_latency_budget_ms:
        _fail(
            "INVALID_BUDGET",
            "latency_budget_ms",
            f"latency_budget_ms must be at most {limits.max_latency_budget_ms} (0 = server default)",
        )
    _validate_candidates(req.candidates, limits, require_candidates=require_candidates)
    priors = req.prior_attempts
    if len(priors) > limits.max_prior_attempts:
        _fail(
            "TOO_MANY_PRIOR_ATTEMPTS",
            "prior_attempts",
            f"prior_attempts lists {len(priors)} attempts; at most {limits.max_prior_attempts} are allowed",
        )
    for i, prior in enumerate(priors):
        _validate_prior_attempt(prior, limits, now, f"prior_attempts[{i}].")


def _validate_outcome_fields(outcome: attempt_pb2.AttemptOutcome, limits: Limits, now: float, p: str) -> None:
    _check_id(outcome.event_id, p, "event_id", _MAX_EVENT_ID)
    if outcome.request_id and not _id_ok(outcome.request_id, _MAX_REQUEST_ID):
        _fail(
            "INVALID_ID", f"{p}request_id", f"{p}request_id must be empty or 1-128 printable ASCII characters"
        )
    if not outcome.HasField("attempt"):
        _fail("MISSING_FIELD", f"{p}attempt", f"{p}attempt is required")
    _validate_attempt(outcome.attempt, limits, f"{p}attempt.")
    _check_id(outcome.route_id, p, "route_id", _MAX_ROUTE_ID)
    status = outcome.status
    if status not in _OUTCOME_STATUSES:
        _fail("INVALID_ENUM", f"{p}status", f"{p}status must be APPROVED, DECLINED or ERROR, got {status}")
    code = outcome.response_code
    if status == _APPROVED:
        if code and code != "00":
            _fail(
                "INVALID_RESPONSE_CODE",
                f"{p}response_code",
                f'{p}response_code must be empty (or "00") for an APPROVED outcome, got {_show(code)}',
            )
    elif (status == _DECLINED or code) and not _response_code_ok(code):
        _fail(
            "INVALID_RESPONSE_CODE",
            f"{p}response_code",
            f"{p}response_code must be an ISO 8583 response code of exactly 2 upper-case letters or digits "
            f'(e.g. "05"; required when DECLINED), got {_show(code)}',
        )
    _check_decline_details(outcome, limits, now, p)
    if outcome.HasField("expected_approval") and not 0.0 <= outcome.expected_approval <= 1.0:  # NaN too
        _fail(
            "INVALID_PROBABILITY",
            f"{p}expected_approval",
            f"{p}expected_approval must be within [0, 1] (the decision's approval_probability for "
            f"route_id), got {outcome.expected_approval!r}",
        )


def validate_outcome(
    outcome: attempt_pb2.AttemptOutcome,
    limits: Limits,
    now: float,
    *,
    field_prefix: str = "outcome",
    pan_checked: bool = False,
) -> None:
    """Checks one AttemptOutcome; field paths start with ``field_prefix`` (``"outcome.event_id"``).
    ``pan_checked``: the caller has scanned every text the outcome came from for card numbers
    already (`history.imports` does, column by column), so it is not scanned again."""
    p = f"{field_prefix}." if field_prefix else ""
    pan = None if pan_checked else find_card_number(outcome)
    if pan is not None:
        _pan_detected(p + pan)
    _validate_outcome_fields(outcome, limits, now, p)


def validate_outcomes(req: optimizer_pb2.ReportOutcomesRequest, limits: Limits, now: float) -> None:
    """Checks a ReportOutcomes batch: 1 to ``limits.max_batch`` outcomes, each as :func:`validate_outcome`."""
    pan = find_card_number(req)
    if pan is not None:
        _pan_detected(pan)
    outcomes = req.outcomes
    if not outcomes:
        _fail("EMPTY_BATCH", "outcomes", "outcomes must hold at least one outcome")
    if len(outcomes) > limits.max_batch:
        _fail(
            "BATCH_TOO_LARGE",
            "outcomes",
            f"outcomes holds {len(outcomes)} outcomes; at most {limits.max_batch} are allowed per call",
        )
    for i, outcome in enumerate(outcomes):
        _validate_outcome_fields(outcome, limits, now, f"outcomes[{i}].")
