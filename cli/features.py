"""`authopt features`: the feature state outside the worker (the online store)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

__all__ = ["features"]


@click.group()
def features() -> None:
    """The feature state outside the worker: the online store of card x merchant rows."""


@features.command("rebuild-store")
@click.option(
    "--store", "url", required=True, metavar="URL", help="redis:// or rediss:// URL of the online store."
)
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="File holding the store's password (instead of one in the URL).",
)
@click.option("--bootstrap", help="Kafka bootstrap servers [env AUTHOPT_KAFKA_BOOTSTRAP].")
@click.option(
    "--ttl-s",
    type=click.IntRange(min=60),
    default=None,
    help="Expiry of each row written [default: AUTHOPT_WORKER_ONLINE_STORE_TTL_S, 31 days].",
)
def rebuild_store(url: str, password_file: Path | None, bootstrap: str | None, ttl_s: int | None) -> None:
    """Write every card x merchant row of authopt.features.v1 (the source of truth) to the store.

    For a new or emptied store, or after the worker could not write to it for longer than it keeps
    rows to retry. Reads the compacted topic from its start to the end it sees at start; running
    workers may write meanwhile (a row written twice is the same row or a newer one).
    """
    from streams.kafka import KafkaSettings
    from streams.online import DEFAULT_TTL_S, OnlineStore, OnlineStoreError, RebuildReport, rebuild

    kafka = KafkaSettings(**({"bootstrap": bootstrap} if bootstrap else {}))  # type: ignore[arg-type]
    if not kafka.bootstrap:
        raise click.UsageError("no Kafka: pass --bootstrap or set AUTHOPT_KAFKA_BOOTSTRAP")
    password = password_file.read_text().strip() if password_file is not None else None
    try:
        store = OnlineStore(url, password=password, ttl_s=ttl_s or DEFAULT_TTL_S, timeout_s=5.0)
    except OnlineStoreError as e:
        raise click.BadParameter(str(e), param_hint="--store") from None

    def progress(report: RebuildReport) -> None:
        click.echo(f"  {report.records:,} records read, {report.cards:,} card rows written", err=True)

    async def run() -> None:
        try:
            if not await store.ping():
                raise click.ClickException(f"the online store {store.url} does not answer")
            report = await rebuild(kafka, store, progress=progress)
        except OnlineStoreError as e:
            raise click.ClickException(str(e)) from None
        finally:
            await store.close()
        click.echo(
            f"rebuilt {store.url}: {report.cards:,} card rows from {report.records:,} records "
            f"in {report.seconds:.1f}s"
            + (f" ({report.skipped:,} of another contract skipped)" if report.skipped else "")
        )

    asyncio.run(run())


@features.command("backfill")
@click.option(
    "--log",
    "log_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The log (what `authopt log import` / `log export` wrote).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory of the rows (replaced).",
)
@click.option(
    "--routes",
    help="The server's routes, JSON or a JSON file (each route's cost is an input) "
    "[default: $AUTHOPT_SERVER_ROUTES].",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "spark"]),
    default="local",
    show_default=True,
    help="local: one process, the whole log in memory; spark: partitioned on Spark "
    "(pip install 'authopt[spark]', Java 17+).",
)
@click.option(
    "--master", default="local[2]", show_default=True, help="Spark master URL (with --engine spark)."
)
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    help="Spark shuffle partitions [default: one per 250,000 records].",
)
@click.option("--conf", "conf", multiple=True, metavar="KEY=VALUE", help="A Spark setting (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def backfill(
    ctx: click.Context,
    log_dir: Path,
    out: Path,
    routes: str | None,
    engine: str,
    master: str,
    partitions: int | None,
    conf: tuple[str, ...],
    quiet: bool,
) -> None:
    """Write the point-in-time training rows of a log to OUT as Parquet.

    Each attempt gives a route row, each decline retried after one of the retry head's delays a
    retry row, from the features as they stood just before the attempt (a retry row: just after),
    through the streams' own feature code: what `authopt train --log` trains on. OUT/_summary.json
    says what the rows hold.
    """
    from cli.train import _route_config
    from history.backfill import BackfillError
    from history.backfill import backfill as run

    if engine == "local":
        given = [
            f"--{n}"
            for n in ("master", "partitions", "conf")
            if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)} go with --engine spark")
    settings: dict[str, str] = {}
    for item in conf:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--conf")
        settings[key] = value
    route_configs = _route_config(routes)
    if not route_configs:
        raise click.UsageError("no routes: pass --routes (the server's AUTHOPT_SERVER_ROUTES JSON)")

    def say(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    try:
        result = run(
            log_dir,
            out,
            {r.id: r.cost_bps for r in route_configs},
            engine=engine,  # type: ignore[arg-type]
            master=master,
            partitions=partitions,
            spark_conf=settings,
            progress=say,
        )
    except BackfillError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{result.rows:,} rows from {result.events:,} attempts ({result.duplicates:,} duplicates dropped) "
        f"in {result.seconds:.1f}s on {result.engine}: {result.out}"
    )
