"""`authopt up` (the whole loop on one machine) and `authopt simulate` (the simulated platform's
traffic against any server)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from cli.world import WORLD_HELP, WORLD_HELP_UP, load_world_ref

__all__ = ["simulate", "up"]


@click.command()
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of traffic, then stop [default: until Ctrl-C].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True, max=100_000),
    default=100.0,
    show_default=True,
    help="New simulated payments per second.",
)
@click.option("--world", "world_ref", default="default", show_default=True, help=WORLD_HELP_UP)
@click.option(
    "--seed", type=int, default=1, show_default=True, help="World seed: population, incidents, payments."
)
@click.option(
    "--no-dashboard",
    is_flag=True,
    help="Status lines every 5 s (logs, CI) instead of the dashboard; also when output is not a terminal.",
)
@click.option(
    "--summary-json",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the final summary as JSON to this file.",
)
@click.option(
    "--port", type=int, default=0, show_default=True, help="The server's gRPC port; 0 picks a free one."
)
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model directory for the server [default: the bundled model].",
)
@click.option(
    "--shadow-model-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="A challenger's model directory, scored in the shadow of the served model (README, "
    '"Shadow and A/B"); both decisions go to the decision log.',
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the processes' logs go [default: a new temporary directory].",
)
@click.option(
    "--store",
    "online_store",
    metavar="URL",
    help="redis:// or rediss:// URL of a Redis / Valkey you run: card state goes there (the worker "
    "writes it, the server reads it) instead of the server's memory [default: memory, no extra process].",
)
def up(
    duration_s: float | None,
    rate: float,
    world_ref: str,
    seed: int,
    no_dashboard: bool,
    summary_json: Path | None,
    port: int,
    model_dir: Path | None,
    shadow_model_dir: Path | None,
    workdir: Path | None,
    online_store: str | None,
) -> None:
    """Run the whole loop on this machine: broker, streams worker, server and a simulated platform.

    Starts the local broker, one worker and the server with the bundled model (each its own
    process), then plays the world's payments at --rate against the server: every decision comes
    over gRPC, every outcome goes back through Kafka into the features. The dashboard compares
    authopt with static routing on the same payments. Ctrl-C (or the end of --duration) stops
    everything in order and prints a summary; the exit status is 1 when anything went wrong
    (a process died, an outcome was lost).
    """
    from cli.up import UpError, UpOptions, run_up

    opts = UpOptions(
        world=load_world_ref(world_ref),
        world_ref=world_ref,
        seed=seed,
        rate=rate,
        duration_s=duration_s,
        dashboard=not no_dashboard and sys.stdout.isatty(),  # a pipe or a log file gets status lines
        summary_json=summary_json,
        workdir=workdir,
        port=port,
        model_dir=model_dir,
        shadow_model_dir=shadow_model_dir,
        online_store=online_store or "",
    )
    if online_store:
        from streams.online import OnlineStoreError, parse_url

        try:
            parse_url(online_store)
        except OnlineStoreError as exc:
            raise click.BadParameter(str(exc), param_hint="--store") from None
    from streams.broker import BrokerError

    try:
        code, _ = run_up(opts, lambda line: click.echo(line, err=False))
    except (UpError, BrokerError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@click.command()
@click.option("--target", help="Server address host:port [env AUTHOPT_SIM_TARGET, default 127.0.0.1:50051].")
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of traffic [env AUTHOPT_SIM_DURATION_S; default: until Ctrl-C].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True, max=100_000),
    help="New payments per second [env AUTHOPT_SIM_RATE, default 100].",
)
@click.option("--world", "world_ref", help=WORLD_HELP + " [env AUTHOPT_SIM_WORLD, default default]")
@click.option("--seed", type=int, help="World seed [env AUTHOPT_SIM_SEED, default 1].")
@click.option(
    "--summary-json",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the final summary as JSON to this file.",
)
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between status lines.",
)
def simulate(
    target: str | None,
    duration_s: float | None,
    rate: float | None,
    world_ref: str | None,
    seed: int | None,
    summary_json: Path | None,
    interval_s: float,
) -> None:
    """Play a simulated payment platform against a running server (traffic only).

    Recommend for every payment, outcomes from the world's ground truth for the route chosen,
    retries only as advised, outcomes back through ReportOutcomes (the server needs Kafka for
    those: without it they are counted as not reported). Prints a status line every --interval
    and a summary at the end; compares authopt with static routing on the same payments.
    """
    import json

    from cli.dashboard import format_platform
    from sim.platform import Platform
    from sim.platform_settings import SimulateSettings

    overrides = {
        k: v
        for k, v in {
            "target": target, "duration_s": duration_s, "rate": rate, "world": world_ref, "seed": seed,
        }.items()
        if v is not None
    }  # fmt: skip
    settings = SimulateSettings(**overrides)  # type: ignore[arg-type]
    platform = Platform(settings, load_world_ref(settings.world))
    stats = asyncio.run(_simulate(platform, interval_s))
    doc = {"world": settings.world, "seed": settings.seed, "target": settings.target, "platform": stats}
    if summary_json is not None:
        summary_json.write_text(json.dumps(doc, indent=2, sort_keys=True))
    click.echo(format_platform(doc))
    if stats["requests"] == 0:
        raise click.ClickException(f"no decision came back from {settings.target}: {stats['request_errors']}")


async def _simulate(platform: object, interval_s: float) -> dict[str, object]:
    import signal
    import time

    from cli.dashboard import platform_line
    from sim.platform import Platform

    assert isinstance(platform, Platform)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(platform.run(stop))
    while not task.done():
        await asyncio.wait([task], timeout=interval_s)
        if not task.done():
            click.echo(platform_line(platform.stats, time.monotonic() - platform.stats.started))
    await task
    return platform.stats.summary()
