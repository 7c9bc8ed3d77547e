"""The server-side replica: `authopt.features.v1` materialized into the process's FeatureStore.

`Materializer` merges the per-partition states of each entity (streams.features.merge) and writes
the entity's feature values into an InMemoryFeatureStore; the offline replay uses it too, which is
what makes served and replayed features the same numbers.

In a server it holds at most `max_cards` card x merchant keys (AUTHOPT_SERVER_MAX_CARDS): the least
recently updated or read card goes, rows and all, and comes back with its next snapshot; until then
a request for it is decided as for a new card. The replay keeps every card (no limit).

`FeatureReplica` runs it from Kafka: it reads every partition of the compacted topic from the
beginning without a consumer group (every replica needs every key), reports ready only once it has
caught up to the end offsets it saw at start, then follows the topic. When the broker goes away the
store keeps its last values (the server keeps deciding from them; feature age grows) and the replica
reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from authopt.v1 import events_pb2
from streams.contract import CONTRACT_HASH, Entity
from streams.errors import StreamsError
from streams.features import (
    EntityState,
    amount_key,
    card_amount_rows,
    evaluate,
    from_snapshot,
    merge,
)
from streams.kafka import FEATURES_TOPIC, KafkaSettings
from streams.store import InMemoryFeatureStore

__all__ = ["FeatureReplica", "Materializer"]

_CARD_KEY_PREFIX = f"{Entity.CARD_MERCHANT.value}:".encode()  # streams.processor.table_key

log = logging.getLogger(__name__)


class _TopicMissing(StreamsError):
    """The features topic does not exist yet (no worker has run)."""


class Materializer:
    """Applies FeatureSnapshots to a store: merge an entity's partitions, evaluate, put the row.

    Memory matters here (cards keep coming: ~1 KiB each, docs/reliability.md "Bounded memory"): card
    x merchant partials are kept as their snapshot bytes, decoded only when the card changes again,
    and with `max_cards` at most that many cards are held: beyond it the least recently updated or
    read (through the store's `get`) card is evicted with its card x merchant and card x merchant x
    amount rows. The aggregate entities (a few thousand keys, changing all the time) are kept
    decoded, all of them. `max_cards` None keeps every card (the offline replay).
    """

    def __init__(
        self,
        store: InMemoryFeatureStore,
        on_apply: Callable[[events_pb2.FeatureSnapshot], None] | None = None,
        *,
        max_cards: int | None = None,
        keep_cards: bool = True,
    ) -> None:
        if max_cards is not None and max_cards < 1:
            raise ValueError(f"max_cards must be at least 1 (None: no limit), not {max_cards}")
        self.store = store
        self._partials: dict[tuple[Entity, str], dict[int, EntityState]] = {}
        # card key -> its one partition's snapshot, or {partition: snapshot} when several; with a
        # limit, least recently updated or read first
        self._cards: OrderedDict[str, bytes | dict[int, bytes]] = OrderedDict()
        self._on_apply = on_apply
        self.max_cards = max_cards
        self.applied = 0
        self.refused_contract = 0
        self.evicted = 0  # cards evicted for the limit
        self.keep_cards = keep_cards
        self.skipped_cards = 0  # card snapshots not held (keep_cards False)
        if max_cards is not None:
            store.watch_reads(Entity.CARD_MERCHANT, self._read_card)

    @property
    def cards(self) -> int:
        """Card x merchant keys held."""
        return len(self._cards)

    def events_for(self, entity: Entity, key: str) -> int:
        """Events behind an entity's values, over every source partition (0 when unknown)."""
        if entity is Entity.CARD_MERCHANT:
            return sum(s.events for s in self._card_states(self._cards.get(key)).values())
        return sum(s.events for s in self._partials.get((entity, key), {}).values())

    def apply_bytes(self, raw: bytes) -> None:
        snap = events_pb2.FeatureSnapshot()
        snap.ParseFromString(raw)
        self._apply(snap, raw)

    def apply(self, snap: events_pb2.FeatureSnapshot) -> None:
        self._apply(snap, snap.SerializeToString())

    def _apply(self, snap: events_pb2.FeatureSnapshot, raw: bytes) -> None:
        if snap.contract_hash != CONTRACT_HASH:
            # A worker on another contract version: its numbers mean something else. Skipped and
            # counted (a rolling upgrade passes through this briefly; a steady count is an alarm).
            self.refused_contract += 1
            return
        try:
            entity = Entity(snap.entity)
        except ValueError:
            self.refused_contract += 1
            return
        if entity is Entity.CARD_MERCHANT and not self.keep_cards:
            self.skipped_cards += 1
            return
        self.applied += 1
        if entity is Entity.CARD_MERCHANT:
            self._apply_card(snap, raw)
        else:
            parts = self._partials.setdefault((entity, snap.key), {})
            parts[snap.source_partition] = from_snapshot(snap)
            merged = merge(entity, parts.values())
            self.store.put(entity, snap.key, evaluate(entity, merged), merged.as_of)
        if self._on_apply is not None:
            self._on_apply(snap)

    @staticmethod
    def _card_states(held: bytes | dict[int, bytes] | None) -> dict[int, EntityState]:
        if held is None:
            return {}
        raws = [held] if isinstance(held, bytes) else list(held.values())
        snaps = [events_pb2.FeatureSnapshot.FromString(r) for r in raws]
        return {s.source_partition: from_snapshot(s) for s in snaps}

    def _apply_card(self, snap: events_pb2.FeatureSnapshot, raw: bytes) -> None:
        key, store = snap.key, self.store
        held = self._cards.get(key)
        parts = self._card_states(held)
        before = set(card_amount_rows(merge(Entity.CARD_MERCHANT, parts.values()))) if parts else set()
        parts[snap.source_partition] = from_snapshot(snap)
        if len(parts) == 1:
            self._cards[key] = raw
        else:
            kept = {} if held is None or isinstance(held, bytes) else dict(held)
            if isinstance(held, bytes):
                kept[events_pb2.FeatureSnapshot.FromString(held).source_partition] = held
            kept[snap.source_partition] = raw
            self._cards[key] = kept
        merged = merge(Entity.CARD_MERCHANT, parts.values())
        store.put(Entity.CARD_MERCHANT, key, evaluate(Entity.CARD_MERCHANT, merged), merged.as_of)
        rows = card_amount_rows(merged)
        for amount, values in rows.items():
            store.put(Entity.CARD_MERCHANT_AMOUNT, f"{key}|{amount}", values, merged.as_of)
        for gone in before - rows.keys():
            store.delete(Entity.CARD_MERCHANT_AMOUNT, f"{key}|{gone}")
        if self.max_cards is not None:
            self._cards.move_to_end(key)
            while len(self._cards) > self.max_cards:
                self._evict_oldest()

    def _read_card(self, key: str) -> None:
        """The store found this card's row for a decision: it is the most recently used now."""
        cards = self._cards
        if key in cards:  # not when the row was put into the store directly
            cards.move_to_end(key)

    def _evict_oldest(self) -> None:
        key, held = self._cards.popitem(last=False)
        delete = self.store.delete
        delete(Entity.CARD_MERCHANT, key)
        # Its amount rows are those of its recent attempts within 30 days (card_amount_rows): deleting
        # the amount of every attempt it holds removes them all, without merging its states again
        # (that doubled the cost of a new card once the limit is reached).
        for raw in [held] if isinstance(held, bytes) else held.values():
            for r in events_pb2.FeatureSnapshot.FromString(raw).recent:
                delete(Entity.CARD_MERCHANT_AMOUNT, f"{key}|{amount_key(r.amount_minor, r.currency)}")
        self.evicted += 1


class FeatureReplica:
    """Follows `authopt.features.v1` into `store`; `ready` is set once caught up at start.

    `max_cards`: most card x merchant keys held (Materializer); None keeps every one. `keep_cards`
    False holds none (they are read from the online store, streams.online)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        store: InMemoryFeatureStore,
        *,
        topic: str = FEATURES_TOPIC,
        max_backoff_s: float = 10.0,
        probe_after_s: float = 2.0,
        max_cards: int | None = None,
        keep_cards: bool = True,
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self.materializer = Materializer(store, max_cards=max_cards, keep_cards=keep_cards)
        self.store = store
        self.ready = asyncio.Event()
        self.connected = False
        self.last_applied_at: float | None = None  # wall clock of the last snapshot applied
        self._max_backoff_s = max_backoff_s
        self._probe_after_s = probe_after_s
        self._task: asyncio.Task[None] | None = None
        self._positions: dict[int, int] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="feature-replica")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> Mapping[str, Any]:
        return {
            "ready": self.ready.is_set(),
            "connected": self.connected,
            "snapshots_applied": self.materializer.applied,
            "refused_contract": self.materializer.refused_contract,
            "rows": len(self.store),
            "cards": self.materializer.cards,
            "cards_evicted": self.materializer.evicted,
            "last_applied_at": self.last_applied_at,
        }

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except _TopicMissing:
                await asyncio.sleep(0.5)
            except Exception as exc:  # broker gone or unreachable: keep the values, retry
                self.connected = False
                log.warning(
                    "feature replica: %s unreachable (%s); serving the last values, retrying in %.1fs",
                    self._kafka.bootstrap,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
            else:
                backoff = 0.2

    async def _follow(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            client_id="authopt-feature-replica",
            **self._kafka.client_options(),
        )
        await consumer.start()
        try:
            partitions = await self._partitions(consumer)
            tps = [TopicPartition(self._topic, p) for p in partitions]
            consumer.assign(tps)
            positions = {tp: self._positions.get(tp.partition, 0) for tp in tps}
            for tp, offset in positions.items():
                consumer.seek(tp, offset)
            self.connected = True
            targets = await self._catch_up_targets(consumer, positions)
            quiet_since = time.monotonic()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                if batches:
                    self._apply(batches)
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > self._probe_after_s:
                    # aiokafka retries a lost broker forever without raising: probe it, so that
                    # `connected` tells the truth and the loop reconnects with backoff.
                    await self._probe(consumer)
                    quiet_since = time.monotonic()
                if targets:
                    for tp in list(targets):
                        if await consumer.position(tp) >= targets[tp]:
                            del targets[tp]
                    if not targets:
                        self._mark_ready()
        finally:
            self.connected = False
            await consumer.stop()

    async def _catch_up_targets(self, consumer: Any, positions: dict[Any, int]) -> dict[Any, int]:
        """End offsets to reach before the first `ready` (none once ready: a reconnect resumes)."""
        if self.ready.is_set():
            return {}
        ends = await consumer.end_offsets(list(positions))
        targets = {tp: end for tp, end in ends.items() if end > positions[tp]}
        log.info("feature replica: catching up on %d partition(s) of %s", len(positions), self._topic)
        if not targets:
            self._mark_ready()
        return targets

    def _apply(self, batches: Mapping[Any, Any]) -> None:
        apply = self.materializer.apply_bytes
        skip = None if self.materializer.keep_cards else _CARD_KEY_PREFIX
        for tp, records in batches.items():
            for record in records:
                if not record.value:  # None (a tombstone) or b"" (the worker's end marker): nothing
                    continue
                if skip is not None and record.key is not None and record.key.startswith(skip):
                    self.materializer.skipped_cards += 1  # read from the online store: not parsed
                    continue
                apply(record.value)
            self._positions[tp.partition] = records[-1].offset + 1
        self.last_applied_at = time.time()

    async def _probe(self, consumer: Any) -> None:
        try:
            ok = await asyncio.wait_for(consumer._client.force_metadata_update(), self._probe_after_s)
        except TimeoutError:
            ok = False
        if not ok:
            raise ConnectionError("no metadata answer from the broker")

    async def _partitions(self, consumer: Any) -> list[int]:
        for _ in range(20):
            parts = consumer.partitions_for_topic(self._topic)
            if parts:
                return sorted(parts)
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        # No worker has created the topic yet: there is nothing to catch up on, so the server may
        # serve (from the fallback) while we keep looking.
        if not self.ready.is_set():
            log.info(
                "feature replica: %s does not exist yet; ready with no features, still looking", self._topic
            )
        self._mark_ready()
        raise _TopicMissing(self._topic)

    def _mark_ready(self) -> None:
        if not self.ready.is_set():
            log.info(
                "feature replica: caught up (%d snapshots, %d rows)",
                self.materializer.applied,
                len(self.store),
            )
            self.ready.set()
