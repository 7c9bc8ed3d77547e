"""Throughput of `authopt log export` (history.export) from the local broker, events per second.

Starts the local broker (Tansu, 127.0.0.1), publishes `--events` attempt events of the default world's
logging policy on `authopt.attempts.v1` (the records the server publishes), then exports them into a
fresh log directory and prints the events per second (median of `--repeat` runs, each into a new
directory; the broker and its records stay). The issue's target is 50,000 events/s on this 2-core
machine.

    python -m bench.log_export [--events 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

from history.export import export_log
from sim import World, load_world
from sim.emit import emit_log
from streams.broker import start_broker
from streams.kafka import ATTEMPTS_TOPIC, KafkaSettings
from streams.replay import iter_records


def world_records(events: int) -> list[bytes]:
    """At least `events` serialized AttemptEvents of the default world (its first `events`)."""
    config = load_world("default")
    hours = events / (config.traffic.payments_per_hour * 1.25) + 1
    config = config.model_copy(update={"traffic": config.traffic.model_copy(update={"hours": hours})})
    world = World(config, 1)
    buffer = io.BytesIO()
    emit_log(world, buffer, payments=world.payments(), seed=1)
    records = list(iter_records(buffer.getvalue()))
    if len(records) < events:
        raise SystemExit(f"the world gave {len(records):,} events, fewer than {events:,}")
    return records[:events]


async def publish(bootstrap: str, records: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for start in range(0, len(records), 10_000):
            await asyncio.gather(
                *[await producer.send(ATTEMPTS_TOPIC, r) for r in records[start : start + 10_000]]
            )
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    records = world_records(args.events)
    with start_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        asyncio.run(publish(broker.bootstrap, records))
        print(f"published {len(records):,} events in {time.perf_counter() - t0:.1f} s")
        kafka = KafkaSettings.for_bootstrap(broker.bootstrap)
        rates = []
        for k in range(args.repeat):
            summary = asyncio.run(export_log(kafka, Path(tmp) / f"log-{k}", topics=[ATTEMPTS_TOPIC]))
            topic = summary.topics[0]
            rate = topic.read / summary.seconds
            rates.append(rate)
            print(
                f"run {k + 1}: {topic.read:,} read, {topic.written:,} written, {topic.invalid} invalid "
                f"in {summary.seconds:.2f} s: {rate:,.0f} events/s"
            )
    print(f"median: {statistics.median(rates):,.0f} events/s (target 50,000)")


if __name__ == "__main__":
    main()
