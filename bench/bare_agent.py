"""The baseline for bench.streams_load: a Faust agent that only counts attempt records.

  AUTHOPT_KAFKA_BOOTSTRAP=... BARE_EXPECT=50000 BARE_OUT=/tmp/bare.json python -m bench.bare_agent

Same broker, same topic, same local-broker accommodations as `authopt worker`, another consumer
group. When it has seen BARE_EXPECT records it writes the wall-clock times of its first and last
record to BARE_OUT (JSON) and keeps running until stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import faust

from streams.kafka import ATTEMPTS_TOPIC
from streams.local_kafka import FAUST_SETTINGS, apply_client_patches


def main() -> None:
    apply_client_patches()
    expect = int(os.environ["BARE_EXPECT"])
    out = Path(os.environ["BARE_OUT"])
    app = faust.App(
        f"bench-bare-{os.getpid()}",
        broker=f"kafka://{os.environ['AUTHOPT_KAFKA_BOOTSTRAP']}",
        web_enabled=False,
        autodiscover=False,
        consumer_auto_offset_reset="earliest",
        datadir=str(out.parent / f"bench-bare-{os.getpid()}-data"),  # not the working directory
        **FAUST_SETTINGS,
    )
    topic = app.topic(ATTEMPTS_TOPIC, key_type=bytes, value_type=bytes, value_serializer="raw")
    seen = {"n": 0, "first": 0.0}

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for _ in stream:
            seen["n"] += 1
            if seen["n"] == 1:
                seen["first"] = time.time()
            if seen["n"] == expect:
                out.write_text(json.dumps({"first": seen["first"], "last": time.time(), "n": expect}))

    app.main()


if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    main()
