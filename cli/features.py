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
