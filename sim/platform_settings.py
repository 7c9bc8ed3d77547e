"""The settings of the simulated payment platform: `authopt simulate`, and the traffic `authopt up` plays.

Read from the environment (`AUTHOPT_SIM_*`) or given by the command line; `sim.platform` plays by
them. scripts/settings_doc.py generates the README's table of them.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SimulateSettings"]


class SimulateSettings(BaseSettings):
    """Settings of `authopt simulate` (and of the traffic `authopt up` plays). Env: `AUTHOPT_SIM_*`."""

    model_config = SettingsConfigDict(env_prefix="AUTHOPT_SIM_", frozen=True, extra="forbid")

    target: str = Field("127.0.0.1:50051", description="authopt server address host:port")
    world: str = Field("default", description="built-in world name or a world TOML file")
    seed: int = Field(1, description="world seed: the population, incidents and payments played")
    rate: float = Field(100.0, gt=0, le=100_000, description="new payments per second")
    duration_s: float | None = Field(
        None, gt=0, description="seconds of traffic; unset: until SIGINT/SIGTERM"
    )
    max_in_flight: int = Field(
        64,
        ge=1,
        le=100_000,
        description="payments in progress at once; beyond it the rate drops (and says so)",
    )
    timeout_s: float = Field(1.0, gt=0, le=60, description="deadline of each Recommend call, seconds")
    max_retry_wait_s: float = Field(
        300.0,
        ge=0,
        description="retries advised for later than this are counted as deferred, not waited for",
    )
    report_interval_s: float = Field(
        0.05, gt=0, le=10, description="outcomes are sent in batches at least this often"
    )
    report_queue: int = Field(
        20_000, ge=100, description="outcomes waiting to be reported; when full, payments wait"
    )
