"""`authopt log`: a platform's own history in and out (`authopt log import`, `authopt log export`)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click

__all__ = ["log"]


@click.group()
def log() -> None:
    """The platform's history: import its authorization logs, export authopt's topics (docs/history.md)."""


@log.command("import")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Log directory to write."
)
@click.option(
    "--max-age-days",
    type=click.FloatRange(min=1),
    default=3650,
    show_default=True,
    help="Rows older than this are rejected (TIMESTAMP_TOO_OLD).",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def import_(files: tuple[Path, ...], out: Path, max_age_days: float, quiet: bool) -> None:
    """Import FILES (Parquet or CSV in the schema of docs/history.md) into OUT as day-partitioned
    Parquet of validated attempt events.

    Bad rows go to OUT/rejects/<file>.csv with their row, column and reason; a file holding anything
    like a full card number is refused whole. Importing a file again replaces what it produced.
    Prints a JSON summary (also in OUT/imports/).
    """
    from history import ImportRefused, ImportSummary, import_file

    total = ImportSummary()
    for path in files:
        rows = 0

        def progress(n: int, path: Path = path) -> None:
            nonlocal rows
            rows += n
            if not quiet:
                click.echo(f"{path}: {rows:,} rows", err=True)

        try:
            total.add(import_file(path, out, max_age_days=max_age_days, progress=progress))
        except ImportRefused as exc:
            raise click.ClickException(str(exc)) from exc
    summary = total.as_dict()
    summary["rows_per_s"] = round(total.rows / total.seconds) if total.seconds else None
    click.echo(json.dumps(summary, indent=2))


@log.command("export")
@click.option(
    "--brokers",
    help="Kafka bootstrap servers, host:port[,host:port] [default: $AUTHOPT_KAFKA_BOOTSTRAP]; the rest "
    "of the connection (TLS, SASL) from AUTHOPT_KAFKA_*.",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Log directory to write."
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]),
    help="Export records from this time on (UTC unless it carries an offset), not from the checkpoint.",
)
@click.option(
    "--from-beginning", is_flag=True, help="Export from the topics' first offsets, not the checkpoint."
)
@click.option(
    "--topic",
    "topics",
    type=click.Choice(["attempts", "decisions"]),
    multiple=True,
    help="Export only this topic (repeatable) [default: both].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(
    brokers: str | None,
    out: Path,
    since: datetime | None,
    from_beginning: bool,
    topics: tuple[str, ...],
    quiet: bool,
) -> None:
    """Export the attempts and decisions topics into OUT, in the layout `log import` writes.

    Each event once (by event id, also across runs over overlapping offsets); each partition up to
    the end it had when the export began, so the export stops by itself. Resumes where the last
    export stopped (OUT/exports/) unless --since or --from-beginning. Prints a JSON summary.
    """
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from history.export import TOPICS, ExportError, export_log
    from streams.kafka import KafkaSettings

    if since is not None and from_beginning:
        raise click.UsageError("--since and --from-beginning exclude each other")
    kafka = KafkaSettings(**({"bootstrap": brokers} if brokers else {}))  # type: ignore[arg-type]
    names = [t for t, kind in TOPICS.items() if not topics or kind in topics]
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        console=Console(stderr=True),
    )
    tasks: dict[str, TaskID] = {}

    def progress(topic: str, done: int, total: int) -> None:
        if topic not in tasks:
            tasks[topic] = bar.add_task(topic, total=total)
        bar.update(tasks[topic], completed=done)

    try:
        with bar:
            summary = asyncio.run(
                export_log(
                    kafka, out, topics=names, since=since, from_beginning=from_beginning, progress=progress
                )
            )
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary.as_dict(), indent=2))
