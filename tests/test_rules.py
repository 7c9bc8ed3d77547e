"""Network retry rules, code by code and MAC by MAC."""

from __future__ import annotations

import dataclasses

import pytest

from server import rules
from server.rules import Decline, RetryCounters, RuleKind, evaluate_retry, visa_category

NOW = 1_800_000_000.0
HOUR = 3_600
DAY = 86_400

VISA_CAT1 = ["03", "04", "07", "12", "15", "41", "43", "46", "57", "62", "78", "93", "R0", "R1", "R3"]
VISA_CAT2 = ["19", "51", "52", "53", "59", "61", "65", "75", "86", "91", "96", "N3", "N4"]
VISA_CAT3 = ["54", "55", "N7", "82", "1A"]
VISA_CAT4 = ["05", "01", "14", "N0", "Z9", ""]
MAC_WAITS = [
    ("24", HOUR),
    ("25", DAY),
    ("26", 2 * DAY),
    ("27", 4 * DAY),
    ("28", 6 * DAY),
    ("29", 8 * DAY),
    ("30", 10 * DAY),
]


def visa(code: str, *, category: int = 0, attempted_at: float = NOW - 60) -> Decline:
    return Decline(response_code=code, mastercard_mac="", visa_category=category, attempted_at=attempted_at)


def mc(mac: str, *, attempted_at: float = NOW - 60, code: str = "05") -> Decline:
    return Decline(response_code=code, mastercard_mac=mac, visa_category=0, attempted_at=attempted_at)


def test_table_rule_ids_unique_and_sourced() -> None:
    ids = [r.rule_id for r in rules.RULES]
    assert len(ids) == len(set(ids))
    for rule in rules.RULES:
        assert rule.source.strip(), rule.rule_id
        assert rule.network in {"visa", "mastercard"}
        if rule.kind is RuleKind.LIMIT:
            assert rule.max_attempts > 0 and rule.window_s == 30 * DAY
            assert rule.scope in {"card_merchant", "card_merchant_amount"}
        if rule.kind is RuleKind.MIN_WAIT:
            assert rule.min_wait_s > 0


def test_table_expected_ids_present() -> None:
    ids = {r.rule_id for r in rules.RULES}
    assert {
        "visa.cat1.never",
        "mc.mac03.never",
        "mc.mac21.never",
        "mc.mac24.wait_1h",
        "mc.excessive.35_30d",
    } <= ids
    assert rules.RULES_VERSION == "2026.11.1"


def test_table_visa_categories_are_disjoint() -> None:
    seen: dict[str, int] = {}
    for rule in rules.RULES:
        if rule.network == "visa" and rule.visa_category:
            for code in rule.match:
                assert seen.setdefault(code, rule.visa_category) == rule.visa_category, code


@pytest.mark.parametrize("code", VISA_CAT1)
def test_visa_category1_never(code: str) -> None:
    assert visa_category(code) == 1
    c = evaluate_retry("visa", visa(code), RetryCounters(), NOW)
    assert not c.allowed
    assert c.rule_id == "visa.cat1.never"
    # even a fixed card and zero counters do not help
    assert not evaluate_retry("visa", visa(code), RetryCounters(), NOW, data_fixed=True).allowed


@pytest.mark.parametrize("code", VISA_CAT2 + VISA_CAT4)
def test_visa_category2_4_limit(code: str) -> None:
    expected_cat = 2 if code in VISA_CAT2 else 4
    assert visa_category(code) == expected_cat
    for used in range(15):
        c = evaluate_retry("visa", visa(code), RetryCounters(card_merchant_reattempts_30d=used), NOW)
        assert c.allowed, used
        assert c.earliest_at == NOW
        assert c.rule_id == ""
    for used in (15, 16, 100):
        c = evaluate_retry("visa", visa(code), RetryCounters(card_merchant_reattempts_30d=used), NOW)
        assert not c.allowed
        assert c.rule_id == f"visa.cat{expected_cat}.limit_15_30d"


@pytest.mark.parametrize("code", VISA_CAT3)
def test_visa_category3_after_data_fix(code: str) -> None:
    assert visa_category(code) == 3
    c = evaluate_retry("visa", visa(code), RetryCounters(), NOW)
    assert not c.allowed
    assert c.rule_id == "visa.cat3.after_data_fix"
    assert "fix the card data (expiry/CVV/...) and send a new attempt" in c.reason
    fixed = evaluate_retry(
        "visa", visa(code), RetryCounters(card_merchant_reattempts_30d=14), NOW, data_fixed=True
    )
    assert fixed.allowed and fixed.earliest_at == NOW
    over = evaluate_retry(
        "visa", visa(code), RetryCounters(card_merchant_reattempts_30d=15), NOW, data_fixed=True
    )
    assert not over.allowed and over.rule_id == "visa.cat3.limit_15_30d"


