"""Request validation: every reason with its field path, card-number detection, and the cost of a call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authopt.samples import sample_attempt
from authopt.v1 import attempt_pb2, events_pb2, optimizer_pb2
from server.currencies import MINOR_UNITS
from server.errors import InvalidArgument
from server.pan import luhn_ok
from server.validation import (
    Limits,
    find_card_number,
    validate_outcome,
    validate_outcomes,
    validate_recommend,
)

NOW = 1_750_000_000.0
DAY = 86400
LIMITS = Limits()
PAN = "4111111111111111"


def _ts(at: float) -> Timestamp:
    seconds = int(at)
    return Timestamp(seconds=seconds, nanos=int((at - seconds) * 1e9))


def _attempt() -> attempt_pb2.Attempt:
    """The sample attempt (`authopt.samples`), as a second try from a French-issued card."""
    attempt = sample_attempt(amount_minor=12_999, attempt_number=2)
    attempt.merchant.id = "m-1001"
    attempt.card.issuer_country = "FR"
    attempt.card.fingerprint = "fp_9c1d0e7a"
    return attempt


def make_request() -> optimizer_pb2.RecommendRequest:
    """A typical valid request: 4 candidate routes and one prior decline."""
    return optimizer_pb2.RecommendRequest(
        request_id="req-3f6c2a",
        attempt=_attempt(),
        candidates=[
            attempt_pb2.Route(id=f"acq-{name}-eu-visa", cost_bps=150 + i * 10, fixed_fee_minor=i * 5)
            for i, name in enumerate("abcd")
        ],
        prior_attempts=[
            attempt_pb2.PriorAttempt(
                route_id="acq-a-eu-visa",
                response_code="51",
                visa_category=attempt_pb2.VISA_DECLINE_CATEGORY_2_CANNOT_APPROVE_NOW,
                attempted_at=_ts(NOW - 3600),
            )
        ],
        latency_budget_ms=50,
    )


def make_outcome() -> attempt_pb2.AttemptOutcome:
    return attempt_pb2.AttemptOutcome(
        event_id="evt-0001",
        request_id="req-3f6c2a",
        attempt=_attempt(),
        route_id="acq-b-eu-visa",
        status=attempt_pb2.OUTCOME_STATUS_DECLINED,
        response_code="05",
        mastercard_mac="",
        latency_ms=420,
        attempted_at=_ts(NOW - 60),
    )


def _rejects(call: Callable[[], None]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call()
    return info.value


def _recommend(req: optimizer_pb2.RecommendRequest, *, require_candidates: bool = False) -> None:
    validate_recommend(req, LIMITS, NOW, require_candidates=require_candidates)


# --- valid input ---------------------------------------------------------------------------------------

Mutation = Callable[[optimizer_pb2.RecommendRequest], object]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: None, id="typical"),
        pytest.param(lambda r: r.ClearField("candidates"), id="no-candidates-server-routes"),
        pytest.param(lambda r: r.ClearField("prior_attempts"), id="first-attempt"),
        pytest.param(lambda r: setattr(r.attempt.card, "last4", ""), id="empty-last4"),
        pytest.param(lambda r: setattr(r.attempt.card, "bin", "411111"), id="6-digit-bin"),
        pytest.param(lambda r: setattr(r.attempt.card, "network", 0), id="unspecified-network"),
        pytest.param(lambda r: setattr(r.attempt, "channel", 0), id="unspecified-channel"),
        pytest.param(lambda r: setattr(r.attempt, "currency", "JPY"), id="jpy"),
        pytest.param(lambda r: setattr(r.attempt, "currency", "CLF"), id="clf-fund"),
        pytest.param(lambda r: setattr(r.attempt, "amount_minor", LIMITS.max_amount_minor), id="max-amount"),
        pytest.param(lambda r: setattr(r, "latency_budget_ms", 10_000), id="max-budget"),
        pytest.param(lambda r: setattr(r.prior_attempts[0], "response_code", "N7"), id="alnum-code"),
        pytest.param(lambda r: setattr(r.prior_attempts[0], "mastercard_mac", "24"), id="mac"),
        pytest.param(
            lambda r: (
                setattr(r.prior_attempts[0], "status", attempt_pb2.OUTCOME_STATUS_ERROR),
                setattr(r.prior_attempts[0], "response_code", ""),
            ),
            id="errored-prior-without-code",
        ),
        pytest.param(
            lambda r: setattr(r.prior_attempts[0], "status", attempt_pb2.OUTCOME_STATUS_DECLINED),
            id="declined-prior",
        ),
        pytest.param(lambda r: r.prior_attempts[0].attempted_at.CopyFrom(_ts(NOW + 299)), id="small-skew"),
        pytest.param(lambda r: r.prior_attempts[0].attempted_at.CopyFrom(_ts(NOW - 399 * DAY)), id="old-ok"),
        pytest.param(lambda r: setattr(r.attempt.merchant, "id", "shop 42/eu"), id="printable-id"),
        pytest.param(
            lambda r: setattr(r.attempt.merchant, "id", "order-2024-0001-7789"), id="short-digit-runs"
        ),
    ],
)
def test_valid_request_passes(mutate: Mutation) -> None:
    req = make_request()
    mutate(req)
    _recommend(req)


def test_valid_request_with_required_candidates_passes() -> None:
    _recommend(make_request(), require_candidates=True)


# --- every rejection reason, with its field ------------------------------------------------------------


def _set(path: str, value: object) -> Mutation:
    """A mutation setting the dotted attribute ``path`` (indexes like ``candidates.3.id`` allowed)."""

    def mutate(req: optimizer_pb2.RecommendRequest) -> None:
        *parents, leaf = path.split(".")
        target: object = req
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[index]
        setattr(target, leaf, value)

    return mutate


def _too_many_candidates(req: optimizer_pb2.RecommendRequest) -> None:
    req.ClearField("candidates")
    req.candidates.extend(attempt_pb2.Route(id=f"r{i}") for i in range(LIMITS.max_candidates + 1))


def _too_many_priors(req: optimizer_pb2.RecommendRequest) -> None:
    prior = req.prior_attempts[0]
    req.prior_attempts.extend([prior] * LIMITS.max_prior_attempts)


def _duplicate(req: optimizer_pb2.RecommendRequest) -> None:
    req.candidates[2].id = req.candidates[0].id


RECOMMEND_CASES = [
    # request_id
    (_set("request_id", ""), "MISSING_FIELD", "request_id"),
    (_set("request_id", "r" * 129), "INVALID_ID", "request_id"),
    (_set("request_id", "req\n1"), "INVALID_ID", "request_id"),
    (_set("request_id", "réq"), "INVALID_ID", "request_id"),
    # attempt and merchant
    (lambda r: r.ClearField("attempt"), "MISSING_FIELD", "attempt"),
    (lambda r: r.attempt.ClearField("merchant"), "MISSING_FIELD", "attempt.merchant"),
    (_set("attempt.merchant.id", ""), "MISSING_FIELD", "attempt.merchant.id"),
    (_set("attempt.merchant.id", "m" * 65), "INVALID_ID", "attempt.merchant.id"),
    (_set("attempt.merchant.mcc", ""), "INVALID_MCC", "attempt.merchant.mcc"),
    (_set("attempt.merchant.mcc", "541"), "INVALID_MCC", "attempt.merchant.mcc"),
    (_set("attempt.merchant.mcc", "54a1"), "INVALID_MCC", "attempt.merchant.mcc"),
    (_set("attempt.merchant.country", ""), "INVALID_COUNTRY", "attempt.merchant.country"),
    (_set("attempt.merchant.country", "de"), "INVALID_COUNTRY", "attempt.merchant.country"),
    (_set("attempt.merchant.country", "DEU"), "INVALID_COUNTRY", "attempt.merchant.country"),
    # amount and currency
    (_set("attempt.amount_minor", 0), "INVALID_AMOUNT", "attempt.amount_minor"),
    (_set("attempt.amount_minor", -100), "INVALID_AMOUNT", "attempt.amount_minor"),
    (_set("attempt.amount_minor", 10**12 + 1), "INVALID_AMOUNT", "attempt.amount_minor"),
    (_set("attempt.currency", ""), "MISSING_FIELD", "attempt.currency"),
    (_set("attempt.currency", "eur"), "UNKNOWN_CURRENCY", "attempt.currency"),
    (_set("attempt.currency", "XYZ"), "UNKNOWN_CURRENCY", "attempt.currency"),
    (_set("attempt.currency", "HRK"), "UNKNOWN_CURRENCY", "attempt.currency"),
    (_set("attempt.currency", "XAU"), "UNKNOWN_CURRENCY", "attempt.currency"),
    (_set("attempt.currency", "EURO"), "UNKNOWN_CURRENCY", "attempt.currency"),
    # card
    (lambda r: r.attempt.ClearField("card"), "MISSING_FIELD", "attempt.card"),
    (_set("attempt.card.bin", ""), "MISSING_FIELD", "attempt.card.bin"),
    (_set("attempt.card.bin", "41111"), "INVALID_BIN", "attempt.card.bin"),
    (_set("attempt.card.bin", "411111111"), "INVALID_BIN", "attempt.card.bin"),
    (_set("attempt.card.bin", "4111a1"), "INVALID_BIN", "attempt.card.bin"),
    (_set("attempt.card.bin", "４１１１１１"), "INVALID_BIN", "attempt.card.bin"),
    (_set("attempt.card.last4", "111"), "INVALID_LAST4", "attempt.card.last4"),
    (_set("attempt.card.last4", "11x1"), "INVALID_LAST4", "attempt.card.last4"),
    (_set("attempt.card.network", 99), "INVALID_ENUM", "attempt.card.network"),
    (_set("attempt.card.funding", 42), "INVALID_ENUM", "attempt.card.funding"),
    (_set("attempt.card.issuer_country", ""), "INVALID_COUNTRY", "attempt.card.issuer_country"),
    (_set("attempt.card.issuer_country", "Fr"), "INVALID_COUNTRY", "attempt.card.issuer_country"),
    (_set("attempt.card.fingerprint", ""), "MISSING_FIELD", "attempt.card.fingerprint"),
    (_set("attempt.card.fingerprint", "f" * 129), "INVALID_ID", "attempt.card.fingerprint"),
    # attempt enums, budget
    (_set("attempt.channel", 99), "INVALID_ENUM", "attempt.channel"),
    (_set("attempt.initiator", 7), "INVALID_ENUM", "attempt.initiator"),
    (_set("latency_budget_ms", 10_001), "INVALID_BUDGET", "latency_budget_ms"),
    # candidates
    (_too_many_candidates, "TOO_MANY_CANDIDATES", "candidates"),
    (_set("candidates.3.id", ""), "MISSING_FIELD", "candidates[3].id"),
    (_set("candidates.1.id", "r" * 65), "INVALID_ID", "candidates[1].id"),
    (_duplicate, "DUPLICATE_CANDIDATE", "candidates[2].id"),
    (_set("candidates.1.fixed_fee_minor", -1), "INVALID_COST", "candidates[1].fixed_fee_minor"),
    (_set("candidates.0.cost_bps", 10_001), "INVALID_COST", "candidates[0].cost_bps"),
    # prior attempts
    (_too_many_priors, "TOO_MANY_PRIOR_ATTEMPTS", "prior_attempts"),
    (_set("prior_attempts.0.route_id", ""), "MISSING_FIELD", "prior_attempts[0].route_id"),
    (_set("prior_attempts.0.response_code", ""), "INVALID_RESPONSE_CODE", "prior_attempts[0].response_code"),
    (_set("prior_attempts.0.response_code", "5"), "INVALID_RESPONSE_CODE", "prior_attempts[0].response_code"),
    (
        _set("prior_attempts.0.response_code", "n7"),
        "INVALID_RESPONSE_CODE",
        "prior_attempts[0].response_code",
    ),
    (
        _set("prior_attempts.0.response_code", "051"),
        "INVALID_RESPONSE_CODE",
        "prior_attempts[0].response_code",
    ),
    (
        _set("prior_attempts.0.status", attempt_pb2.OUTCOME_STATUS_APPROVED),
        "INVALID_STATUS",
        "prior_attempts[0].status",
    ),
    (_set("prior_attempts.0.status", 9), "INVALID_STATUS", "prior_attempts[0].status"),
    (
        lambda r: (
            r.prior_attempts[0].__setattr__("status", attempt_pb2.OUTCOME_STATUS_ERROR),
            r.prior_attempts[0].__setattr__("response_code", "5"),
        ),
        "INVALID_RESPONSE_CODE",
        "prior_attempts[0].response_code",
    ),
    (_set("prior_attempts.0.mastercard_mac", "3"), "INVALID_MAC", "prior_attempts[0].mastercard_mac"),
    (_set("prior_attempts.0.mastercard_mac", "AB"), "INVALID_MAC", "prior_attempts[0].mastercard_mac"),
    (_set("prior_attempts.0.visa_category", 9), "INVALID_ENUM", "prior_attempts[0].visa_category"),
    (
        lambda r: r.prior_attempts[0].ClearField("attempted_at"),
        "MISSING_FIELD",
        "prior_attempts[0].attempted_at",
    ),
    (
        lambda r: r.prior_attempts[0].attempted_at.CopyFrom(_ts(NOW + 301)),
        "TIMESTAMP_IN_FUTURE",
        "prior_attempts[0].attempted_at",
    ),
    (
        lambda r: r.prior_attempts[0].attempted_at.CopyFrom(_ts(NOW - 401 * DAY)),
        "TIMESTAMP_TOO_OLD",
        "prior_attempts[0].attempted_at",
    ),
]


@pytest.mark.parametrize(("mutate", "reason", "field"), RECOMMEND_CASES)
def test_bad_request_is_rejected_with_reason_and_field(mutate: Mutation, reason: str, field: str) -> None:
    req = make_request()
    mutate(req)
    err = _rejects(lambda: _recommend(req))
    assert (err.reason, err.field) == (reason, field), err.message
    assert field in err.message


def test_no_candidates_when_required() -> None:
    req = make_request()
    req.ClearField("candidates")
    err = _rejects(lambda: _recommend(req, require_candidates=True))
    assert (err.reason, err.field) == ("NO_CANDIDATES", "candidates")


def test_message_is_precise() -> None:
    req = make_request()
    req.attempt.amount_minor = 0
    assert (
        _rejects(lambda: _recommend(req)).message == "attempt.amount_minor must be > 0 (minor currency units)"
    )


def test_limits_are_configurable() -> None:
    req = make_request()
    with pytest.raises(InvalidArgument, match="at most 3"):
        validate_recommend(req, Limits(max_candidates=3), NOW, require_candidates=False)


# --- outcomes --------------------------------------------------------------------------------------------

OutcomeMutation = Callable[[attempt_pb2.AttemptOutcome], object]


def _status(status: int, code: str) -> OutcomeMutation:
    def mutate(o: attempt_pb2.AttemptOutcome) -> None:
        o.status = status  # type: ignore[assignment]
        o.response_code = code

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda o: None, id="declined"),
        pytest.param(_status(attempt_pb2.OUTCOME_STATUS_APPROVED, ""), id="approved"),
        pytest.param(_status(attempt_pb2.OUTCOME_STATUS_APPROVED, "00"), id="approved-00"),
        pytest.param(_status(attempt_pb2.OUTCOME_STATUS_ERROR, ""), id="route-error"),
        pytest.param(_status(attempt_pb2.OUTCOME_STATUS_ERROR, "91"), id="route-error-code"),
        pytest.param(lambda o: setattr(o, "request_id", ""), id="no-request-id"),
        pytest.param(lambda o: setattr(o, "expected_approval", 0.0), id="expected-0"),
        pytest.param(lambda o: setattr(o, "expected_approval", 1.0), id="expected-1"),
    ],
)
def test_valid_outcome_passes(mutate: OutcomeMutation) -> None:
    outcome = make_outcome()
    mutate(outcome)
    validate_outcome(outcome, LIMITS, NOW)


OUTCOME_CASES = [
    (lambda o: setattr(o, "event_id", ""), "MISSING_FIELD", "outcome.event_id"),
    (lambda o: setattr(o, "event_id", "e" * 129), "INVALID_ID", "outcome.event_id"),
    (lambda o: setattr(o, "request_id", "r" * 129), "INVALID_ID", "outcome.request_id"),
    (lambda o: o.ClearField("attempt"), "MISSING_FIELD", "outcome.attempt"),
    (lambda o: setattr(o.attempt.card, "bin", "12"), "INVALID_BIN", "outcome.attempt.card.bin"),
    (lambda o: setattr(o.attempt, "currency", "usd"), "UNKNOWN_CURRENCY", "outcome.attempt.currency"),
    (lambda o: setattr(o, "route_id", ""), "MISSING_FIELD", "outcome.route_id"),
    (_status(attempt_pb2.OUTCOME_STATUS_UNSPECIFIED, ""), "INVALID_ENUM", "outcome.status"),
    (_status(9, "05"), "INVALID_ENUM", "outcome.status"),
    (_status(attempt_pb2.OUTCOME_STATUS_DECLINED, ""), "INVALID_RESPONSE_CODE", "outcome.response_code"),
    (_status(attempt_pb2.OUTCOME_STATUS_DECLINED, "5"), "INVALID_RESPONSE_CODE", "outcome.response_code"),
    (_status(attempt_pb2.OUTCOME_STATUS_APPROVED, "05"), "INVALID_RESPONSE_CODE", "outcome.response_code"),
    (_status(attempt_pb2.OUTCOME_STATUS_ERROR, "x"), "INVALID_RESPONSE_CODE", "outcome.response_code"),
    (lambda o: setattr(o, "mastercard_mac", "3a"), "INVALID_MAC", "outcome.mastercard_mac"),
    (lambda o: setattr(o, "visa_category", 12), "INVALID_ENUM", "outcome.visa_category"),
    (lambda o: o.ClearField("attempted_at"), "MISSING_FIELD", "outcome.attempted_at"),
    (lambda o: o.attempted_at.CopyFrom(_ts(NOW + 3600)), "TIMESTAMP_IN_FUTURE", "outcome.attempted_at"),
    (lambda o: o.attempted_at.CopyFrom(_ts(NOW - 500 * DAY)), "TIMESTAMP_TOO_OLD", "outcome.attempted_at"),
    (lambda o: setattr(o, "expected_approval", 1.01), "INVALID_PROBABILITY", "outcome.expected_approval"),
    (lambda o: setattr(o, "expected_approval", -0.1), "INVALID_PROBABILITY", "outcome.expected_approval"),
    (
        lambda o: setattr(o, "expected_approval", float("nan")),
        "INVALID_PROBABILITY",
        "outcome.expected_approval",
    ),
]


@pytest.mark.parametrize(("mutate", "reason", "field"), OUTCOME_CASES)
def test_bad_outcome_is_rejected(mutate: OutcomeMutation, reason: str, field: str) -> None:
    outcome = make_outcome()
    mutate(outcome)
    err = _rejects(lambda: validate_outcome(outcome, LIMITS, NOW))
    assert (err.reason, err.field) == (reason, field), err.message


def test_outcome_field_prefix() -> None:
    outcome = make_outcome()
    outcome.event_id = ""
    assert _rejects(lambda: validate_outcome(outcome, LIMITS, NOW, field_prefix="")).field == "event_id"
    err = _rejects(lambda: validate_outcome(outcome, LIMITS, NOW, field_prefix="x.y"))
    assert err.field == "x.y.event_id"


def _batch(n: int) -> optimizer_pb2.ReportOutcomesRequest:
    req = optimizer_pb2.ReportOutcomesRequest()
    for i in range(n):
        outcome = make_outcome()
        outcome.event_id = f"evt-{i}"
        req.outcomes.append(outcome)
    return req


def test_valid_batch_passes() -> None:
    validate_outcomes(_batch(3), LIMITS, NOW)
    validate_outcomes(_batch(LIMITS.max_batch), LIMITS, NOW)


@pytest.mark.parametrize(("size", "reason"), [(0, "EMPTY_BATCH"), (LIMITS.max_batch + 1, "BATCH_TOO_LARGE")])
def test_batch_size(size: int, reason: str) -> None:
    err = _rejects(lambda: validate_outcomes(_batch(size), LIMITS, NOW))
    assert (err.reason, err.field) == (reason, "outcomes")


def test_batch_outcome_field_is_indexed() -> None:
    req = _batch(4)
    req.outcomes[2].attempt.merchant.mcc = "12"
    err = _rejects(lambda: validate_outcomes(req, LIMITS, NOW))
    assert (err.reason, err.field) == ("INVALID_MCC", "outcomes[2].attempt.merchant.mcc")


def test_batch_pan_is_found_with_its_path() -> None:
    req = _batch(3)
    req.outcomes[1].route_id = PAN
    err = _rejects(lambda: validate_outcomes(req, LIMITS, NOW))
    assert (err.reason, err.field) == ("PAN_DETECTED", "outcomes[1].route_id")


def test_outcome_pan_path_has_prefix() -> None:
    outcome = make_outcome()
    outcome.attempt.card.fingerprint = PAN
    err = _rejects(lambda: validate_outcome(outcome, LIMITS, NOW))
    assert (err.reason, err.field) == ("PAN_DETECTED", "outcome.attempt.card.fingerprint")


# --- card numbers ----------------------------------------------------------------------------------------

PAN_FIELDS = [
    ("request_id", "request_id"),
    ("attempt.merchant.id", "attempt.merchant.id"),
    ("attempt.merchant.mcc", "attempt.merchant.mcc"),
    ("attempt.currency", "attempt.currency"),
    ("attempt.card.bin", "attempt.card.bin"),
    ("attempt.card.fingerprint", "attempt.card.fingerprint"),
    ("candidates.3.id", "candidates[3].id"),
    ("prior_attempts.0.route_id", "prior_attempts[0].route_id"),
    ("prior_attempts.0.response_code", "prior_attempts[0].response_code"),
    ("prior_attempts.0.mastercard_mac", "prior_attempts[0].mastercard_mac"),
]

PAN_FORMS = [
    PAN,
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "card 4111111111111111 exp 12/29",
    "4111 1111 1111 1111 12",  # a PAN followed by more digits
    "378282246310005",  # Amex, 15 digits
    "6011000990139424",  # Discover
    "3530111333300000",  # JCB
    "6062826786276634",  # Hipercard
    "6205500000000000004",  # UnionPay, 19 digits
]


@pytest.mark.parametrize(("path", "field"), PAN_FIELDS)
def test_pan_in_any_string_field_is_detected(path: str, field: str) -> None:
    req = make_request()
    _set(path, "4111-1111-1111-1111")(req)
    assert find_card_number(req) == field
    err = _rejects(lambda: _recommend(req))
    assert (err.reason, err.field) == ("PAN_DETECTED", field)
    assert err.message == (
        f"field {field} looks like a full card number (PAN); send BIN, last4 and a fingerprint instead"
    )


@pytest.mark.parametrize("value", PAN_FORMS)
def test_pan_forms_are_detected_and_never_echoed(value: str) -> None:
    req = make_request()
    req.attempt.merchant.id = value
    err = _rejects(lambda: _recommend(req))
    assert (err.reason, err.field) == ("PAN_DETECTED", "attempt.merchant.id")
    digits = "".join(ch for ch in value if ch.isdigit())
    for text in (err.message, str(err), repr(err)):
        squashed = text.replace(" ", "").replace("-", "")
        assert digits[:12] not in squashed
        assert value not in text


@pytest.mark.parametrize(
    "value",
    [
        "4111111111111112",  # 16 digits, fails Luhn
        "4111 1111 1111 1112",
        "1234567890",  # 10 digits
        "41111111111",  # 11 digits
        "4111  1111 1111 1111",  # a double space splits the run
        "41111111111111110000000000",  # a 26-digit id, not a card number
        "2024-06-01T12:00:00Z",
        "acq-a-eu-visa",
    ],
)
def test_non_pans_are_not_flagged(value: str) -> None:
    req = make_request()
    req.attempt.merchant.id = value
    assert find_card_number(req) is None


def test_pan_is_checked_before_anything_else() -> None:
    req = make_request()
    req.request_id = ""
    req.attempt.currency = "nope"
    req.candidates[0].id = PAN
    err = _rejects(lambda: _recommend(req, require_candidates=True))
    assert (err.reason, err.field) == ("PAN_DETECTED", "candidates[0].id")


def test_find_card_number_walks_maps_and_nested_messages() -> None:
    snapshot = events_pb2.FeatureSnapshot(entity="route", key="acq-a", sums={"approved_1h": 0.9})
    assert find_card_number(snapshot) is None
    snapshot.sums[PAN] = 1.0
    assert find_card_number(snapshot) == "sums[<key>]"
    event = events_pb2.AttemptEvent(outcome=make_outcome(), producer="replica-1")
    assert find_card_number(event) is None
    event.outcome.attempt.card.fingerprint = PAN
    assert find_card_number(event) == "outcome.attempt.card.fingerprint"


def test_find_card_number_on_clean_request() -> None:
    assert find_card_number(make_request()) is None
    assert find_card_number(optimizer_pb2.RecommendRequest()) is None


@pytest.mark.parametrize(
    ("digits", "ok"),
    [
        ("4111111111111111", True),
        ("79927398713", True),
        ("79927398710", False),
        ("4111111111111112", False),
        ("0", True),
        ("", False),
        ("4111-1111", False),
        ("４１１１", False),
    ],
)
def test_luhn(digits: str, ok: bool) -> None:
    assert luhn_ok(digits) is ok


# --- currency table --------------------------------------------------------------------------------------


def test_currency_exponents() -> None:
    expected = {"USD": 2, "EUR": 2, "JPY": 0, "KRW": 0, "KWD": 3, "BHD": 3, "TND": 3, "CLF": 4, "UYW": 4}
    assert {code: MINOR_UNITS[code] for code in expected} == expected
    assert all(len(code) == 3 and code.isascii() and code.isupper() for code in MINOR_UNITS)
    assert len(MINOR_UNITS) > 150
    assert not {"HRK", "XAU", "XXX", "XTS"} & MINOR_UNITS.keys()
