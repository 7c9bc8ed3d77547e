"""`authopt train` and `authopt evaluate`: a model from a simulated world or from a platform's own
log, and its evaluation against the baselines and the oracle."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cli.world import WORLD_HELP, load_world_ref

if TYPE_CHECKING:
    from history.train import LogTrainConfig
    from server.settings import RouteConfig

__all__ = ["evaluate", "train"]


_F = TypeVar("_F", bound=Callable[..., Any])


def log_option(help: str) -> Callable[[_F], _F]:
    """The --log option of the commands that work on a log (`history/`)."""
    return click.option(
        "--log", "log_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), help=help
    )


ROUTES_OPTION = click.option(
    "--routes", help="The server's routes, JSON or a JSON file [default: $AUTHOPT_SERVER_ROUTES]."
)

_WORLD_ONLY = (
    "world_ref",
    "hours",
    "onpolicy_hours",
    "incident_boost",
    "selection_rounds",
    "selection_days",
    "selection_by_issuer",
    "workers",
)
_LOG_ONLY = ("routes", "min_route_attempts", "engine", "master")


@click.command()
@click.option("--world", "world_ref", default="default", show_default=True, help=WORLD_HELP)
@log_option("Train on this log alone (what `authopt log import` / `log export` wrote), not on a world.")
@ROUTES_OPTION
@click.option(
    "--min-route-attempts",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="With --log: refuse a route with fewer attempts than this.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model directory to export into.")
@click.option(
    "--seed",
    type=int,
    default=1000,
    show_default=True,
    help="World seed of the training traffic (and the nets').",
)
@click.option("--hours", type=float, help="Simulated hours of training traffic [default: 4x the world's].")
@click.option("--epochs", type=int, default=12, show_default=True)
@click.option("--hidden", type=int, default=128, show_default=True, help="Hidden width of the net.")
@click.option(
    "--members",
    type=click.IntRange(1, 16),
    default=3,
    show_default=True,
    help="Nets trained from different seeds and averaged into the served model.",
)
@click.option(
    "--onpolicy-hours",
    type=float,
    help="Hours the first model plays on-policy before the refit [default: the world's; 0: none].",
)
@click.option(
    "--incident-boost",
    type=float,
    default=3.0,
    show_default=True,
    help="Random incidents per day x this in the training traffic, so the model sees incidents.",
)
@click.option(
    "--selection-rounds",
    type=click.IntRange(0, 10),
    default=2,
    show_default=True,
    help="Plays of the final model to fit its selection correction on (0: none).",
)
@click.option(
    "--selection-days",
    type=click.IntRange(1, 30),
    default=6,
    show_default=True,
    help="World days (seeds) the last of those plays pools; more days, a steadier fit, a longer training.",
)
@click.option(
    "--selection-by-issuer/--no-selection-by-issuer",
    default=False,
    show_default=True,
    help="Fit the selection correction with a logit offset per issuer (card BIN), exported with it.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Days of that last play played at once, each in its own process [default: the CPUs, at most "
    "one per day].",
)
@click.option(
    "--version", "version", help="Model version name [default: <world>-s<seed>; with --log: log-<UTC time>]."
)
@click.option(
    "--engine",
    type=click.Choice(["local", "spark"]),
    default="local",
    show_default=True,
    help="With --log: where the point-in-time rows are computed (`authopt features backfill`).",
)
@click.option(
    "--master", default="local[2]", show_default=True, help="With --engine spark: the Spark master URL."
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def train(
    ctx: click.Context,
    world_ref: str,
    log_dir: Path | None,
    routes: str | None,
    min_route_attempts: int,
    out: Path,
    seed: int,
    hours: float | None,
    epochs: int,
    hidden: int,
    members: int,
    onpolicy_hours: float | None,
    incident_boost: float,
    selection_rounds: int,
    selection_days: int,
    selection_by_issuer: bool,
    workers: int | None,
    version: str | None,
    engine: str,
    master: str,
    quiet: bool,
) -> None:
    """Train the approval model on a simulated world, or on a log (--log), and export it for the server.

    With --world, simulates an exploring logging policy, replays its event log through the streams' feature
    code (point in time), fits and calibrates the nets (--members, averaged), plays them on-policy
    and refits on both logs, fits the correction of the chosen route's probability for the
    ranking's selection on plays of the final model (--selection-rounds, the last pooling
    --selection-days days), and exports
    TorchScript + manifest as OUT/VERSION. Interrupted runs
    resume from OUT/.work; the same seed gives the same model (torch runs on AVX2 kernels:
    model/numerics.py).

    With --log, trains on that log alone, no simulator: the same replay, fit, calibration and export;
    the newest days are held out; the on-policy refit and the selection correction need a served
    model's logged decisions and are skipped (the manifest says why). A log that cannot train a
    sound model is refused with the reason (docs/history.md).
    """
    from model.numerics import pin_numerics

    if not pin_numerics():  # before torch loads: one CPU kernel set, one model per seed (model/numerics.py)
        click.echo("warning: torch was loaded before its CPU kernels could be pinned", err=True)
    from model.train import CheckpointError, TrainingDataError

    given = {
        name
        for name in (*_WORLD_ONLY, *_LOG_ONLY)
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    if log_dir is not None:
        clash = sorted(given & set(_WORLD_ONLY))
        if clash:
            flags = ", ".join("--" + n.replace("_ref", "").replace("_", "-") for n in clash)
            raise click.UsageError(f"{flags} simulate a world; --log trains on the log alone")
        cfg = _log_config(seed, epochs, hidden, members, min_route_attempts, version, engine, master, quiet)
        _train_log(log_dir, out, routes, cfg)
        return
    if given & set(_LOG_ONLY):
        raise click.UsageError("--routes, --min-route-attempts, --engine and --master go with --log")
    from sim.pipeline import TrainConfig, train_world

    config = load_world_ref(world_ref)
    try:
        path = train_world(
            config,
            out,
            TrainConfig(
                seed=seed,
                hours=hours,
                epochs=epochs,
                hidden=hidden,
                members=members,
                onpolicy_hours=onpolicy_hours,
                incident_boost=incident_boost,
                selection_rounds=selection_rounds,
                selection_seeds=selection_days,
                selection_by_issuer=selection_by_issuer,
                workers=workers,
                version=version,
                progress=not quiet,
            ),
        )
    except (TrainingDataError, CheckpointError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


def _route_config(routes: str | None) -> list[RouteConfig]:
    """The routes from --routes (JSON or a JSON file) or $AUTHOPT_SERVER_ROUTES, as the server reads them."""
    import json
    import os

    from pydantic import TypeAdapter, ValidationError

    from server.settings import RouteConfig

    text = routes if routes is not None else os.environ.get("AUTHOPT_SERVER_ROUTES", "")
    source = "--routes" if routes is not None else "AUTHOPT_SERVER_ROUTES"
    if routes is not None and not routes.lstrip().startswith("["):
        try:
            text = Path(routes).read_text()
        except OSError as exc:
            raise click.BadParameter(
                f"not a JSON list nor a readable file: {exc}", param_hint="--routes"
            ) from exc
        source = routes
    if not text.strip():
        return []
    try:
        return list(TypeAdapter(list[RouteConfig]).validate_python(json.loads(text)))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise click.BadParameter(f"{source}: not a list of routes ({exc})", param_hint="--routes") from exc


def _log_config(
    seed: int,
    epochs: int,
    hidden: int,
    members: int,
    min_route_attempts: int,
    version: str | None,
    engine: str,
    master: str,
    quiet: bool,
) -> LogTrainConfig:
    from history.train import LogTrainConfig

    return LogTrainConfig(
        seed=seed,
        epochs=epochs,
        hidden=hidden,
        members=members,
        min_route_attempts=min_route_attempts,
        version=version,
        progress=not quiet,
        engine=engine,  # type: ignore[arg-type]
        master=master,
    )


def _train_log(log_dir: Path, out: Path, routes: str | None, cfg: LogTrainConfig) -> None:
    from history.errors import HistoryError
    from history.train import train_log
    from model.train import CheckpointError, TrainingDataError

    try:
        path = train_log(log_dir, out, _route_config(routes), cfg)
    except (HistoryError, TrainingDataError, CheckpointError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@click.command()
@click.option(
    "--world",
    "world_refs",
    multiple=True,
    default=["default"],
    show_default=True,
    help=WORLD_HELP + " Repeatable.",
)
@click.option(
    "--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Model directory or version."
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True)
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated world seeds.")
@click.option("--hours", type=float, help="Simulated hours per seed [default: the world's].")
@click.option("--no-ope", is_flag=True, help="Skip the off-policy estimates (saves one play per seed).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Seeds played at once, each in its own process [default: the CPUs, at most one per seed].",
)
@click.option(
    "--issuer-health",
    is_flag=True,
    help="Play authopt with the server's issuer health on (setting issuer_health; docs/model.md).",
)
@log_option("Evaluate off-policy on this log's decisions instead of playing a world.")
@click.option(
    "--champion",
    type=click.Path(path_type=Path, exists=True),
    help="With --log: the model serving today, compared with --model (uplift, paired).",
)
@ROUTES_OPTION
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="With --log: evaluate on decisions from this time (UTC) [default: the model's hold-out, else all].",
)
@click.option(
    "--exploration",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="With --log: the share of decisions the target policies spread over all candidates.",
)
@click.pass_context
def evaluate(
    ctx: click.Context,
    world_refs: tuple[str, ...],
    model_dir: Path,
    out: Path,
    seeds: str,
    hours: float | None,
    no_ope: bool,
    workers: int | None,
    issuer_health: bool,
    log_dir: Path | None,
    champion: Path | None,
    routes: str | None,
    since: datetime | None,
    exploration: float,
) -> None:
    """Play every policy on the same simulated payments and report how authopt compares; or, with
    --log, estimate off-policy how --model (and --champion) would have done on a log's decisions.

    Writes OUT/results.json (machine-readable), OUT/report.md and PNG plots; with --log,
    OUT/ope.json and OUT/report.md (docs/history.md).
    """
    given = {
        n
        for n in (
            "world_refs", "seeds", "hours", "no_ope", "workers", "issuer_health", "champion", "routes",
            "since", "exploration",
        )
        if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT
    }  # fmt: skip
    if log_dir is not None:
        clash = sorted(given & {"world_refs", "seeds", "hours", "no_ope", "workers", "issuer_health"})
        if clash:
            flags = ", ".join("--" + n.replace("_refs", "").replace("_", "-") for n in clash)
            raise click.UsageError(f"{flags} play a world; --log evaluates on the log's decisions")
        _evaluate_log(log_dir, model_dir, champion, routes, since, exploration, out)
        return
    if given & {"champion", "routes", "since", "exploration"}:
        raise click.UsageError("--champion, --routes, --since and --exploration go with --log")
    try:
        import matplotlib  # noqa: F401  # the report's plots
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            "authopt evaluate needs matplotlib for its plots: pip install 'authopt[eval]' "
            "(scripts/setup installs it)"
        ) from exc
    from model.numerics import pin_numerics

    pin_numerics()  # the same kernels as training (model/numerics.py)
    from server.models import ModelRejected, load_model_dir
    from sim.evaluate import evaluate_world, write_results

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise click.ClickException(f"--seeds must be comma-separated integers, got {seeds!r}") from exc
    if not seed_list:
        raise click.ClickException("--seeds names no seed")
    try:
        load_model_dir(model_dir)
    except (ModelRejected, FileNotFoundError) as exc:
        raise click.ClickException(f"cannot use model {model_dir}: {exc}") from exc
    docs = []
    for ref in world_refs:
        config = load_world_ref(ref)
        if hours is not None:
            config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
        docs.append(
            evaluate_world(
                config,
                model_dir,
                seed_list,
                ope=not no_ope,
                progress=lambda m: click.echo(m, err=True),
                workers=workers or min(os.cpu_count() or 1, len(seed_list)),
                issuer_health=issuer_health,
            )
        )
    path = write_results(docs, out)
    _echo_results(docs)
    click.echo(str(path))


def _echo_results(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        for name, t in doc["targets"].items():
            verdict = "met" if t["met"] else "NOT met"
            click.echo(f"{doc['world']}: {name} {t['measured']:.4f} (target {t['target']}) {verdict}")
        capture = doc.get("paired", {}).get("capture_first_attempt")
        if capture:
            click.echo(
                f"{doc['world']}: capture {capture['estimate']:.3f} paired 95 % [{capture['lo']:.3f}, "
                f"{capture['hi']:.3f}] (half-width {capture['half_width']:.3f})"
            )


def _evaluate_log(
    log_dir: Path,
    model_dir: Path,
    champion: Path | None,
    routes: str | None,
    since: datetime | None,
    exploration: float,
    out: Path,
) -> None:
    from history.errors import HistoryError
    from history.offline import evaluate_log, write_report

    def show(done: int, total: int) -> None:
        click.echo(f"replaying the log: {done:,} / {total:,} events", err=True)

    try:
        doc = evaluate_log(
            log_dir,
            _route_config(routes),
            model_dir,
            champion_dir=champion,
            since=since.replace(tzinfo=UTC) if since is not None else None,
            exploration=exploration,
            progress=show,
        )
    except HistoryError as exc:
        raise click.ClickException(str(exc)) from exc
    path = write_report(doc, out)
    for warning in doc["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    for role, value in doc["policies"].items():
        best = value["approval"].get("dr") or value["approval"]["dm"]
        how = "DR" if "dr" in value["approval"] else "DM"
        click.echo(
            f"{role} {doc['models'][role]}: first-attempt approval {100 * best['value']:.2f} % "
            f"[{100 * best['low']:.2f}, {100 * best['high']:.2f}] ({how})"
        )
    if "uplift" in doc:
        u = doc["uplift"]["approval"]
        low, high = 100 * u["low"], 100 * u["high"]
        click.echo(f"uplift over the champion: {100 * u['value']:+.2f} pp [{low:+.2f}, {high:+.2f}]")
    click.echo(str(path))
