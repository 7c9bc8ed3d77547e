"""The world config: a TOML file describing issuers, cards, merchants, routes and decline behaviour.

Validated with pydantic (unknown keys are refused); every error names the offending key path and
value, e.g. ``routes[2].cost_bps: Input should be greater than or equal to 0 (got -5)``. The schema is
documented field by field in docs/simulator.md and by the `description` of each field below.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.errors import SimError

__all__ = [
    "BUILTIN_WORLDS",
    "CardsConfig",
    "DeclineConfig",
    "Episode",
    "IssuerConfig",
    "MerchantConfig",
    "RandomEpisodes",
    "RouteConfig",
    "TrafficConfig",
    "WorldConfig",
    "WorldConfigError",
    "load_world",
]

BUILTIN_WORLDS = ("default", "outage-heavy", "cross-border")
Network = Literal["visa", "mastercard"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class WorldConfigError(SimError, ValueError):
    """An invalid world config; the message names the key and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Episode(_Strict):
    """A scheduled incident: hours after the world's start, for a number of minutes."""

    start_hour: float = Field(ge=0, description="start, hours after the world's start")
    minutes: float = Field(gt=0, le=7 * 24 * 60, description="duration in minutes")
    severity: Probability = Field(
        description="issuer outage: share of attempts that fail with 91/96; "
        "route degradation: share of attempts lost (errors and extra declines)"
    )


class RandomEpisodes(_Strict):
    """Incidents drawn from the seed: a Poisson number per simulated day."""

    per_day: float = Field(0.0, ge=0, le=24, description="expected incidents per day")
    mean_minutes: float = Field(30.0, gt=0, le=24 * 60, description="mean duration (exponential)")
    severity: Probability = Field(0.7, description="severity of each drawn incident")


class IssuerConfig(_Strict):
    id: str = Field(min_length=1, description="issuer name")
    country: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166 alpha-2 country")
    network: Network
    bins: list[Annotated[str, Field(pattern=r"^[0-9]{6,8}$")]] = Field(min_length=1)
    share: float = Field(gt=0, description="relative share of cards")
    base_approval: float = Field(gt=0, lt=1, description="P(approve) of a domestic, healthy attempt")
    hour_amplitude: float = Field(0.0, ge=0, le=2, description="logit swing over the day (night dip)")
    persistent_decline: Probability = Field(
        0.02, description="share of payments whose card cannot be approved at all (lost, closed, ...)"
    )
    outages: list[Episode] = Field(default_factory=list)
    random_outages: RandomEpisodes = Field(default_factory=lambda: RandomEpisodes.model_validate({}))


class RouteConfig(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    country: str = Field(pattern=r"^[A-Z]{2}$", description="the acquirer's country")
    networks: list[Network] = Field(min_length=1)
    cost_bps: int = Field(ge=0, le=1000)
    fixed_fee_minor: int = Field(ge=0, le=10_000)
    domestic_lift: float = Field(0.0, ge=-5, le=5, description="logit change when issuer country = route")
    cross_border_lift: float = Field(0.0, ge=-5, le=5, description="logit change otherwise")
    token_lift: float = Field(0.0, ge=-5, le=5, description="logit change for network-tokenized cards")
    debit_lift: float = Field(0.0, ge=-5, le=5, description="logit change for debit cards")
    issuer_lift: dict[str, float] = Field(default_factory=dict, description="issuer id -> logit change")
    error_rate: Probability = Field(0.002, description="share of attempts that time out or error")
    latency_ms_median: float = Field(250.0, gt=0, le=30_000)
    latency_sigma: float = Field(0.35, ge=0, le=3, description="lognormal sigma of latency")
    degradations: list[Episode] = Field(default_factory=list)
    random_degradations: RandomEpisodes = Field(default_factory=lambda: RandomEpisodes.model_validate({}))


class MerchantConfig(_Strict):
    id: str = Field(min_length=1)
    mcc: str = Field(pattern=r"^[0-9]{4}$")
    country: str = Field(pattern=r"^[A-Z]{2}$")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    share: float = Field(gt=0, description="relative share of payments")
    recurring_share: Probability = Field(0.0, description="share of merchant-initiated recurring payments")
    amount_median_minor: int = Field(gt=0)
    amount_sigma: float = Field(0.8, ge=0, le=3, description="lognormal sigma of amounts")
    risk_lift: float = Field(0.0, ge=-5, le=5, description="logit change for this merchant (MCC risk)")
    primary_route: str
    routes: list[str] = Field(min_length=1, description="routes this merchant may use")

    @model_validator(mode="after")
    def _primary_in_routes(self) -> MerchantConfig:
        if self.primary_route not in self.routes:
            raise ValueError(f"primary_route {self.primary_route!r} is not in routes {self.routes}")
        return self


class CardsConfig(_Strict):
    count: int = Field(gt=0, le=10_000_000, description="distinct cards")
    token_share: Probability = 0.3
    credit: Probability = 0.55
    debit: Probability = 0.4
    prepaid: Probability = 0.05
    balance_median_minor: int = Field(150_000, gt=0, description="funds right after payday (median)")
    balance_sigma: float = Field(1.0, ge=0, le=3)
    paydays: list[Annotated[int, Field(ge=1, le=28)]] = Field(default_factory=lambda: [1, 15], min_length=1)
    low_fraction_debit: Probability = Field(0.08, description="funds left just before payday, debit/prepaid")
    low_fraction_credit: Probability = Field(0.6, description="credit left just before payday, credit")
    card_skew: float = Field(
        1.5,
        ge=1,
        le=4,
        description="card popularity: rank = count x u^skew (1 = uniform; higher = more repeat)",
    )

    @model_validator(mode="after")
    def _funding_sums(self) -> CardsConfig:
        total = self.credit + self.debit + self.prepaid
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"credit + debit + prepaid must be 1, got {total:g}")
        return self


