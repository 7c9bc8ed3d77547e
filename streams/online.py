"""The online store: per-card feature rows in a shared Redis / Valkey, out of every server's memory.

Entities split by cardinality (docs/streams.md, "Sizing"): the small, hot aggregates (route, route x
issuer, route x BIN, issuer, merchant: thousands of keys) stay replicated in each server's memory;
card x merchant — one key per card and merchant, millions — lives here, written by the worker as it
folds and read by the servers, one multi-get per event-loop turn of decisions.

One Redis key per card x merchant, `<prefix>cm:<fingerprint>|<merchant>`, holds a JSON row: the
contract hash it was computed under (`h`), its as-of event time (`t`), its card x merchant feature
values (`v`) and the card x merchant x amount attempt counts of its last 30 days (`a`, by amount
key), so one read gives both rows a decision needs. It expires `ttl_s` after its last write (31 days
by default: past that every window it feeds is empty). Writes are whole rows, so a redelivered
batch writes the same value again (idempotent), and the compacted features topic stays the source
of truth: `authopt features rebuild-store` writes every card's row from it.

Through aiocache's Redis backend (redis-py's asyncio client underneath): its multi_get is one MGET
and its multi_set with a TTL one MULTI/EXEC pipeline, which is the one round trip per batch this
needs; TLS (`rediss://`) and passwords are passed through to redis-py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from streams.contract import CONTRACT_HASH, Entity
from streams.errors import StreamsError
from streams.features import EntityState, card_amount_rows, evaluate
from streams.store import FeatureRow

__all__ = [
    "DEFAULT_TTL_S",
    "CardCache",
    "CardRows",
    "OnlineCards",
    "OnlineStore",
    "OnlineStoreError",
    "RebuildReport",
    "card_value",
    "parse_url",
    "rebuild",
]

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 31 * 86400
_DEFAULT_PREFIX = "authopt:"


class OnlineStoreError(StreamsError, ValueError):
    """A store URL or setting that cannot be used."""


@dataclass(frozen=True, slots=True)
class CardRows:
    """A card x merchant's row and its rows by amount key, as the store holds them."""

    card: FeatureRow
    amounts: Mapping[str, float]  # amount key -> attempts_30d

    def amount_row(self, amount_key: str) -> FeatureRow | None:
        n = self.amounts.get(amount_key)
        return None if n is None else FeatureRow({"attempts_30d": n}, self.card.as_of)


def card_value(state: EntityState) -> str:
    """The stored row of one card x merchant state (its one source partition: the attempts topic is
    keyed by card, so a card x merchant has one)."""
    amounts = {k: v["attempts_30d"] for k, v in card_amount_rows(state).items()}
    return json.dumps(
        {"h": CONTRACT_HASH, "t": state.as_of, "v": evaluate(Entity.CARD_MERCHANT, state), "a": amounts},
        separators=(",", ":"),
    )


def _decode(raw: Any) -> CardRows | None:
    if raw is None:
        return None
    row = json.loads(raw)
    if row.get("h") != CONTRACT_HASH:
        return None  # another contract's numbers mean something else
    return CardRows(FeatureRow(row["v"], float(row["t"])), row["a"])