def test_visa_code_lookup_normalizes_case_and_space() -> None:
    assert visa_category(" r0 ") == 1
    assert visa_category("n7") == 3


def test_visa_mac_is_ignored() -> None:
    d = Decline(response_code="51", mastercard_mac="03", visa_category=0, attempted_at=NOW)
    assert evaluate_retry("visa", d, RetryCounters(), NOW).allowed


@pytest.mark.parametrize(
    ("code", "category", "rule_id"),
    [
        ("51", 1, "visa.cat1.never"),
        ("04", 2, ""),
        ("05", 3, "visa.cat3.after_data_fix"),
        ("54", 4, ""),
    ],
)
def test_visa_caller_category_overrides_code(code: str, category: int, rule_id: str) -> None:
    c = evaluate_retry("visa", visa(code, category=category), RetryCounters(), NOW)
    assert c.allowed is (rule_id == "")
    assert c.rule_id == rule_id


def test_visa_invalid_category() -> None:
    with pytest.raises(ValueError, match="visa_category"):
        evaluate_retry("visa", visa("05", category=7), RetryCounters(), NOW)


@pytest.mark.parametrize("mac", ["03", "21"])
def test_mastercard_never(mac: str) -> None:
    c = evaluate_retry("mastercard", mc(mac), RetryCounters(), NOW)
    assert not c.allowed
    assert c.rule_id == f"mc.mac{mac}.never"


@pytest.mark.parametrize(("mac", "wait"), MAC_WAITS)
def test_mastercard_wait(mac: str, wait: int) -> None:
    attempted = NOW - 60
    c = evaluate_retry("mastercard", mc(mac, attempted_at=attempted), RetryCounters(), NOW)
    assert c.allowed
    assert c.earliest_at == attempted + wait
    assert c.rule_id.startswith(f"mc.mac{mac}.wait_")
    # once the wait has passed the retry is allowed immediately
    later = attempted + wait
    done = evaluate_retry("mastercard", mc(mac, attempted_at=attempted), RetryCounters(), later)
    assert done.allowed and done.earliest_at == later and done.rule_id == ""
    past = evaluate_retry("mastercard", mc(mac, attempted_at=attempted), RetryCounters(), later + 1)
    assert past.allowed and past.earliest_at == later + 1


@pytest.mark.parametrize("mac", ["", "01", "02", "22", "23", "31", "40"])
def test_mastercard_other_macs_allowed(mac: str) -> None:
    c = evaluate_retry("mastercard", mc(mac, code="04"), RetryCounters(), NOW)
    assert c.allowed and c.earliest_at == NOW and c.rule_id == ""


@pytest.mark.parametrize("mac", ["", "01", "24", "30"])
def test_mastercard_excessive_attempts(mac: str) -> None:
    ok = evaluate_retry("mastercard", mc(mac), RetryCounters(card_merchant_amount_attempts_30d=34), NOW)
    assert ok.allowed
    refused = evaluate_retry("mastercard", mc(mac), RetryCounters(card_merchant_amount_attempts_30d=35), NOW)
    assert not refused.allowed
    assert refused.rule_id == "mc.excessive.35_30d"


def test_mastercard_never_precedes_limit() -> None:
    c = evaluate_retry("mastercard", mc("03"), RetryCounters(card_merchant_amount_attempts_30d=99), NOW)
    assert c.rule_id == "mc.mac03.never"


def test_mastercard_ignores_visa_counter() -> None:
    c = evaluate_retry("mastercard", mc(""), RetryCounters(card_merchant_reattempts_30d=99), NOW)
    assert c.allowed


@pytest.mark.parametrize("network", ["amex", "discover", "unionpay", ""])
def test_unknown_network_allowed(network: str) -> None:
    d = Decline(response_code="04", mastercard_mac="03", visa_category=1, attempted_at=NOW)
    c = evaluate_retry(network, d, RetryCounters(card_merchant_reattempts_30d=99), NOW)
    assert c.allowed and c.earliest_at == NOW and c.rule_id == ""


def test_network_name_normalized() -> None:
    assert not evaluate_retry(" VISA ", visa("04"), RetryCounters(), NOW).allowed
    assert not evaluate_retry("MasterCard", mc("21"), RetryCounters(), NOW).allowed


def test_dataclasses_frozen() -> None:
    c = evaluate_retry("visa", visa("05"), RetryCounters(), NOW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.allowed = False  # type: ignore[misc]
