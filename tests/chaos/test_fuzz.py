"""Chaos scenario 8 (issue 20): fuzzing a live server.

Hypothesis generates RecommendRequests (unary and on RecommendStream) and AttemptOutcomes (ReportOutcome,
ReportOutcomes): random text (any Unicode, huge, card numbers), extreme and negative numbers, enum
numbers the proto does not define, repeated fields of any length, missing fields, and single-field
mutations of a valid message; plus random bytes as the raw body and messages over the size limits. All
of it goes to a real server over a real socket. This proves that every call ends OK, INVALID_ARGUMENT or
RESOURCE_EXHAUSTED, never INTERNAL or UNKNOWN; that every refusal carries an ErrorInfo reason, except
gRPC core's own transport limit (4 MiB), which refuses before the server sees the message; that a card
number is always PAN_DETECTED and never echoed; and that the server is still SERVING and answering
afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authopt.v1 import attempt_pb2, optimizer_pb2
from server.errors import DOMAIN, error_info
from server.pan import contains_card_number
from server.settings import ServerSettings
from tests.chaos.lab import LONG, report
from tests.conftest import Recording, ServerFactory, make_request

SCALE = 10 if LONG else 1  # examples per search: x10 in the long run (AUTHOPT_CHAOS_LONG=1)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300 if LONG else 60)]

SERVICE = "/authopt.v1.AuthorizationOptimizerService/"
MAX_MESSAGE_BYTES = ServerSettings.model_fields["max_message_bytes"].default
TRANSPORT_LIMIT = 4 * 1024 * 1024  # grpc core's receive limit (server/app.py), above the settings' one
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
ALLOWED = {OK, INVALID, EXHAUSTED}
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
PANS = (
    "4111111111111111",
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "3530111333300000",
)
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
NOW = int(time.time())  # fixed: hypothesis replays draws, so strategies must not move with the clock


def _settings(n: int) -> settings:
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- strategies ----------------------------------------------------------------------------------------

# Text: anything Unicode (surrogates excluded: proto strings are UTF-8), plausible values, and huge runs.
_plausible = st.sampled_from(
    ["", " ", "DE", "de", "EUR", "XYZ", "5411", "54", "41111111", "4111", "05", "N7", "00", "ab", "\x00",
     "acq-a", "m-1", "fp-abc", "é", "😀", "x" * 64, "x" * 65, "x" * 128, "x" * 129]
)  # fmt: skip
_CHARS = st.sampled_from(["x", "é", "😀", "7", " "])
_long = st.builds(lambda c, n: c * n, _CHARS, st.integers(60, 2_000))
_huge = st.builds(lambda c, n: c * n, _CHARS, st.integers(10_000, 70_000))  # alone over the size limit
PAN_TEXT = st.builds(
    lambda pre, pan, post: f"{pre}{pan}{post}",
    st.sampled_from(["", "order ", "id:", "ref-"]),
    st.sampled_from(PANS),
    st.sampled_from(["", " end", "/x"]),
)
# Text for messages built from scratch, which have many text fields: no card numbers and nothing huge,
# or PAN_DETECTED / MESSAGE_TOO_LARGE (checked first) would hide every other check.
TEXT = st.one_of(st.text(max_size=20), st.text(string.printable, max_size=140), _plausible, _long)
# Text for the one field a mutation changes.
ANY_TEXT = st.one_of(TEXT, _huge, PAN_TEXT)
INT64S = st.one_of(st.integers(*INT64), st.sampled_from([0, -1, 1, *INT64, 10**12, 10**12 + 1]))
UINT32S = st.one_of(st.integers(*UINT32), st.sampled_from([0, 1, 10_000, 10_001, UINT32[1]]))
ENUMS = st.one_of(st.integers(0, 8), st.integers(*INT32))


@st.composite
def timestamps(draw: st.DrawFn) -> timestamp_pb2.Timestamp:
    seconds = draw(st.one_of(st.integers(NOW - 10**6, NOW + 10**4), st.integers(*INT64)))
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=draw(st.one_of(st.just(0), st.integers(*INT32))))


def _fields(draw: st.DrawFn, spec: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """Each field of `spec` drawn, or (one time in four) left out."""
    return {name: draw(s) for name, s in spec.items() if draw(st.integers(0, 3))}


@st.composite
def attempts(draw: st.DrawFn) -> attempt_pb2.Attempt:
    merchant = _fields(draw, {"id": TEXT, "mcc": TEXT, "country": TEXT})
    card = _fields(
        draw,
        {"bin": TEXT, "last4": TEXT, "network": ENUMS, "funding": ENUMS, "issuer_country": TEXT,
         "network_token": st.booleans(), "fingerprint": TEXT},
    )  # fmt: skip
    top = _fields(
        draw,
        {"amount_minor": INT64S, "currency": TEXT, "channel": ENUMS, "initiator": ENUMS,
         "recurring": st.booleans(), "attempt_number": UINT32S},
    )  # fmt: skip
    if draw(st.booleans()):
        top["merchant"] = attempt_pb2.Merchant(**merchant)
    if draw(st.booleans()):
        top["card"] = attempt_pb2.Card(**card)
    return attempt_pb2.Attempt(**top)


@st.composite
def recommend_requests(draw: st.DrawFn) -> optimizer_pb2.RecommendRequest:
    """A RecommendRequest from scratch: every field random or missing."""
    routes = st.builds(
        lambda f: attempt_pb2.Route(**f),
        st.fixed_dictionaries({}, optional={"id": TEXT, "cost_bps": UINT32S, "fixed_fee_minor": INT64S}),
    )
    prior_fields = {
        "route_id": TEXT,
        "response_code": TEXT,
        "mastercard_mac": TEXT,
        "visa_category": ENUMS,
        "status": ENUMS,
        "attempted_at": timestamps(),
    }
    priors = st.builds(
        lambda f: attempt_pb2.PriorAttempt(**f), st.fixed_dictionaries({}, optional=prior_fields)
    )
    req = optimizer_pb2.RecommendRequest(
        **_fields(draw, {"request_id": TEXT, "latency_budget_ms": UINT32S, "retry_window_s": UINT32S})
    )
    if draw(st.booleans()):
        req.attempt.CopyFrom(draw(attempts()))
    req.candidates.extend(draw(st.lists(routes, max_size=20)))
    req.prior_attempts.extend(draw(st.lists(priors, max_size=35)))
    return req


@st.composite
def attempt_outcomes(draw: st.DrawFn) -> attempt_pb2.AttemptOutcome:
    """An AttemptOutcome from scratch: every field random or missing."""
    outcome = attempt_pb2.AttemptOutcome(
        **_fields(
            draw,
            {"event_id": TEXT, "request_id": TEXT, "route_id": TEXT, "status": ENUMS, "response_code": TEXT,
             "mastercard_mac": TEXT, "visa_category": ENUMS, "latency_ms": UINT32S},
        )
    )  # fmt: skip
    if draw(st.booleans()):
        outcome.attempt.CopyFrom(draw(attempts()))
    if draw(st.booleans()):
        outcome.attempted_at.CopyFrom(draw(timestamps()))
    return outcome


# Single-field mutations of a valid message: (dotted path, values). Many values are valid, so some
# mutated messages are accepted.
_VALID_CURRENCIES = st.sampled_from(["EUR", "USD", "JPY", "GBP", "KWD"])
REQUEST_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "request_id": ANY_TEXT,
    "latency_budget_ms": st.one_of(st.integers(0, 10_000), UINT32S),
    "retry_window_s": UINT32S,
    "attempt.amount_minor": st.one_of(st.integers(1, 10**12), INT64S),
    "attempt.currency": st.one_of(_VALID_CURRENCIES, ANY_TEXT),
    "attempt.channel": st.one_of(st.integers(0, 3), ENUMS),
    "attempt.initiator": st.one_of(st.integers(0, 2), ENUMS),
    "attempt.recurring": st.booleans(),
    "attempt.attempt_number": UINT32S,
    "attempt.merchant.id": st.one_of(st.text(string.ascii_letters, min_size=1, max_size=64), ANY_TEXT),
    "attempt.merchant.mcc": st.one_of(st.from_regex(r"\A[0-9]{4}\Z"), ANY_TEXT),
    "attempt.merchant.country": st.one_of(st.from_regex(r"\A[A-Z]{2}\Z"), ANY_TEXT),
    "attempt.card.bin": st.one_of(st.from_regex(r"\A[0-9]{6,8}\Z"), ANY_TEXT),
    "attempt.card.last4": st.one_of(st.from_regex(r"\A[0-9]{4}\Z"), ANY_TEXT),
    "attempt.card.network": st.one_of(st.integers(0, 7), ENUMS),
    "attempt.card.funding": st.one_of(st.integers(0, 3), ENUMS),
    "attempt.card.issuer_country": st.one_of(st.from_regex(r"\A[A-Z]{2}\Z"), ANY_TEXT),
    "attempt.card.fingerprint": st.one_of(st.text(string.hexdigits, min_size=1, max_size=128), ANY_TEXT),
    "candidates[0].id": ANY_TEXT,
    "candidates[0].cost_bps": st.one_of(st.integers(0, 10_000), UINT32S),
    "candidates[0].fixed_fee_minor": INT64S,
}
OUTCOME_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "event_id": ANY_TEXT,
    "request_id": ANY_TEXT,
    "route_id": ANY_TEXT,
    "status": st.one_of(st.integers(1, 3), ENUMS),
    "response_code": st.one_of(st.sampled_from(["", "00", "05", "51", "N7"]), ANY_TEXT),
    "mastercard_mac": st.one_of(st.sampled_from(["", "03", "24"]), ANY_TEXT),
    "visa_category": st.one_of(st.integers(0, 4), ENUMS),
    "latency_ms": UINT32S,
    "attempted_at.seconds": st.one_of(st.integers(NOW - 10**6, NOW), INT64S),
    "attempted_at.nanos": st.one_of(st.integers(0, 999_999_999), st.integers(*INT32)),
    **{path: values for path, values in REQUEST_MUTATIONS.items() if path.startswith("attempt.")},
}


def _parent(msg: Message, path: str) -> tuple[Message, str]:
    """The message holding the field at dotted `path` (``candidates[0].id``), and the field's name."""
    *parents, leaf = path.split(".")
    for p in parents:
        name, _, index = p.partition("[")
        msg = getattr(msg, name)[int(index[:-1])] if index else getattr(msg, name)
    return msg, leaf


