"""A family of worlds drawn at random, so that a method is judged on many worlds and never tuned to one.

`random_world(seed)` draws a whole `WorldConfig` — countries, issuers and their networks, BINs and
approval levels, routes with their costs, affinities (domestic, cross-border, tokens, debit, per
issuer), error rates and latencies, merchants with their countries, currencies, MCCs, amounts,
recurring shares and the routes they may use, the card mix, the decline mix's patience, traffic
shape and the random incident schedules — from the ranges in `RANGES` (documented in
docs/simulator.md, "A world family"). The same seed gives the same world; every world it draws is
valid (`WorldConfig`'s own checks) and playable: each merchant has a route for each card network
its issuers use. `world_toml` writes one as a TOML file that `load_world` reads back unchanged, so
`authopt train --world FILE` and `authopt evaluate --world FILE` take it like a built-in world.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np

from sim.config import WorldConfig
from sim.rng import seed_int

__all__ = ["RANGES", "random_world", "world_toml"]

# Countries a world draws from, with the currency its merchants charge in.
_CURRENCY = {
    "US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR", "NL": "EUR",
    "BR": "BRL", "MX": "MXN", "IN": "INR", "JP": "JPY", "AU": "AUD", "CA": "CAD", "PL": "PLN",
    "SE": "SEK",
}  # fmt: skip
_MCCS = ["5411", "5732", "5812", "4899", "5999", "4111", "5691", "5942", "7372", "5815"]

# The documented ranges: (low, high) drawn uniformly unless said otherwise; counts are inclusive.
RANGES: dict[str, tuple[float, float]] = {
    "countries": (2, 5),
    "issuers": (3, 8),
    "issuer.base_approval": (0.70, 0.93),
    "issuer.hour_amplitude": (0.0, 0.6),
    "issuer.persistent_decline": (0.01, 0.06),
    "issuer.outages_per_day": (0.0, 1.5),
    "routes": (2, 5),
    "route.cost_bps": (80, 320),
    "route.fixed_fee_minor": (0, 30),
    "route.domestic_lift": (0.0, 1.2),
    "route.cross_border_lift": (-1.0, 0.2),
    "route.token_lift": (-0.2, 0.5),
    "route.debit_lift": (-0.4, 0.3),
    "route.issuer_lift": (-0.8, 0.8),  # for 0-2 issuers a route
    "route.error_rate": (0.001, 0.01),
    "route.latency_ms_median": (150, 600),
    "route.degradations_per_day": (0.0, 1.5),
    "incident.mean_minutes": (10, 60),
    "incident.severity": (0.4, 0.95),
    "merchants": (3, 8),
    "merchant.recurring_share": (0.0, 0.6),
    "merchant.amount_median_minor": (800, 25_000),  # log-uniform
    "merchant.risk_lift": (-0.5, 0.3),
    "cards.token_share": (0.1, 0.6),
    "cards.credit": (0.3, 0.7),
    "cards.prepaid": (0.02, 0.08),
    "traffic.day_night_ratio": (1.5, 4.0),
    "traffic.max_attempts": (3, 4),
    "retry_fee_minor": (0, 30),
}


class _Draw:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed_int("family", "random-world", seed))

    def u(self, name: str, digits: int = 3) -> float:
        low, high = RANGES[name]
        return round(float(self.rng.uniform(low, high)), digits)

    def n(self, name: str) -> int:
        low, high = RANGES[name]
        return int(self.rng.integers(int(low), int(high) + 1))

    def log_u(self, name: str) -> int:
        low, high = RANGES[name]
        return round(math.exp(self.rng.uniform(math.log(low), math.log(high))))

    def share(self) -> float:
        return round(float(self.rng.lognormal(0.0, 0.6)), 3)

    def pick(self, items: list[Any], k: int | None = None) -> Any:
        if k is None:
            return items[int(self.rng.integers(len(items)))]
        return [items[i] for i in sorted(self.rng.choice(len(items), size=k, replace=False))]


def _bin(d: _Draw, network: str) -> str:
    first = "4" if network == "visa" else d.pick(["51", "52", "53", "54", "55", "2221"])
    return first + "".join(str(int(x)) for x in d.rng.integers(0, 10, size=6 - len(first)))


def _incidents(d: _Draw, per_day: str) -> dict[str, float]:
    return {
        "per_day": d.u(per_day, 2),
        "mean_minutes": d.u("incident.mean_minutes", 1),
        "severity": d.u("incident.severity", 2),
    }


def random_world(
    seed: int, *, payments_per_hour: float = 1500.0, hours: float = 12.0, cards: int | None = None
) -> WorldConfig:
    """The world of the family's `seed` (traffic and card count as given, the rest drawn)."""
    d = _Draw(seed)
    countries: list[str] = d.pick(sorted(_CURRENCY), d.n("countries"))
    issuers = []
    for i in range(d.n("issuers")):
        network = "visa" if i == 0 else "mastercard" if i == 1 else d.pick(["visa", "mastercard"])
        issuers.append(
            {
                "id": f"issuer-{i}",
                "country": countries[i % len(countries)],
                "network": network,
                "bins": sorted({_bin(d, network) for _ in range(int(d.rng.integers(1, 3)))}),
                "share": d.share(),
                "base_approval": d.u("issuer.base_approval"),
                "hour_amplitude": d.u("issuer.hour_amplitude", 2),
                "persistent_decline": d.u("issuer.persistent_decline"),
                "random_outages": _incidents(d, "issuer.outages_per_day"),
            }
        )
    routes = []
    for i in range(d.n("routes")):
        both = i == 0 or d.rng.random() < 0.75  # the first route takes both: every network has one
        networks = ["visa", "mastercard"] if both else [d.pick(["visa", "mastercard"])]
        lifted = d.pick([x["id"] for x in issuers], int(d.rng.integers(0, 3)))
        routes.append(
            {
                "id": f"acq-{i}",
                "country": d.pick(countries),
                "networks": networks,
                "cost_bps": int(d.u("route.cost_bps", 0)),
                "fixed_fee_minor": int(d.u("route.fixed_fee_minor", 0)),
                "domestic_lift": d.u("route.domestic_lift", 2),
                "cross_border_lift": d.u("route.cross_border_lift", 2),
                "token_lift": d.u("route.token_lift", 2),
                "debit_lift": d.u("route.debit_lift", 2),
                "issuer_lift": {iid: d.u("route.issuer_lift", 2) for iid in lifted},
                "error_rate": d.u("route.error_rate", 4),
                "latency_ms_median": d.u("route.latency_ms_median", 0),
                "latency_sigma": round(float(d.rng.uniform(0.2, 0.5)), 2),
                "random_degradations": _incidents(d, "route.degradations_per_day"),
            }
        )
    used: set[str] = {str(x["network"]) for x in issuers}
    merchants = []
    for i in range(d.n("merchants")):
        country = d.pick(countries)
        mine: list[str] = d.pick([r["id"] for r in routes], int(d.rng.integers(1, len(routes) + 1)))
        for network in sorted(used):  # a route for each card network its customers' issuers use
            if not any(network in r["networks"] for r in routes if r["id"] in mine):
                mine.append(next(r["id"] for r in routes if network in r["networks"]))
        mine = sorted(set(mine))
        domestic = [r["id"] for r in routes if r["id"] in mine and r["country"] == country]
        merchants.append(
            {
                "id": f"m-{i}",
                "mcc": d.pick(_MCCS),
                "country": country,
                "currency": _CURRENCY[country],
                "share": d.share(),
                "recurring_share": d.u("merchant.recurring_share", 2),
                "amount_median_minor": d.log_u("merchant.amount_median_minor"),
                "amount_sigma": round(float(d.rng.uniform(0.5, 1.2)), 2),
                "risk_lift": d.u("merchant.risk_lift", 2),
                "primary_route": d.pick(domestic or mine),
                "routes": mine,
            }
        )
    credit, prepaid = d.u("cards.credit", 2), d.u("cards.prepaid", 2)  # debit: the rest
    doc = {
        "name": f"random-{seed}",
        "description": f"drawn by sim.family.random_world({seed})",
        "start": "2026-11-02T00:00:00Z",
        "retry_fee_minor": int(d.u("retry_fee_minor", 0)),
        "traffic": {
            "payments_per_hour": payments_per_hour,
            "hours": hours,
            "day_night_ratio": d.u("traffic.day_night_ratio", 2),
            "max_attempts": d.n("traffic.max_attempts"),
            "cit_patience_s": int(d.rng.integers(60, 181)),
            "mit_patience_days": int(d.rng.integers(14, 31)),
        },
        "cards": {
            "count": cards if cards is not None else int(d.rng.integers(3_000, 20_001)),
            "token_share": d.u("cards.token_share", 2),
            "credit": credit,
            "debit": 1.0 - credit - prepaid,
            "prepaid": prepaid,
        },
        "issuers": issuers,
        "routes": routes,
        "merchants": merchants,
    }
    return WorldConfig.model_validate(doc)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, datetime):
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _value(k)


def world_toml(config: WorldConfig) -> str:
    """`config` as a world TOML file (what `load_world` reads back to the same config)."""
    doc = config.model_dump(mode="python")
    lines = [f"# {config.description}" if config.description else "# a world"]
    tables, arrays = {}, {}
    for k, v in doc.items():
        if isinstance(v, dict):
            tables[k] = v
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays[k] = v
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, table in tables.items():
        lines += ["", f"[{k}]", *(f"{_key(x)} = {_value(y)}" for x, y in table.items())]
    for k, items in arrays.items():
        for item in items:
            lines += ["", f"[[{k}]]", *(f"{_key(x)} = {_value(y)}" for x, y in item.items())]
    return "\n".join(lines) + "\n"
