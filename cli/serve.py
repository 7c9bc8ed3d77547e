"""`authopt serve` (the decision server) and `authopt recommend` (one call to it)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click
import grpc
from google.protobuf import json_format

from authopt.v1 import optimizer_pb2

__all__ = ["recommend", "serve"]


@click.command()
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
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    help="Server processes on one port (SO_REUSEPORT), each its own event loop; with more than 1 set "
    "AUTHOPT_SERVER_ONLINE_STORE too [env AUTHOPT_SERVER_PROCESSES, default 1].",
)
def serve(
    host: str | None,
    port: int | None,
    model_dir: Path | None,
    device: str | None,
    metrics_port: int | None,
    no_model: bool,
    processes: int | None,
) -> None:
    """Run the gRPC decision server until SIGTERM/SIGINT (then drain).

    Settings come from AUTHOPT_SERVER_* and AUTHOPT_KAFKA_* environment variables (see README);
    options override them.
    Without a model directory it serves the bundled default model (model/artifacts, trained by
    `authopt train --world default`); with --no-model every decision comes from the fallback policy.
    """
    from cli.otel import configure_tracing
    from server import ServerSettings
    from server import serve as run_server
    from streams.kafka import KafkaSettings

    overrides = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "model_dir": model_dir,
            "device": device,
            "metrics_port": metrics_port,
            "processes": processes,
        }.items()
        if v is not None
    }
    # The environment is read here, once: AUTHOPT_SERVER_* and the Kafka settings every process shares.
    settings = ServerSettings(kafka=KafkaSettings(), **overrides)  # type: ignore[arg-type,call-arg]
    if settings.model_dir is None and not no_model:
        from model.artifacts import DEFAULT_MODEL_DIR

        settings = settings.model_copy(update={"model_dir": DEFAULT_MODEL_DIR})
        logging.getLogger("authopt").info(
            "no model directory configured: serving the bundled model in %s", DEFAULT_MODEL_DIR
        )
    if settings.processes > 1:  # a supervisor of N `authopt serve` processes (server/processes.py)
        from server.processes import run_processes

        sys.exit(run_processes(settings, no_model=no_model))
    provider = configure_tracing("authopt-server")
    try:
        asyncio.run(run_server(settings))
    finally:
        if provider is not None:
            provider.shutdown()


@click.command()
@click.argument("request_json", required=False)
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="Server address host:port.")
@click.option("--timeout", "timeout_s", type=float, default=2.0, show_default=True, help="Deadline, seconds.")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    envvar="AUTHOPT_CLIENT_TOKEN_FILE",
    help="A file holding the bearer token to send (a server with AUTHOPT_SERVER_AUTH_TOKENS_FILE).",
)
@click.option(
    "--tls/--no-tls",
    default=None,
    help="Speak TLS to the server (default: when any of --ca-file, --cert-file, --key-file is given).",
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    envvar="AUTHOPT_CLIENT_CA_FILE",
    help="PEM CA bundle that vouches for the server's certificate (default: the system's roots).",
)
@click.option(
    "--cert-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    envvar="AUTHOPT_CLIENT_CERT_FILE",
    help="PEM client certificate chain, for a server that requires one (mutual TLS).",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    envvar="AUTHOPT_CLIENT_KEY_FILE",
    help="PEM private key of --cert-file.",
)
def recommend(
    request_json: str | None,
    target: str,
    timeout_s: float,
    token_file: Path | None,
    tls: bool | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> None:
    """Ask a server for a decision and print it as JSON.

    REQUEST_JSON is a RecommendRequest in protobuf JSON form (e.g. '{"attempt": {...}}'); '-' or no
    argument reads it from standard input. A request id is generated when none is given.
    """
    text = sys.stdin.read() if request_json in (None, "-") else request_json
    try:
        req = json_format.Parse(text or "{}", optimizer_pb2.RecommendRequest())
    except json_format.ParseError as exc:
        raise click.BadParameter(f"not a RecommendRequest: {exc}", param_hint="REQUEST_JSON") from exc
    from authopt.client import Client, tls_credentials
    from server.errors import error_info

    token = token_file.read_text().strip() if token_file is not None else None
    credentials = None
    if tls or (tls is None and (ca_file or cert_file or key_file)):
        try:
            credentials = tls_credentials(ca_file, cert_file, key_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ca-file/--cert-file/--key-file") from exc
    with Client(target, credentials=credentials, token=token) as client:
        try:
            resp = client.recommend(req, timeout_s=timeout_s)
        except grpc.RpcError as err:
            info = error_info(err)
            reason = f" [{info.reason}{' ' + info.metadata.get('field', '') if info else ''}]" if info else ""
            click.echo(f"error: {err.code().name}{reason}: {err.details()}", err=True)  # type: ignore[attr-defined]
            sys.exit(1)
    click.echo(json_format.MessageToJson(resp, preserving_proto_field_name=True))
