"""Servers for bench/recommend_load.py, each run in its own process.

  python -m bench.servers recommend --port P --model-dir D [--no-batching]
  python -m bench.servers echo|echo-sync --port P

`recommend` is the real authopt server (create_server) on the model directory given, with fresh
synthetic route features for the bench request's routes, so decisions come from the model; tracing
is on (SDK TracerProvider and a batch span processor whose exporter counts and discards spans, so
export I/O is not measured; OTEL_TRACES_SAMPLER picks the sampler) unless --no-sdk.
`echo` is a bare grpc.aio server whose coroutine handler returns the request bytes on the same
method path: the framework's physical limit for a message of the same size. `echo-sync` is the same
with a plain-function handler, which grpc.aio runs on a thread pool (for reference: slower).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

METHOD = "/authopt.v1.AuthorizationOptimizerService/Recommend"
ROUTES = ("acq-a", "acq-b", "acq-c", "acq-d")


class _DiscardExporter(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


async def _recommend(
    port: int,
    model_dir: Path,
    batching: bool,
    metrics_port: int,
    delay_us: int,
    sdk: bool = True,
    card: bool = False,
) -> None:
    from server import InMemoryFeatureStore, ServerSettings, create_server
    from server.app import configure_process, freeze_heap
    from streams import Entity

    if sdk:  # without: the API's non-recording spans, as `authopt serve` runs with no exporter
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_DiscardExporter(), max_queue_size=65536))
        trace.set_tracer_provider(provider)
    store = InMemoryFeatureStore()
    for i, route in enumerate(ROUTES):
        store.put(Entity.ROUTE, route, {"approval_rate_1h": 0.9 - 0.05 * i, "attempts_1h": 400.0})
    if card:  # the rows bench.online_store puts in Redis for the other variant
        from bench.online_store import CARD, card_state
        from streams.contract import Entity as E
        from streams.features import to_snapshot
        from streams.replica import Materializer

        Materializer(store).apply(
            to_snapshot(E.CARD_MERCHANT, "|".join(CARD), 0, card_state(*CARD, time.time()))
        )
    settings = ServerSettings(
        host="127.0.0.1",
        port=port,
        model_dir=model_dir,
        device="cpu",
        batch_max_rows=256 if batching else 1,
        batch_max_queue_delay_us=delay_us if batching else 0,
        idempotency_ttl_s=0,  # h2load replays one body: a cache hit would measure the cache, not a decision
        feature_max_age_s=1e9,
        metrics_port=metrics_port,
    )
    configure_process(settings)  # as `authopt serve` does
    server, _ = await create_server(settings, features=store)
    await server.start()
    freeze_heap()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _echo(port: int, sync: bool = False) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        return request

    def echo_sync(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        return request

    # grpc.aio runs a plain-function handler on a thread pool (a hand-off per call, ~1.7x slower
    # here); a coroutine handler runs on the event loop, as authopt's do: that is the framework's limit.
    handler = grpc.method_handlers_generic_handler(
        "authopt.v1.AuthorizationOptimizerService",
        {"Recommend": grpc.unary_unary_rpc_method_handler(echo_sync if sync else echo)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["recommend", "echo", "echo-sync"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--metrics-port", type=int, default=-1)
    parser.add_argument("--queue-delay-us", type=int, default=0)
    parser.add_argument("--no-sdk", action="store_true", help="no TracerProvider: non-recording spans")
    parser.add_argument(
        "--card-in-memory", action="store_true", help="the bench card's rows in the in-memory store"
    )
    args = parser.parse_args()
    time.sleep(0)  # keep imports above out of the measured window; nothing else to do here
    if args.mode in ("echo", "echo-sync"):
        asyncio.run(_echo(args.port, sync=args.mode == "echo-sync"))
    else:
        asyncio.run(
            _recommend(
                args.port,
                args.model_dir,
                not args.no_batching,
                args.metrics_port,
                args.queue_delay_us,
                sdk=not args.no_sdk,
                card=args.card_in_memory,
            )
        )


if __name__ == "__main__":
    main()