def _set(msg: Message, path: str, value: Any) -> None:
    setattr(*_parent(msg, path), value)


def _valid_outcome(event_id: str) -> attempt_pb2.AttemptOutcome:
    outcome = attempt_pb2.AttemptOutcome(
        event_id=event_id, request_id="req-1", attempt=make_request().attempt, route_id="acq-a",
        status=attempt_pb2.OUTCOME_STATUS_DECLINED, response_code="51", latency_ms=230,
    )  # fmt: skip
    outcome.attempted_at.FromSeconds(int(time.time()) - 60)
    return outcome


# Every text field of the valid messages, for card numbers: PAN_DETECTED whatever the field expects.
REQUEST_TEXT_FIELDS = [p for p in REQUEST_MUTATIONS if isinstance(getattr(*_parent(make_request(), p)), str)]
OUTCOME_TEXT_FIELDS = [
    p for p in OUTCOME_MUTATIONS if isinstance(getattr(*_parent(_valid_outcome(""), p)), str)
]


def _padded(body: bytes, size: int) -> bytes:
    """`body` with an unknown length-delimited field (number 1000) that brings it to about `size` bytes."""
    pad = max(size - len(body), 0)
    length = bytearray()
    while True:  # the length as a base-128 varint, low groups first
        length.append((pad >> 7 * len(length)) & 0x7F)
        if not pad >> 7 * len(length):
            break
        length[-1] |= 0x80
    return body + b"\xc2\x3e" + bytes(length) + b"z" * pad  # b"\xc2\x3e": the tag (1000 << 3) | 2, a varint