def parse_url(url: str) -> dict[str, Any]:
    """aiocache RedisCache arguments from `redis://[:password@]host[:port][/db]` (`rediss://`: TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise OnlineStoreError(f"online store URL {_redact(url)!r}: the scheme must be redis:// or rediss://")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise OnlineStoreError(f"online store URL {_redact(url)!r}: the path must be a database number")
    try:
        port = parts.port or 6379
    except ValueError as e:
        raise OnlineStoreError(f"online store URL {_redact(url)!r}: {e}") from None
    return {
        "endpoint": parts.hostname or "127.0.0.1",
        "port": port,
        "db": int(db),
        "password": unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme == "rediss",
    }


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


class OnlineStore:
    """Card x merchant rows in Redis: `write` (the worker), `read` (the servers, coalesced).

    `timeout_s` bounds each round trip; a read that does not answer in time, or a store that is
    down, gives None for the keys asked (the caller decides as for an unknown card state).
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        prefix: str = _DEFAULT_PREFIX,
        ttl_s: int = DEFAULT_TTL_S,
        timeout_s: float = 0.05,
        pool_max_size: int = 16,
    ) -> None:
        from aiocache import RedisCache
        from aiocache.serializers import StringSerializer

        args = parse_url(url)
        if password is not None:
            args["password"] = password
        self.url = _redact(url)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._cache = RedisCache(
            serializer=StringSerializer(),
            namespace="",
            timeout=None,
            pool_max_size=pool_max_size,
            create_connection_timeout=max(timeout_s, 1.0),
            **args,
        )
        self._pending: dict[str, asyncio.Future[CardRows | None]] = {}
        self._flush_scheduled = False
        self._fetches: set[asyncio.Task[None]] = set()
        self.reads = 0  # MGET round trips
        self.read_failures = 0
        self.writes = 0  # rows written
        self.write_failures = 0

    def key(self, card_key: str) -> str:
        return f"{self.prefix}cm:{card_key}"

    async def write(self, states: Mapping[str, EntityState]) -> None:
        """Write the rows of these card x merchant states (by card key) in one pipelined round trip."""
        await self.write_values({k: card_value(st) for k, st in states.items()})

    async def write_values(self, values: Mapping[str, str]) -> None:
        """Write encoded rows (card key -> `card_value`) in one pipelined round trip (MULTI/EXEC)."""
        if values:
            pairs = [(self.key(k), v) for k, v in values.items()]
            await asyncio.wait_for(self._cache.multi_set(pairs, ttl=self.ttl_s), max(self.timeout_s, 5.0))
            self.writes += len(pairs)

    async def read_many(self, card_keys: Sequence[str]) -> list[CardRows | None]:
        """One MGET of these cards' rows (None: no row). Raises on a store error or timeout.

        Straight on the redis-py client aiocache holds: aiocache's own multi_get is the same MGET
        behind a timeout task, plugin hooks and a serializer call per value, which cost CPU on the
        hot path (docs/performance.md, "Online store").
        """
        keys = [self.key(k) for k in card_keys]
        raws = await asyncio.wait_for(self._cache.client.mget(keys), self.timeout_s)
        self.reads += 1
        return [_decode(r) for r in raws]

    def read(self, card_key: str) -> asyncio.Future[CardRows | None]:
        """This card's row, fetched with every other read asked in the same event-loop turn (one
        MGET). The future fails when the store does not answer within `timeout_s`."""
        fut = self._pending.get(card_key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = self._pending[card_key] = loop.create_future()
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        task = asyncio.get_running_loop().create_task(self._fetch(pending))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch(self, pending: dict[str, asyncio.Future[CardRows | None]]) -> None:
        keys = list(pending)
        try:
            rows = await self.read_many(keys)
        except Exception as e:  # a slow or absent store: the callers decide without card state
            self.read_failures += 1
            if self.read_failures == 1 or self.read_failures % 1000 == 0:
                log.warning("online store %s: read failed (%d so far): %r", self.url, self.read_failures, e)
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(OnlineStoreError(f"online store read failed: {e!r}"))
                    fut.exception()  # retrieved: a caller that gave up must not log it as lost
            return
        for key, row in zip(keys, rows, strict=True):
            fut = pending[key]
            if not fut.done():
                fut.set_result(row)

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self._cache.raw("ping"), max(self.timeout_s, 1.0))
            return True
        except Exception:
            return False

    async def close(self) -> None:
        # aiocache 0.12's close() calls redis-py's deprecated close(); aclose() is the same release
        await self._cache.client.aclose()