class DeclineConfig(_Strict):
    persistent_codes: dict[str, float] = Field(
        default_factory=lambda: {
            "05": 0.35, "41": 0.08, "43": 0.08, "57": 0.1, "62": 0.06,
            "04": 0.05, "14": 0.08, "54": 0.12, "12": 0.08,
        },
        description="code mix of a card that cannot be approved (weights)",
    )  # fmt: skip
    transient_codes: dict[str, float] = Field(
        default_factory=lambda: {"05": 0.8, "59": 0.08, "65": 0.04, "N7": 0.03, "1A": 0.05},
        description="code mix of an issuer's soft, partly random declines (weights)",
    )
    funds_codes: dict[str, float] = Field(default_factory=lambda: {"51": 0.9, "61": 0.1})
    unavailable_codes: dict[str, float] = Field(default_factory=lambda: {"91": 0.7, "96": 0.3})
    mastercard_mac_hard: Probability = Field(0.7, description="MAC 03 on a persistent decline")
    mastercard_mac_funds: Probability = Field(0.3, description="MAC 25 (retry after 24 h) on a 51")

    @field_validator("persistent_codes", "transient_codes", "funds_codes", "unavailable_codes")
    @classmethod
    def _codes(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("needs at least one code")
        for code, weight in value.items():
            if not (len(code) == 2 and code.isalnum()):
                raise ValueError(f"{code!r} is not a two-character ISO 8583 response code")
            if weight <= 0:
                raise ValueError(f"weight of {code!r} must be > 0, got {weight}")
        return value


class TrafficConfig(_Strict):
    payments_per_hour: float = Field(gt=0, le=10_000_000)
    hours: float = Field(gt=0, le=24 * 90)
    day_night_ratio: float = Field(3.0, ge=1, le=50, description="busiest vs quietest hour volume")
    max_attempts: int = Field(4, ge=1, le=20, description="tries per payment the platform allows")
    cit_patience_s: float = Field(120, ge=0, description="customer-initiated: retries only within this")
    mit_patience_days: float = Field(30, ge=0, description="merchant-initiated: retries within this")


class WorldConfig(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    start: datetime = Field(description="world start, ISO 8601 with offset")
    retry_fee_minor: int = Field(0, ge=0, le=10_000, description="network fee per reattempt")
    traffic: TrafficConfig
    cards: CardsConfig
    declines: DeclineConfig = Field(default_factory=lambda: DeclineConfig.model_validate({}))
    issuers: list[IssuerConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    merchants: list[MerchantConfig] = Field(min_length=1)

    @field_validator("start")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.utcoffset() is None:
            raise ValueError("needs a UTC offset, e.g. 2026-11-02T00:00:00Z")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _references(self) -> WorldConfig:
        routes = {r.id: r for r in self.routes}
        issuers = {i.id for i in self.issuers}
        for kind, ids in (("issuers", [i.id for i in self.issuers]), ("routes", list(routes))):
            dupes = sorted({x for x in ids if ids.count(x) > 1})
            if dupes:
                raise ValueError(f"{kind}: duplicate id {dupes[0]!r}")
        for m in self.merchants:
            for rid in m.routes:
                if rid not in routes:
                    raise ValueError(f"merchant {m.id!r}: unknown route {rid!r} (known: {sorted(routes)})")
        for r in self.routes:
            for iid in r.issuer_lift:
                if iid not in issuers:
                    raise ValueError(f"route {r.id!r}: issuer_lift names unknown issuer {iid!r}")
        for m in self.merchants:
            for net in ("visa", "mastercard"):
                if any(i.network == net for i in self.issuers) and not any(
                    net in routes[rid].networks for rid in m.routes
                ):
                    raise ValueError(f"merchant {m.id!r}: none of its routes accepts {net} cards")
        return self


def _error_message(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc or '(top level)'}: {msg} (got {shown})")
    return f"invalid world config {source}:\n  " + "\n  ".join(lines)


def parse_world(text: str, source: str = "<string>") -> WorldConfig:
    """Parse and validate TOML text; `WorldConfigError` names each offending key and value."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WorldConfigError(f"invalid world config {source}: not valid TOML: {exc}") from exc
    try:
        return WorldConfig.model_validate(doc)
    except ValidationError as exc:
        raise WorldConfigError(_error_message(source, exc)) from None


def load_world(name_or_path: str | Path) -> WorldConfig:
    """A built-in world by name (``default``, ``outage-heavy``, ``cross-border``) or a TOML file."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_WORLDS:
        text = resources.files("sim.worlds").joinpath(f"{name_or_path}.toml").read_text("utf-8")
        return parse_world(text, f"built-in world {name_or_path!r}")
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(BUILTIN_WORLDS)
        raise WorldConfigError(
            f"world {str(name_or_path)!r} is neither a built-in world ({known}) nor a file"
        )
    return parse_world(path.read_text("utf-8"), str(path))
