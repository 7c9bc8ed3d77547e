"""Shadow and A/B serving through a real server and broker: the challenger decides beside the champion
off the caller's path, both decisions reach the decision log, a slow challenger is skipped and
counted; an A/B split sends a sticky share of cards to the challenger, the arm in the log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from authopt.samples import sample_attempt
from authopt.v1 import attempt_pb2, events_pb2
from model import make_tiny_artifact
from server.settings import ServerSettings
from server.shadow import CHALLENGER, CHAMPION, arm_of
from streams.broker import LocalBroker, start_broker
from streams.kafka import DECISIONS_TOPIC, KafkaSettings
from tests.conftest import ServerFactory, make_request


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


def _models(tmp_path: Path) -> tuple[Path, Path]:
    champion, challenger = tmp_path / "champion", tmp_path / "challenger"
    make_tiny_artifact(champion, "champ-1", seed=1)
    make_tiny_artifact(challenger, "chall-1", seed=2)
    return champion, challenger


async def _decisions(bootstrap: str, n: int, timeout_s: float = 20) -> list[events_pb2.DecisionRecord]:
    consumer = AIOKafkaConsumer(
        DECISIONS_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[events_pb2.DecisionRecord] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    out.extend(events_pb2.DecisionRecord.FromString(r.value) for r in records)
    finally:
        await consumer.stop()
    return out


def _metric(srv: object, name: str, **labels: str) -> float:
    value = srv.server.metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return 0.0 if value is None else float(value)


def test_arms_are_sticky_by_fingerprint_and_split_by_share() -> None:
    cards = [f"fp-{i}" for i in range(20_000)]
    share = sum(arm_of(c, 0.25) == CHALLENGER for c in cards) / len(cards)
    assert share == pytest.approx(0.25, abs=0.015)
    assert [arm_of(c, 0.25) for c in cards[:50]] == [arm_of(c, 0.25) for c in cards[:50]]  # stable
    assert {arm_of(c, 0.0) for c in cards[:100]} == {CHAMPION} and {arm_of(c, 1.0) for c in cards[:100]} == {
        CHALLENGER
    }
    assert arm_of("", 1.0) == CHAMPION  # no fingerprint: the champion
    with pytest.raises(ValidationError, match="needs shadow_model_dir"):
        ServerSettings(ab_challenger_share=0.1)


async def test_the_challenger_decides_in_the_shadow_and_both_are_logged(
    start_server: ServerFactory, broker: LocalBroker, tmp_path: Path
) -> None:
    champion, challenger = _models(tmp_path)
    srv = await start_server(
        kafka=KafkaSettings.for_bootstrap(broker.bootstrap), model_dir=champion, shadow_model_dir=challenger
    )
    for i in range(20):
        resp = await srv.stub.Recommend(make_request(f"req-{i}"), timeout=10)
        assert resp.model_version == "champ-1"  # the caller always gets the champion's decision
    records = await _decisions(broker.bootstrap, 20)
    assert len(records) == 20
    for rec in records:
        assert rec.response.model_version == "champ-1" and rec.arm == ""
        assert rec.shadow.model_version == "chall-1" and rec.shadow.request_id == rec.request.request_id
        assert len(rec.shadow.routes) == len(rec.response.routes)
    agree = _metric(srv, "authopt_shadow_decisions_total", outcome="agree")
    disagree = _metric(srv, "authopt_shadow_decisions_total", outcome="disagree")
    assert agree + disagree == 20
    assert agree == sum(r.shadow.routes[0].route_id == r.response.routes[0].route_id for r in records)
    ev = _metric(srv, "authopt_shadow_expected_value_minor_total", model="challenger")
    assert ev == pytest.approx(sum(r.shadow.routes[0].expected_value_minor for r in records), rel=1e-6)


async def test_a_slow_challenger_is_skipped_counted_and_never_waited_on(
    start_server: ServerFactory, broker: LocalBroker, tmp_path: Path
) -> None:
    champion, challenger = _models(tmp_path)
    srv = await start_server(
        kafka=KafkaSettings.for_bootstrap(broker.bootstrap),
        model_dir=champion,
        shadow_model_dir=challenger,
        shadow_timeout_ms=1,
    )
    chall = srv.server.challenger
    assert chall is not None
    real = chall.engine.decide

    async def slow(*args: object) -> object:
        await asyncio.sleep(0.5)  # a challenger far slower than its 1 ms
        return await real(*args)  # type: ignore[arg-type]

    chall.shadow._decide = slow  # the engine is real; only its speed is changed
    t0 = time.perf_counter()
    for i in range(5):
        await srv.stub.Recommend(make_request(f"slow-{i}"), timeout=10)
    assert time.perf_counter() - t0 < 0.5  # five answers well inside one slow shadow decision
    records = await _decisions(broker.bootstrap, 5)
    assert all(not r.HasField("shadow") for r in records)
    assert _metric(srv, "authopt_shadow_decisions_total", outcome="slow") == 5


async def test_an_ab_split_decides_a_sticky_share_of_cards_by_the_challenger(
    start_server: ServerFactory, broker: LocalBroker, tmp_path: Path
) -> None:
    champion, challenger = _models(tmp_path)
    srv = await start_server(
        kafka=KafkaSettings.for_bootstrap(broker.bootstrap),
        model_dir=champion,
        shadow_model_dir=challenger,
        ab_challenger_share=0.5,
    )
    cards = [f"fp-{i}" for i in range(12)]
    answers = {}
    for i, fp in enumerate(cards * 2):  # each card twice: the same arm both times
        card = attempt_pb2.Card()
        card.CopyFrom(sample_attempt().card)
        card.fingerprint = fp
        resp = await srv.stub.Recommend(make_request(f"ab-{i}", card=card), timeout=10)
        answers.setdefault(fp, set()).add(resp.model_version)
    for fp, versions in answers.items():
        assert versions == {"chall-1" if arm_of(fp, 0.5) == CHALLENGER else "champ-1"}
    records = await _decisions(broker.bootstrap, 24)
    for rec in records:
        arm = arm_of(rec.request.attempt.card.fingerprint, 0.5)
        assert rec.arm == arm
        assert rec.response.model_version == ("chall-1" if arm == CHALLENGER else "champ-1")
        assert rec.HasField("shadow") == (arm == CHAMPION)  # the champion's requests are shadowed
    n_challenger = sum(arm_of(fp, 0.5) == CHALLENGER for fp in cards) * 2
    assert 0 < n_challenger < 24  # both arms are exercised
    assert _metric(srv, "authopt_ab_decisions_total", arm="challenger") == n_challenger
    assert _metric(srv, "authopt_ab_decisions_total", arm="champion") == 24 - n_challenger