class CardCache:
    """A bounded LRU with a TTL in front of the online store, per server process."""

    def __init__(self, max_cards: int, ttl_s: float) -> None:
        self.max_cards = max_cards
        self.ttl_s = ttl_s
        self._rows: OrderedDict[str, tuple[float, CardRows | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, now: float | None = None) -> tuple[bool, CardRows | None]:
        """(found, row): found is False when absent or expired."""
        held = self._rows.get(key)
        if held is None or (time.monotonic() if now is None else now) - held[0] > self.ttl_s:
            self.misses += 1
            return False, None
        self._rows.move_to_end(key)
        self.hits += 1
        return True, held[1]

    def put(self, key: str, row: CardRows | None, now: float | None = None) -> None:
        if self.max_cards <= 0 or self.ttl_s <= 0:
            return
        self._rows[key] = (time.monotonic() if now is None else now, row)
        self._rows.move_to_end(key)
        while len(self._rows) > self.max_cards:
            self._rows.popitem(last=False)


class OnlineCards:
    """A server's way to card rows: the LRU in front, the coalesced store read behind, a timeout.

    `lookup` gives (known, rows): known False when the store did not answer in time or failed (the
    decision then falls back and counts the card's attempts as unknown); rows None for a card the
    store has no row for (a new card: the contract defaults, as in memory).
    """

    def __init__(self, store: OnlineStore, cache: CardCache) -> None:
        self.store = store
        self.cache = cache
        self.unknown = 0  # lookups that got no answer in time

    async def lookup(self, card_key: str, budget_s: float) -> tuple[bool, CardRows | None]:
        found, rows = self.cache.get(card_key)
        if found:
            return True, rows
        if budget_s <= 0:
            self.unknown += 1
            return False, None
        try:
            read = self.store.read(card_key)  # shared with every other lookup of this loop turn
            if budget_s >= self.store.timeout_s:  # the shared read gives up at the store's timeout
                rows = await read
            else:  # shielded: giving up early must not cancel the others' read
                rows = await asyncio.wait_for(asyncio.shield(read), budget_s)
        except (TimeoutError, OnlineStoreError):
            self.unknown += 1
            return False, None
        self.cache.put(card_key, rows)
        return True, rows

    def peek(self, card_key: str) -> tuple[bool, CardRows | None]:
        """The cached row only, no round trip (for answers that may not wait: load shedding)."""
        return self.cache.get(card_key)


@dataclass
class RebuildReport:
    """What `rebuild` read and wrote."""

    records: int = 0  # features-topic records read
    cards: int = 0  # card x merchant rows written (a key written again counts again)
    skipped: int = 0  # other contracts' snapshots, not written
    seconds: float = 0.0


async def rebuild(
    kafka: Any,
    store: OnlineStore,
    *,
    topic: str | None = None,
    chunk: int = 2000,
    progress: Any = None,
) -> RebuildReport:
    """Write every card x merchant row of the compacted features topic to `store`.

    Reads each partition from its start to the end offset seen at start (no consumer group), keeps
    the newest snapshot per card within each chunk of records and writes a chunk's rows in one
    pipelined round trip: a key seen again later is written again, so the store ends with each
    card's newest row. `progress(report)` is called after each chunk.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from authopt.v1 import events_pb2
    from streams.features import from_snapshot
    from streams.kafka import FEATURES_TOPIC

    topic = topic or FEATURES_TOPIC
    report = RebuildReport()
    started = time.monotonic()
    prefix = f"{Entity.CARD_MERCHANT.value}:".encode()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="authopt-rebuild-store",
        **kafka.client_options(),
    )
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        if not partitions:
            raise OnlineStoreError(f"topic {topic} does not exist on {kafka.bootstrap}: no worker has run")
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = {tp: end for tp, end in (await consumer.end_offsets(tps)).items() if end > 0}
        pending: dict[str, str] = {}
        while ends:
            batches = await consumer.getmany(*ends, timeout_ms=1000, max_records=chunk)
            for tp, records in batches.items():
                for record in records:
                    report.records += 1
                    if record.value and record.key is not None and record.key.startswith(prefix):
                        snap = events_pb2.FeatureSnapshot.FromString(record.value)
                        if snap.contract_hash != CONTRACT_HASH:
                            report.skipped += 1
                            continue
                        pending[snap.key] = card_value(from_snapshot(snap))
                if tp in ends and records and records[-1].offset + 1 >= ends[tp]:
                    del ends[tp]
            if len(pending) >= chunk or (pending and not ends):
                await store.write_values(pending)
                report.cards += len(pending)
                pending = {}
                if progress is not None:
                    progress(report)
    finally:
        await consumer.stop()
    report.seconds = time.monotonic() - started
    return report
