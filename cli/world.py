"""`authopt world`: check a world file, write its logging policy's log or history, or a served model's
log; the `--world` option's loader."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sim.config import WorldConfig

__all__ = ["WORLD_HELP", "WORLD_HELP_UP", "load_world_ref", "world"]


def load_world_ref(ref: str) -> WorldConfig:
    """The world `ref` names (built-in or a TOML file); a clear error for the command line otherwise."""
    from sim.config import WorldConfigError, load_world

    try:
        return load_world(ref)
    except WorldConfigError as exc:
        raise click.ClickException(str(exc)) from exc


WORLD_HELP = "Built-in world (default, outage-heavy, cross-border) or a world TOML file."
WORLD_HELP_UP = WORLD_HELP + " Its payments are played as a time-lapse at --rate."


@click.group()
def world() -> None:
    """Simulated payment worlds: check a config, draw one of the random family, write its logs."""


@world.command("check")
@click.argument("world_ref")
def world_check(world_ref: str) -> None:
    """Validate a world config and summarize it."""
    from sim.world import World

    config = load_world_ref(world_ref)
    w = World(config, 0)
    click.echo(
        f"world {config.name!r}: {len(config.issuers)} issuers, {len(config.routes)} routes, "
        f"{len(config.merchants)} merchants, {config.cards.count:,} cards, "
        f"{round(config.traffic.payments_per_hour * config.traffic.hours):,} payments "
        f"over {config.traffic.hours:g} h; "
        f"incidents (seed 0): {sum(map(len, w.issuer_outages))} issuer outages, "
        f"{sum(map(len, w.route_degradations))} route degradations"
    )


@world.command("random")
@click.option("--seed", type=click.IntRange(min=0), required=True, help="The family member to draw.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML file to write [default: standard output].",
)
@click.option("--payments-per-hour", type=click.FloatRange(min=1), default=1500.0, show_default=True)
@click.option("--hours", type=click.FloatRange(min=0.1, max=24 * 90), default=12.0, show_default=True)
def world_random(seed: int, out: Path | None, payments_per_hour: float, hours: float) -> None:
    """Draw a world of the random family (sim/family.py; docs/simulator.md) as a world TOML file.

    Countries, issuers, routes and their affinities and costs, merchants, the card and decline mix
    and the incident schedules are drawn from documented ranges; the same seed gives the same
    world. Train and evaluate on it like a built-in world: --world FILE.
    """
    from sim.family import random_world, world_toml

    text = world_toml(random_world(seed, payments_per_hour=payments_per_hour, hours=hours))
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text)
    click.echo(f"wrote world random-{seed} to {out}", err=True)


@world.command("emit")
@click.argument("world_ref")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Delimited AttemptEvent log to write."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hours", type=float, help="Simulated hours [default: the world's].")
def world_emit(world_ref: str, out: Path, seed: int, hours: float | None) -> None:
    """Write the logging policy's AttemptEvent log (the Kafka records) for a world and seed."""
    from sim.emit import emit_log
    from sim.world import World

    config = load_world_ref(world_ref)
    if hours is not None:
        config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
    w = World(config, seed)
    payments = w.payments()
    with out.open("wb") as f:
        stats = emit_log(w, f, payments=payments, seed=seed)
    click.echo(
        f"{stats.attempts:,} attempts of {stats.payments:,} payments in {stats.seconds:.2f} s "
        f"({stats.attempts / max(stats.seconds, 1e-9):,.0f}/s) -> {out}"
    )


@world.command("history")
@click.argument("world_ref")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="History file to write: .parquet or .csv, in the import schema (docs/history.md).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hours", type=float, help="Simulated hours [default: the world's].")
@click.option(
    "--routes-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the world's routes as the server's route configuration (AUTHOPT_SERVER_ROUTES JSON).",
)
@click.option(
    "--incident-boost",
    type=float,
    default=1.0,
    show_default=True,
    help="Random incidents per day x this (`authopt train --world` trains on 3x).",
)
def world_history(
    world_ref: str, out: Path, seed: int, hours: float | None, routes_out: Path | None, incident_boost: float
) -> None:
    """Write the logging policy's history as a platform would export it: one row per attempt in the
    public import schema (`authopt log import` reads it back), not the internal event log. First
    attempts carry the logging policy's candidates and propensity (off-policy evaluation)."""
    import io
    import json

    from authopt.v1 import events_pb2
    from history.writer import write_history
    from sim.emit import emit_log, logging_choices
    from sim.pipeline import boost_incidents
    from sim.world import World
    from streams.replay import iter_records

    config = boost_incidents(load_world_ref(world_ref), incident_boost)
    if hours is not None:
        config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
    w = World(config, seed)
    buffer = io.BytesIO()
    payments = w.payments()
    stats = emit_log(w, buffer, payments=payments, seed=seed)
    events = [events_pb2.AttemptEvent.FromString(r) for r in iter_records(buffer.getvalue())]
    choices = logging_choices(w, payments, events)  # first attempts' candidates and propensities
    rows = write_history(events, out, choices)
    click.echo(f"{rows:,} attempts of {stats.payments:,} payments ({config.name}, seed {seed}) -> {out}")
    if routes_out is not None:
        routes = [
            {"id": r.id, "cost_bps": r.cost_bps, "fixed_fee_minor": r.fixed_fee_minor} for r in config.routes
        ]
        routes_out.write_text(json.dumps(routes, indent=2) + "\n")
        click.echo(f"{len(routes)} routes -> {routes_out}")


@world.command("served")
@click.argument("world_ref")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="Model version directory to serve (an `authopt train` output).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Log directory to write into, in `authopt log export`'s layout (attempts/ and decisions/).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hours", type=float, help="Simulated hours [default: the world's].")
@click.option(
    "--start",
    type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d"]),
    help="When the world starts (UTC unless an offset is given) [default: the world's]; e.g. the end "
    "of the history the model was trained on.",
)
@click.option(
    "--exploration",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="The server's exploration rate (ε) while serving.",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def world_served(
    world_ref: str,
    model_dir: Path,
    out: Path,
    seed: int,
    hours: float | None,
    start: datetime | None,
    exploration: float,
    quiet: bool,
) -> None:
    """Serve MODEL in the world and write what its platform would export: the attempts and the
    decision log (each first attempt's decision record, with every route's propensity), as `authopt
    log export` writes them. `authopt train --log` reads the decisions as a served model's own
    routing (its on-policy refit and selection correction)."""
    import torch

    from server.models import ModelRejected, load_model_dir
    from sim.served import served_log
    from sim.world import World

    config = load_world_ref(world_ref)
    update: dict[str, object] = {}
    if hours is not None:
        update["traffic"] = config.traffic.model_copy(update={"hours": hours})
    if start is not None:
        update["start"] = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
    config = config.model_copy(update=update)
    try:
        model = load_model_dir(model_dir)
    except (ModelRejected, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    torch.set_num_threads(1)
    w = World(config, seed)
    payments = w.payments()
    step = max(1, len(payments) // 20)

    def progress(n: int) -> None:
        if not quiet and (n % step == 0 or n == len(payments)):
            click.echo(f"{n:,} of {len(payments):,} payments", err=True)

    log = served_log(w, model, out, payments=payments, exploration=exploration, seed=seed, progress=progress)
    click.echo(
        f"{log.attempts:,} attempts and {log.decisions:,} decisions of {log.payments:,} payments "
        f"({config.name}, seed {seed}, model {model.version}, first-attempt approval "
        f"{100 * log.first_attempt_approval:.2f} %) -> {out} ({', '.join(log.days)})"
    )
