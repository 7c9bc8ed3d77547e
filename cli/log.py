"""`authopt log`: a platform's own history in and out (`authopt log import`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["log"]


@click.group()
def log() -> None:
    """The platform's history: import its authorization logs (docs/history.md)."""


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