# --- the client side -----------------------------------------------------------------------------------


@dataclass
class Fuzzer:
    """A synchronous channel to the server (run in a thread: the server serves in the test's loop) and
    the tally of every answer: (input class, status, reason)."""

    port: int
    tally: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    calls: int = 0
    ids: int = 0

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", -1)]
        )

    def next_id(self) -> str:
        self.ids += 1
        return f"fuzz-{self.ids}"

    def call(self, kind: str, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
        """One unary call with `body` as the raw request; checks the answer and tallies it."""
        self.calls += 1
        try:
            answer = self.channel.unary_unary(
                SERVICE + method, request_serializer=None, response_deserializer=None
            )(body, timeout=30)
        except grpc.RpcError as exc:
            code, reason = self._refusal(kind, exc, len(body))
        else:
            code, reason = OK, ""
            if method == "Recommend":
                _check_decision(optimizer_pb2.RecommendResponse.FromString(answer))
        self.tally[(kind, code.name, reason)] += 1
        return code, reason

    def _refusal(self, kind: str, exc: grpc.RpcError, size: int) -> tuple[grpc.StatusCode, str]:
        assert isinstance(exc, grpc.Call)
        code, details = exc.code(), exc.details() or ""
        assert code in ALLOWED, f"{kind}: {code.name}: {details}"
        info = error_info(exc)
        if code is EXHAUSTED and info is None:
            # gRPC core's receive limit: refused before any handler, so no ErrorInfo, only its message.
            assert size > TRANSPORT_LIMIT and "Received message larger than max" in details, details
            return code, "<transport>"
        assert info is not None, f"{kind}: {code.name} without an ErrorInfo: {details}"
        assert info.domain == DOMAIN and info.reason and "field" in info.metadata, info
        assert not contains_card_number(details), details
        return code, info.reason

    def stream(self, kind: str, bodies: list[bytes]) -> None:
        """RecommendStream with `bodies` as the raw messages: one answer per message up to the first
        that does not parse (which ends the call INVALID_ARGUMENT), per-message errors with a reason."""
        self.calls += 1
        answers: list[bytes] = []
        try:
            for raw in self.channel.stream_stream(
                SERVICE + "RecommendStream", request_serializer=None, response_deserializer=None
            )(iter(bodies), timeout=30):
                answers.append(raw)
        except grpc.RpcError as exc:
            code, reason = self._refusal(kind, exc, max(map(len, bodies)))
        else:
            code, reason = OK, ""
        self.tally[(kind, code.name, reason)] += 1
        parsed = [_parses(optimizer_pb2.RecommendStreamRequest, b) for b in bodies]
        if code is OK:
            assert all(parsed) and len(answers) == len(bodies), (len(answers), len(bodies))
        elif reason == "MALFORMED_MESSAGE":
            assert len(answers) == parsed.index(False), (len(answers), parsed)
        else:  # a message over gRPC's limit ends the call; anything else is a per-message StreamError
            assert reason == "<transport>", reason
        for raw in answers:
            answer = optimizer_pb2.RecommendStreamResponse.FromString(raw)
            if answer.HasField("error"):
                err = answer.error
                assert err.code in (INVALID.value[0], EXHAUSTED.value[0]) and err.reason, err
                assert not contains_card_number(err.message), err.message
                self.tally[(kind + "/message", CODE_NAMES[err.code], err.reason)] += 1
            else:
                _check_decision(answer.response)
                self.tally[(kind + "/message", "OK", "")] += 1

    def expect_pan(self, kind: str, result: tuple[grpc.StatusCode, str]) -> None:
        """A message holding a card number is refused PAN_DETECTED: that check comes first."""
        assert result == (INVALID, "PAN_DETECTED"), (kind, result)


def _check_decision(resp: optimizer_pb2.RecommendResponse) -> None:
    """An accepted request is decided: ranked routes, and not by the fallback for a failed inference."""
    assert resp.routes and resp.request_id, resp
    assert resp.decision_source != optimizer_pb2.DECISION_SOURCE_FALLBACK_ERROR, resp


def _parses(cls: type[Message], body: bytes) -> bool:
    try:
        cls.FromString(body)
    except DecodeError:
        return False
    return True


# --- the scenarios -------------------------------------------------------------------------------------
# Each runs its own hypothesis search against the server, in the worker thread.


def _mutation(table: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[tuple[str, Any]]:
    return st.sampled_from(sorted(table)).flatmap(lambda path: st.tuples(st.just(path), table[path]))


def _report(outcome: attempt_pb2.AttemptOutcome) -> bytes:
    return optimizer_pb2.ReportOutcomeRequest(outcome=outcome).SerializeToString()


def fuzz_recommend(fz: Fuzzer) -> None:
    """RecommendRequests from scratch, valid ones with one field changed, card numbers in text fields."""

    @_settings(60)
    @given(recommend_requests())
    @example(optimizer_pb2.RecommendRequest())
    def generated(req: optimizer_pb2.RecommendRequest) -> None:
        fz.call("recommend/generated", "Recommend", req.SerializeToString())

    @_settings(80)
    @given(_mutation(REQUEST_MUTATIONS))
    @example(("attempt.amount_minor", 100))
    @example(("attempt.amount_minor", -1))
    def mutated(mutation: tuple[str, Any]) -> None:
        req = make_request(fz.next_id())
        _set(req, *mutation)
        fz.call("recommend/mutated", "Recommend", req.SerializeToString())

    @_settings(40)
    @given(st.sampled_from(REQUEST_TEXT_FIELDS), PAN_TEXT)
    @example("attempt.merchant.id", "4111111111111111")
    def with_pan(path: str, text: str) -> None:
        req = make_request(fz.next_id())
        _set(req, path, text)
        fz.expect_pan("recommend/pan", fz.call("recommend/pan", "Recommend", req.SerializeToString()))

    generated()
    mutated()
    with_pan()


def fuzz_outcomes(fz: Fuzzer) -> None:
    """AttemptOutcomes (ReportOutcome) from scratch, mutated, with card numbers; ReportOutcomes batches."""

    @_settings(40)
    @given(attempt_outcomes())
    def generated(outcome: attempt_pb2.AttemptOutcome) -> None:
        fz.call("outcome/generated", "ReportOutcome", _report(outcome))

    @_settings(60)
    @given(_mutation(OUTCOME_MUTATIONS))
    @example(("latency_ms", 5))
    @example(("status", 99))
    def mutated(mutation: tuple[str, Any]) -> None:
        outcome = _valid_outcome(fz.next_id())
        _set(outcome, *mutation)
        fz.call("outcome/mutated", "ReportOutcome", _report(outcome))

    @_settings(20)
    @given(st.sampled_from(OUTCOME_TEXT_FIELDS), PAN_TEXT)
    def with_pan(path: str, text: str) -> None:
        outcome = _valid_outcome(fz.next_id())
        _set(outcome, path, text)
        fz.expect_pan("outcome/pan", fz.call("outcome/pan", "ReportOutcome", _report(outcome)))

    @_settings(20)
    @given(
        st.lists(st.one_of(attempt_outcomes(), st.builds(lambda: _valid_outcome(fz.next_id()))), max_size=8)
    )
    @example([])
    def batches(outcomes: list[attempt_pb2.AttemptOutcome]) -> None:
        body = optimizer_pb2.ReportOutcomesRequest(outcomes=outcomes).SerializeToString()
        fz.call("outcomes/batch", "ReportOutcomes", body)

    generated()
    mutated()
    with_pan()
    batches()


_VALID_BODY = make_request("corrupt-me").SerializeToString()


def _corrupt_valid(change: tuple[int, int, bool]) -> bytes:
    """A valid request with one byte changed or cut short: it mostly parses, sometimes not."""
    at, value, cut = change
    at %= len(_VALID_BODY)
    if cut:
        return _VALID_BODY[:at]
    return _VALID_BODY[:at] + bytes([value]) + _VALID_BODY[at + 1 :]


def fuzz_wire(fz: Fuzzer) -> None:
    """Random bytes as the body of every RPC, streams mixing all of it, and messages over the limits."""

    def stream_message(req: optimizer_pb2.RecommendRequest) -> bytes:
        return optimizer_pb2.RecommendStreamRequest(request=req).SerializeToString()

    @_settings(60)
    @given(
        st.sampled_from(["Recommend", "ReportOutcome", "ReportOutcomes"]),
        st.one_of(
            st.binary(max_size=512),
            st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.booleans()).map(_corrupt_valid),
        ),
    )
    @example("Recommend", b"\xff\xff\xff")
    @example("ReportOutcome", b"\x0a\x02\xc3\x28")  # a string field that is not UTF-8
    def raw_bytes(method: str, body: bytes) -> None:
        fz.call("raw-bytes", method, body)

    @_settings(20)
    @given(
        st.lists(
            st.one_of(
                st.builds(lambda: stream_message(make_request(fz.next_id()))),
                recommend_requests().map(stream_message),
                st.binary(max_size=64),
            ),
            min_size=1,
            max_size=8,
        )
    )
    @example([stream_message(make_request("stream-ok")), stream_message(optimizer_pb2.RecommendRequest())])
    def streams(bodies: list[bytes]) -> None:
        fz.stream("stream", bodies)

    @_settings(6)
    @given(
        st.sampled_from(["Recommend", "ReportOutcome", "ReportOutcomes", "RecommendStream"]),
        st.one_of(
            st.integers(MAX_MESSAGE_BYTES + 1, TRANSPORT_LIMIT - 1024),
            st.integers(TRANSPORT_LIMIT + 1, 6 << 20),
        ),
    )
    @example("Recommend", MAX_MESSAGE_BYTES + 1)
    @example("ReportOutcome", MAX_MESSAGE_BYTES + 1)
    @example("RecommendStream", MAX_MESSAGE_BYTES + 1)
    @example("ReportOutcomes", TRANSPORT_LIMIT + 1)
    def oversized(method: str, size: int) -> None:
        """A valid message padded with an unknown field: up to gRPC's limit, MESSAGE_TOO_LARGE (the
        server's own limit, checked before anything else); over it, gRPC's RESOURCE_EXHAUSTED."""
        valid: Message = {
            "Recommend": make_request(fz.next_id()),
            "RecommendStream": make_request(fz.next_id()),
            "ReportOutcome": optimizer_pb2.ReportOutcomeRequest(outcome=_valid_outcome(fz.next_id())),
            "ReportOutcomes": optimizer_pb2.ReportOutcomesRequest(outcomes=[_valid_outcome(fz.next_id())]),
        }[method]
        body = _padded(valid.SerializeToString(), size)
        over_transport = len(body) > TRANSPORT_LIMIT - 64  # the stream's wrapper adds a few bytes
        if method != "RecommendStream":
            expected = (EXHAUSTED, "<transport>") if over_transport else (INVALID, "MESSAGE_TOO_LARGE")
            assert fz.call("oversized", method, body) == expected, (method, len(body))
            return
        before = fz.tally.copy()
        fz.stream("oversized-stream", [stream_message(optimizer_pb2.RecommendRequest.FromString(body))])
        new = fz.tally - before
        if over_transport:
            assert new == {("oversized-stream", "RESOURCE_EXHAUSTED", "<transport>"): 1}, new
        else:  # the call is fine; the message is answered with a StreamError
            assert new[("oversized-stream/message", "INVALID_ARGUMENT", "MESSAGE_TOO_LARGE")] == 1, new

    raw_bytes()
    streams()
    oversized()


# --- the test ------------------------------------------------------------------------------------------

# Each class of input and the statuses it must have produced at least once: the test cannot pass vacuously.
EXPECTED = {
    "recommend/generated": {"INVALID_ARGUMENT"},
    "recommend/mutated": {"OK", "INVALID_ARGUMENT"},
    "recommend/pan": {"INVALID_ARGUMENT"},
    "outcome/generated": {"INVALID_ARGUMENT"},
    "outcome/mutated": {"OK", "INVALID_ARGUMENT"},
    "outcome/pan": {"INVALID_ARGUMENT"},
    "outcomes/batch": {"INVALID_ARGUMENT"},
    "stream": {"OK", "INVALID_ARGUMENT"},
    "stream/message": {"OK", "INVALID_ARGUMENT"},
    "raw-bytes": {"INVALID_ARGUMENT"},
    "oversized": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "oversized-stream/message": {"INVALID_ARGUMENT"},
}


async def test_fuzzed_input_is_answered_ok_or_refused_with_a_reason(
    start_server: ServerFactory, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    srv = await start_server(model_dir=model_dir, publisher=Recording())
    fz = Fuzzer(srv.port)
    t0 = time.monotonic()
    try:
        for scenario in (fuzz_recommend, fuzz_outcomes, fuzz_wire):
            await asyncio.to_thread(scenario, fz)
    finally:
        fz.channel.close()
    by_status: Counter[tuple[str, str]] = Counter()
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for (kind, code, reason), n in fz.tally.items():
        by_status[(kind, code)] += n
        statuses[code] += n
        reasons[reason or "-"] += n
    elapsed = time.monotonic() - t0
    report(
        {
            "scenario": "8. Fuzzing: generated requests and outcomes, random bytes, oversized messages",
            "load": f"{fz.calls} calls, {elapsed:.1f} s",
            "statuses": dict(statuses),
        }
    )
    print(f"\nfuzz: {fz.calls} calls in {elapsed:.1f}s; {dict(statuses)}")
    print("by class and status:", ", ".join(f"{k}/{c}: {n}" for (k, c), n in sorted(by_status.items())))
    print("by reason:", ", ".join(f"{r}: {n}" for r, n in reasons.most_common()))

    missing = [
        (kind, code) for kind, codes in EXPECTED.items() for code in codes if not by_status[(kind, code)]
    ]
    assert not missing, (missing, dict(by_status))
    assert fz.tally[("raw-bytes", "INVALID_ARGUMENT", "MALFORMED_MESSAGE")]
    assert fz.tally[("recommend/pan", "INVALID_ARGUMENT", "PAN_DETECTED")]
    assert fz.tally[("oversized", "RESOURCE_EXHAUSTED", "<transport>")]

    # grpc logs what a handler raised unexpectedly ("Unexpected [...] raised by servicer method"): none.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    # The server is still up: a valid request is decided, health says SERVING.
    _check_decision(await srv.stub.Recommend(make_request("after-the-fuzz"), timeout=5))
    health = await health_pb2_grpc.HealthStub(srv.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
