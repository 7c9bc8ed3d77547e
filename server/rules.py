"""Card-network retry rules: one versioned data table, each row citing its source, and its evaluator.

These rules are hard constraints: the model and the policy may only choose among the retries that
:func:`evaluate_retry` permits. Every code and wait lives in :data:`RULES`; the evaluator holds no
network data of its own, so changing a rule means changing one row (and bumping :data:`RULES_VERSION`).

Visa rows carry the decline category they define: a row's ``match`` lists the response codes of its
category, and a category-4 row with an empty ``match`` is the catch-all. Visa rules then apply by
category (so a caller-supplied category overrides the code lookup). Mastercard rows match the Merchant
Advice Code; a row with an empty ``match`` applies to every Mastercard decline.

This module is pure Python (no protobuf, grpc or torch) so that the simulator can import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "RULES",
    "RULES_VERSION",
    "Decline",
    "RetryConstraint",
    "RetryCounters",
    "RetryRule",
    "RuleKind",
    "evaluate_retry",
    "visa_category",
]

RULES_VERSION: str = "2026.11.1"
"""Version of :data:`RULES`; bump on any table change (it is logged with every decision)."""

_DAY_S = 86_400
_WINDOW_30D_S = 30 * _DAY_S

VISA = "visa"
MASTERCARD = "mastercard"
SCOPE_CARD_MERCHANT = "card_merchant"
SCOPE_CARD_MERCHANT_AMOUNT = "card_merchant_amount"


class RuleKind(StrEnum):
    """What a rule does to a retry."""

    NEVER = "never"
    """Never retry this decline."""
    MIN_WAIT = "min_wait"
    """Do not retry before ``min_wait_s`` after the declined attempt."""
    AFTER_DATA_FIX = "after_data_fix"
    """Retry only after the card data (expiry, CVV, ...) was fixed."""
    LIMIT = "limit"
    """At most ``max_attempts`` per ``scope`` in ``window_s``."""


@dataclass(frozen=True, slots=True)
class RetryRule:
    """One row of the network rule table."""

    rule_id: str
    """Stable identifier reported with decisions, e.g. ``"mc.mac24.wait_1h"``."""
    network: str
    """``"visa"`` or ``"mastercard"``."""
    match: frozenset[str]
    """ISO 8583 response codes (Visa) or MAC values (Mastercard); empty = every decline."""
    kind: RuleKind
    min_wait_s: int = 0
    """For MIN_WAIT: seconds after the declined attempt before a retry is permitted."""
    max_attempts: int = 0
    """For LIMIT: attempts permitted per scope and window."""
    window_s: int = 0
    """For LIMIT: length of the rolling window in seconds."""
    scope: str = ""
    """For LIMIT: ``"card_merchant"`` (Visa reattempts) or ``"card_merchant_amount"`` (MC attempts)."""
    source: str = ""
    """Citation of the network rule this row encodes."""
    visa_category: int = 0
    """Visa rows: the decline category (1..4) this row belongs to; ``match`` lists its codes. 0 otherwise."""


_VISA_SOURCE = (
    "Visa Core Rules and Visa Product and Service Rules, Excessive Reattempts and decline response "
    "code categories (effective Apr 2021, updated 2024)"
)
_MC_MAC_SOURCE = (
    "Mastercard Transaction Processing Rules / Merchant Advice Code Transaction Excellence program, "
    "Merchant Advice Codes"
)
_MC_EXCESSIVE_SOURCE = (
    "Mastercard Transaction Processing Excellence program, Excessive Authorization Attempts "
    "(same card, merchant and amount within 30 days)"
)

_VISA_CAT1 = frozenset(
    {"03", "04", "07", "12", "15", "41", "43", "46", "57", "62", "78", "93", "R0", "R1", "R3"}
)
_VISA_CAT2 = frozenset({"19", "51", "52", "53", "59", "61", "65", "75", "86", "91", "96", "N3", "N4"})
_VISA_CAT3 = frozenset({"54", "55", "N7", "82", "1A"})


def _visa_limit(category: int, match: frozenset[str]) -> RetryRule:
    return RetryRule(
        rule_id=f"visa.cat{category}.limit_15_30d",
        network=VISA,
        match=match,
        kind=RuleKind.LIMIT,
        max_attempts=15,
        window_s=_WINDOW_30D_S,
        scope=SCOPE_CARD_MERCHANT,
        source=f"{_VISA_SOURCE}, categories 2-4: at most 15 reattempts per card per merchant in 30 days",
        visa_category=category,
    )


def _mc_wait(mac: str, wait_s: int, label: str) -> RetryRule:
    return RetryRule(
        rule_id=f"mc.mac{mac}.wait_{label}",
        network=MASTERCARD,
        match=frozenset({mac}),
        kind=RuleKind.MIN_WAIT,
        min_wait_s=wait_s,
        source=f"{_MC_MAC_SOURCE}, MAC {mac}: retry after {label}",
    )


RULES: tuple[RetryRule, ...] = (
    RetryRule(
        rule_id="visa.cat1.never",
        network=VISA,
        match=_VISA_CAT1,
        kind=RuleKind.NEVER,
        source=f"{_VISA_SOURCE}, category 1: issuer will never approve",
        visa_category=1,
    ),
    _visa_limit(2, _VISA_CAT2),
    RetryRule(
        rule_id="visa.cat3.after_data_fix",
        network=VISA,
        match=_VISA_CAT3,
        kind=RuleKind.AFTER_DATA_FIX,
        source=f"{_VISA_SOURCE}, category 3: data quality, reattempt only after the data was fixed",
        visa_category=3,
    ),
    _visa_limit(3, _VISA_CAT3),
    _visa_limit(4, frozenset()),
    RetryRule(
        rule_id="mc.mac03.never",
        network=MASTERCARD,
        match=frozenset({"03"}),
        kind=RuleKind.NEVER,
        source=f"{_MC_MAC_SOURCE}, MAC 03: do not try again",
    ),
    RetryRule(
        rule_id="mc.mac21.never",
        network=MASTERCARD,
        match=frozenset({"21"}),
        kind=RuleKind.NEVER,
        source=f"{_MC_MAC_SOURCE}, MAC 21: payment cancelled, do not try again",
    ),
    _mc_wait("24", 3_600, "1h"),
    _mc_wait("25", _DAY_S, "24h"),
    _mc_wait("26", 2 * _DAY_S, "2d"),
    _mc_wait("27", 4 * _DAY_S, "4d"),
    _mc_wait("28", 6 * _DAY_S, "6d"),
    _mc_wait("29", 8 * _DAY_S, "8d"),
    _mc_wait("30", 10 * _DAY_S, "10d"),
    RetryRule(
        rule_id="mc.excessive.35_30d",
        network=MASTERCARD,
        match=frozenset(),
        kind=RuleKind.LIMIT,
        max_attempts=35,
        window_s=_WINDOW_30D_S,
        scope=SCOPE_CARD_MERCHANT_AMOUNT,
        source=_MC_EXCESSIVE_SOURCE,
    ),
)
"""The rule table. Order within a kind does not matter; the evaluator applies kinds in a fixed order."""

# Derived once from the table: code -> category for Visa rows that list their codes.
_VISA_CODE_CATEGORY: dict[str, int] = {
    code: rule.visa_category
    for rule in RULES
    if rule.network == VISA and rule.visa_category
    for code in rule.match
}
_VISA_DEFAULT_CATEGORY = 4


@dataclass(frozen=True, slots=True)
class Decline:
    """The last declined attempt."""

    response_code: str
    """ISO 8583 response code, e.g. ``"51"``."""
    mastercard_mac: str
    """Mastercard Merchant Advice Code (two digits); empty when none."""
    visa_category: int
    """Visa decline category 1..4 when the caller knows it; 0 = unknown (looked up from the code)."""
    attempted_at: float
    """When the declined attempt was made, epoch seconds."""


@dataclass(frozen=True, slots=True)
class RetryCounters:
    """Per-card counters over the rolling 30-day windows the rules refer to."""

    card_merchant_reattempts_30d: int = 0
    """Visa: reattempts already made on this card at this merchant."""
    card_merchant_amount_attempts_30d: int = 0
    """Mastercard: attempts already made on this card at this merchant for this amount."""
    known: bool = True
    """False: the card's state could not be read (the online store did not answer), so the
    counters above are only the request's own prior attempts; every attempt-limit rule then counts
    as reached (a retry could exceed it)."""


@dataclass(frozen=True, slots=True)
class RetryConstraint:
    """What the network rules permit for the next retry."""

    allowed: bool
    """False = never retry (within this rule set)."""
    earliest_at: float
    """Earliest permitted retry time, epoch seconds (``now`` if no wait; ``now`` when not allowed)."""
    rule_id: str
    """The rule that constrained the decision; empty if none did."""
    reason: str
    """Human-readable explanation."""


def visa_category(response_code: str) -> int:
    """Visa decline category (1..4) of an ISO 8583 response code; any code not in 1-3 is category 4."""
    return _VISA_CODE_CATEGORY.get(_norm(response_code), _VISA_DEFAULT_CATEGORY)


def evaluate_retry(
    network: str,
    decline: Decline,
    counters: RetryCounters,
    now: float,
    *,
    data_fixed: bool = False,
) -> RetryConstraint:
    """Apply the network rules in :data:`RULES` to a retry of ``decline`` at or after ``now``.

    Rules apply in this order: never-retry, after-data-fix (skipped when ``data_fixed``), attempt
    limits, minimum waits (``earliest_at = max(now, attempted_at + wait)``). Networks without rules in
    the table are unconstrained.
    """
    net = network.strip().lower()
    if net == VISA:
        if not 0 <= decline.visa_category <= 4:
            raise ValueError(f"visa_category must be 0..4, got {decline.visa_category}")
        category = decline.visa_category or visa_category(decline.response_code)
        rules = [r for r in RULES if r.network == VISA and r.visa_category == category]
        subject = f"Visa category {category} decline (code {decline.response_code or '-'})"
    elif net == MASTERCARD:
        mac = _norm(decline.mastercard_mac)
        rules = [r for r in RULES if r.network == MASTERCARD and (not r.match or mac in r.match)]
        subject = f"Mastercard decline (MAC {mac or '-'})"
    else:
        return RetryConstraint(True, now, "", f"no network retry rules for network {network!r}")
    return _apply(rules, subject, decline, counters, now, data_fixed)


def _apply(
    rules: Iterable[RetryRule],
    subject: str,
    decline: Decline,
    counters: RetryCounters,
    now: float,
    data_fixed: bool,
) -> RetryConstraint:
    by_kind: dict[RuleKind, list[RetryRule]] = {kind: [] for kind in RuleKind}
    for rule in rules:
        by_kind[rule.kind].append(rule)
    for rule in by_kind[RuleKind.NEVER]:
        return RetryConstraint(False, now, rule.rule_id, f"{subject}: never retry ({rule.rule_id})")
    if not data_fixed:
        for rule in by_kind[RuleKind.AFTER_DATA_FIX]:
            return RetryConstraint(
                False,
                now,
                rule.rule_id,
                f"{subject}: fix the card data (expiry/CVV/...) and send a new attempt ({rule.rule_id})",
            )
    for rule in by_kind[RuleKind.LIMIT]:
        if not counters.known:
            return RetryConstraint(
                False,
                now,
                rule.rule_id,
                f"{subject}: the card's attempts per {rule.scope.replace('_', '+')} are unknown (its "
                f"state could not be read), so a retry could exceed the limit of {rule.max_attempts} "
                f"({rule.rule_id})",
            )
        used = _counter(rule, counters)
        if used >= rule.max_attempts:
            days = rule.window_s // _DAY_S
            return RetryConstraint(
                False,
                now,
                rule.rule_id,
                f"{subject}: {used} attempts already made per {rule.scope.replace('_', '+')} in {days} days; "
                f"the limit is {rule.max_attempts} ({rule.rule_id})",
            )
    waits = sorted(by_kind[RuleKind.MIN_WAIT], key=lambda r: r.min_wait_s, reverse=True)
    if waits and decline.attempted_at + waits[0].min_wait_s > now:
        rule = waits[0]
        earliest = decline.attempted_at + rule.min_wait_s
        return RetryConstraint(
            True,
            earliest,
            rule.rule_id,
            f"{subject}: not before {_human_s(rule.min_wait_s)} after the declined attempt ({rule.rule_id})",
        )
    return RetryConstraint(True, now, "", f"{subject}: retry permitted by the network rules")


def _counter(rule: RetryRule, counters: RetryCounters) -> int:
    if rule.scope == SCOPE_CARD_MERCHANT:
        return counters.card_merchant_reattempts_30d
    if rule.scope == SCOPE_CARD_MERCHANT_AMOUNT:
        return counters.card_merchant_amount_attempts_30d
    raise ValueError(f"rule {rule.rule_id} has unknown scope {rule.scope!r}")


def _norm(code: str) -> str:
    return code.strip().upper()


def _human_s(seconds: float) -> str:
    """Format a duration as e.g. ``"1h"``, ``"24h"``, ``"2d"``, ``"90s"``."""
    s = math.ceil(seconds)
    if s == 0:
        return "0s"
    if s % _DAY_S == 0 and s >= 2 * _DAY_S:
        return f"{s // _DAY_S}d"
    if s % 3_600 == 0:
        return f"{s // 3_600}h"
    if s % 60 == 0:
        return f"{s // 60}min"
    return f"{s}s"
