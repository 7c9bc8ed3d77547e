"""Is this digit string a card number? The issuer ranges and lengths of the card networks, and Luhn.

A PAN is 12-19 digits whose leading digits (the IIN, ISO/IEC 7812) fall in a range a card network
issues from, at a length that network uses, and whose last digit is the Luhn check digit. Luhn alone
passes one number in ten: every platform whose ids are numeric (nanosecond timestamps, snowflake ids)
would see one request in ten refused. Checking the range and the length as well, as PCI scanners do,
removes almost all of those: no network issues from a leading 1, 7, 8, 9 or 0, and most ranges have
one or two lengths (measured in docs/reliability.md, "PAN detection").

`ISSUER_RANGES` is the one table; `is_card_number` the one check. Both are pure and cheap: a length
test, at most six set look-ups, then Luhn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
    "ISSUER_RANGES",
    "MAX_PAN",
    "MIN_PAN",
    "RUN_PATTERN",
    "IssuerRange",
    "contains_card_number",
    "is_card_number",
    "issuer_network",
    "luhn_ok",
]

MIN_PAN, MAX_PAN = 12, 19


class IssuerRange(NamedTuple):
    """Card numbers that start with a prefix in ``first..last`` (same number of digits) and have one
    of ``lengths`` digits belong to ``network``."""

    network: str
    first: str
    last: str
    lengths: tuple[int, ...]


def _span(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


# The networks' IIN ranges (ISO/IEC 7812 registrations as the networks document them) and the PAN
# lengths each issues in volume. A prefix may appear in two rows (65 is Discover's and RuPay's); a
# number matches if any row does, and the longest prefix names the network.
#
# Lengths are a trade-off, measured (docs/reliability.md): 17-19 digits are kept where such cards
# circulate in volume (UnionPay's 19-digit debit cards, Maestro's 12-19), not where a network's rules
# merely allow them (Visa, Discover, JCB, Diners and Mir allow up to 19; their cards carry 16, Diners'
# also 14). Each
# reserved 19-digit range would refuse one in ten of the 64-bit ids that start with its prefix:
# with them, 3 % of snowflake ids of Instagram's layout were refused (they start with 4 today). A
# 19-digit Visa number is therefore not refused, which docs/reliability.md states.
ISSUER_RANGES: tuple[IssuerRange, ...] = (
    IssuerRange("visa", "4", "4", (13, 16)),
    IssuerRange("mastercard", "51", "55", (16,)),
    IssuerRange("mastercard", "2221", "2720", (16,)),  # the 2-series, since 2017
    IssuerRange("amex", "34", "34", (15,)),
    IssuerRange("amex", "37", "37", (15,)),
    IssuerRange("discover", "6011", "6011", (16,)),
    IssuerRange("discover", "644", "649", (16,)),
    IssuerRange("discover", "65", "65", (16,)),
    IssuerRange("jcb", "3528", "3589", (16,)),
    IssuerRange("unionpay", "62", "62", _span(16, 19)),  # includes Discover's co-badged 622126-622925
    IssuerRange("diners", "300", "305", (14, 16)),
    IssuerRange("diners", "3095", "3095", (14, 16)),
    IssuerRange("diners", "36", "36", (14, 16)),
    IssuerRange("diners", "38", "39", (14, 16)),
    IssuerRange("maestro", "5018", "5018", _span(12, 19)),
    IssuerRange("maestro", "5020", "5020", _span(12, 19)),
    IssuerRange("maestro", "5038", "5038", _span(12, 19)),
    IssuerRange("maestro", "5893", "5893", _span(12, 19)),
    IssuerRange("maestro", "6304", "6304", _span(12, 19)),
    IssuerRange("maestro", "6759", "6759", _span(12, 19)),
    IssuerRange("maestro", "6761", "6763", _span(12, 19)),
    IssuerRange("maestro", "676770", "676770", _span(12, 19)),
    IssuerRange("maestro", "676774", "676774", _span(12, 19)),
    IssuerRange("mir", "2200", "2204", (16,)),
    IssuerRange("rupay", "60", "60", (16,)),
    IssuerRange("rupay", "65", "65", (16,)),
    IssuerRange("rupay", "81", "82", (16,)),
    IssuerRange("rupay", "508", "508", (16,)),
    IssuerRange("hipercard", "606282", "606282", (16,)),
    IssuerRange("troy", "9792", "9792", (16,)),
)

_MAX_PREFIX = 6


def _index(ranges: Sequence[IssuerRange]) -> dict[int, dict[str, str]]:
    """length -> {prefix: network}, every range expanded to its explicit prefixes."""
    out: dict[int, dict[str, str]] = {n: {} for n in range(MIN_PAN, MAX_PAN + 1)}
    for r in ranges:
        width = len(r.first)
        if not (
            width == len(r.last) <= _MAX_PREFIX
            and r.first.isdigit()
            and r.last.isdigit()
            and int(r.first) <= int(r.last)
            and r.lengths
            and all(MIN_PAN <= n <= MAX_PAN for n in r.lengths)
        ):
            raise ValueError(f"bad issuer range {r}")
        for prefix in range(int(r.first), int(r.last) + 1):
            for n in r.lengths:
                out[n].setdefault(f"{prefix:0{width}d}", r.network)
    return out


_BY_LENGTH = _index(ISSUER_RANGES)
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (ASCII digits only, non-empty) passes the Luhn (mod 10) check."""
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        total += _LUHN_DOUBLED[d] if i & 1 else d
    return total % 10 == 0


def issuer_network(digits: str) -> str | None:
    """The network whose issuer range and length ``digits`` (ASCII digits) fit, Luhn aside; or None.
    The longest matching prefix names it (6011 is Discover's, inside RuPay's 60)."""
    prefixes = _BY_LENGTH.get(len(digits))
    if not prefixes:
        return None
    for k in range(_MAX_PREFIX, 0, -1):
        network = prefixes.get(digits[:k])
        if network is not None:
            return network
    return None


def is_card_number(digits: str) -> bool:
    """Whether ``digits`` (ASCII digits only) is a card number: 12-19 digits in a network's issuer
    range at one of its lengths, with a valid Luhn check digit."""
    return issuer_network(digits) is not None and luhn_ok(digits)


# A maximal run of at least 12 ASCII digits with single spaces or dashes between them. RE2-compatible,
# so columnar scans (pyarrow.compute) can pre-filter with the same pattern.
RUN_PATTERN = r"[0-9](?:[ -]?[0-9]){11,}"
_RUN = re.compile(RUN_PATTERN)
_SEPARATOR = re.compile(r"[ -]")


def _run_has_pan(run: str) -> bool:
    """Whether a digit run holds a card number.

    An unseparated run is a number only as a whole (a 25-digit id is not a card number). A separated
    run is also checked group by group, so "4111 1111 1111 1111 12" (a PAN and more digits) is caught.
    """
    groups = _SEPARATOR.split(run)
    if len(groups) == 1:
        return is_card_number(run)
    for start in range(len(groups)):
        size = 0
        for end in range(start, len(groups)):
            size += len(groups[end])
            if size > MAX_PAN:
                break
            if size >= MIN_PAN and is_card_number("".join(groups[start : end + 1])):
                return True
    return False


def contains_card_number(text: str) -> bool:
    """Whether `text` holds a card number anywhere: a run of 12-19 digits (single spaces or dashes
    allowed between them) that `is_card_number`."""
    if len(text) < MIN_PAN:
        return False
    return any(_run_has_pan(m.group()) for m in _RUN.finditer(text))
