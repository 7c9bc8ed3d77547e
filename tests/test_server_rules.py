"""Every network retry rule, code by code and MAC by MAC, through a real server and channel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from authopt.v1 import attempt_pb2, optimizer_pb2
from server.rules import RULES, RuleKind
from tests.conftest import ServerFactory, make_request

# Every test twice: card state in the server's memory, and in a real redis-server (issue 21).
pytestmark = pytest.mark.both_stores

Action = optimizer_pb2.RetryAction
WAITS = {
    "24": 3600,
    "25": 86400,
    "26": 2 * 86400,
    "27": 4 * 86400,
    "28": 6 * 86400,
    "29": 8 * 86400,
    "30": 10 * 86400,
}


def _codes(kind: RuleKind, network: str) -> list[str]:
    return sorted({c for r in RULES if r.kind is kind and r.network == network for c in r.match})


def _retry_request(
    request_id: str, network: int, code: str, mac: str = "", declined_s_ago: float = 60
) -> optimizer_pb2.RecommendRequest:
    req = make_request(request_id)
    req.attempt.card.network = network  # type: ignore[assignment]
    req.attempt.attempt_number = 2
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int((time.time() - declined_s_ago) * 1e9))
    req.prior_attempts.add(route_id="acq-a", response_code=code, mastercard_mac=mac, attempted_at=ts)
    return req


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "fallback"])
async def test_every_rule_through_the_server(
    start_server: ServerFactory, model_dir: Path, with_model: bool
) -> None:
    srv = await start_server(model_dir=model_dir if with_model else None)
    visa, mc = attempt_pb2.CARD_NETWORK_VISA, attempt_pb2.CARD_NETWORK_MASTERCARD
    never = _codes(RuleKind.NEVER, "visa")
    assert len(never) == 15
    for code in never:
        resp = await srv.stub.Recommend(_retry_request(f"v1-{code}", visa, code), timeout=5)
        assert resp.retry.action == Action.RETRY_ACTION_DO_NOT_RETRY, code
        assert resp.retry.rule_id == "visa.cat1.never", code
        assert resp.retry.recovery_probability == 0.0 and resp.routes, code
    for code in _codes(RuleKind.AFTER_DATA_FIX, "visa"):
        resp = await srv.stub.Recommend(_retry_request(f"v3-{code}", visa, code), timeout=5)
        assert resp.retry.action == Action.RETRY_ACTION_DO_NOT_RETRY, code
        assert resp.retry.rule_id == "visa.cat3.after_data_fix", code
    for mac in ("03", "21"):
        resp = await srv.stub.Recommend(_retry_request(f"mc-{mac}", mc, "05", mac), timeout=5)
        assert resp.retry.action == Action.RETRY_ACTION_DO_NOT_RETRY, mac
        assert resp.retry.rule_id == f"mc.mac{mac}.never", mac
    for mac, wait in WAITS.items():
        req = _retry_request(f"mcw-{mac}", mc, "51", mac, declined_s_ago=60)
        declined_at = req.prior_attempts[0].attempted_at.ToNanoseconds() / 1e9
        resp = await srv.stub.Recommend(req, timeout=5)
        retry = resp.retry
        if retry.action != Action.RETRY_ACTION_DO_NOT_RETRY:  # declining on value is allowed too
            assert retry.action == Action.RETRY_ACTION_RETRY_AT, mac
            assert retry.retry_at.ToNanoseconds() / 1e9 >= declined_at + wait - 1e-3, mac
        assert retry.rule_id.startswith(f"mc.mac{mac}.wait_"), (mac, retry.rule_id)


async def test_visa_reattempt_limit_counts_prior_attempts(start_server: ServerFactory) -> None:
    srv = await start_server()
    req = _retry_request("v-limit", attempt_pb2.CARD_NETWORK_VISA, "91")
    resp = await srv.stub.Recommend(req, timeout=5)
    assert resp.retry.action != Action.RETRY_ACTION_DO_NOT_RETRY  # issuer unavailable: worth a retry
    for _ in range(15):  # 16 attempts in this payment = 15 reattempts already made
        req.prior_attempts.add().CopyFrom(req.prior_attempts[0])
    req.request_id = "v-limit-2"
    resp = await srv.stub.Recommend(req, timeout=5)
    assert resp.retry.action == Action.RETRY_ACTION_DO_NOT_RETRY
    assert resp.retry.rule_id == "visa.cat2.limit_15_30d"


async def test_mastercard_excessive_attempts_from_features(start_server: ServerFactory) -> None:
    from streams import Entity, entity_key

    srv = await start_server()
    req = _retry_request("mc-35", attempt_pb2.CARD_NETWORK_MASTERCARD, "91")
    a = req.attempt
    key = entity_key(
        Entity.CARD_MERCHANT_AMOUNT, fingerprint=a.card.fingerprint, merchant=a.merchant.id,
        amount_minor=a.amount_minor, currency=a.currency,
    )  # fmt: skip
    srv.features.put(Entity.CARD_MERCHANT_AMOUNT, key, {"attempts_30d": 35.0})
    resp = await srv.stub.Recommend(req, timeout=5)
    assert resp.retry.action == Action.RETRY_ACTION_DO_NOT_RETRY
    assert resp.retry.rule_id == "mc.excessive.35_30d"


async def test_an_errored_prior_attempt_is_no_decline_for_the_rules(start_server: ServerFactory) -> None:
    """A route timeout never reached the issuer: no code, no rule; the Visa reattempt limit that
    refuses 16 declines does not refuse a retry after 16 errors."""
    srv = await start_server()
    req = _retry_request("err-1", attempt_pb2.CARD_NETWORK_VISA, "")
    for _ in range(15):
        req.prior_attempts.add().CopyFrom(req.prior_attempts[0])
    for prior in req.prior_attempts:
        prior.status = attempt_pb2.OUTCOME_STATUS_ERROR
    resp = await srv.stub.Recommend(req, timeout=5)
    assert resp.retry.action != Action.RETRY_ACTION_DO_NOT_RETRY
    assert resp.retry.rule_id == ""
    req.request_id = "err-2"
    for prior in req.prior_attempts:  # the same attempts as declines with code 91 hit the limit
        prior.status, prior.response_code = attempt_pb2.OUTCOME_STATUS_DECLINED, "91"
    resp = await srv.stub.Recommend(req, timeout=5)
    assert resp.retry.rule_id == "visa.cat2.limit_15_30d"
