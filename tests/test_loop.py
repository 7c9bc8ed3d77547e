"""The whole learning loop through real components: a served model with a challenger in the shadow
→ `authopt log export` from the local broker → `authopt train --log` → `authopt evaluate --log` →
`authopt model promote` → the running server hot-reloads the promoted version. The commands run as
separate processes, the server and the broker as the real ones; bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from authopt.samples import sample_attempt
from authopt.v1 import attempt_pb2, optimizer_pb2
from model import make_tiny_artifact
from streams.broker import LocalBroker, start_broker
from streams.kafka import KafkaSettings
from tests.conftest import ROUTES, ServerFactory, make_request

pytestmark = pytest.mark.slow

APPROVAL = {"acq-a": 0.85, "acq-b": 0.45, "acq-c": 0.6}  # what each route approves, in this test's world
PAYMENTS = 900


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with start_broker() as b:
        yield b


def authopt(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the `authopt` command line as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "AUTHOPT_KAFKA_BOOTSTRAP": ""},
        cwd=Path(__file__).resolve().parents[1],
    )


async def test_the_loop_from_serving_to_a_promoted_model_the_server_reloads(
    start_server: ServerFactory, broker: LocalBroker, tmp_path: Path
) -> None:
    models, shadow = tmp_path / "models", tmp_path / "shadow"
    make_tiny_artifact(models, "a", seed=1)
    make_tiny_artifact(shadow, "b", seed=2)
    srv = await start_server(
        kafka=KafkaSettings.for_bootstrap(broker.bootstrap),
        model_dir=models,
        shadow_model_dir=shadow,
        exploration_rate=0.4,  # an exploring champion: every route gets traffic, propensities known
        model_poll_interval_s=0.2,
    )
    # Payments over the last two days (the log must span a day: train --log refuses less), each
    # decided by the server and its first attempt's outcome reported on the route it ranked first.
    rng = random.Random(7)
    start = time.time() - 2 * 86_400
    outcomes = []
    for i in range(PAYMENTS):
        card = attempt_pb2.Card()
        card.CopyFrom(sample_attempt().card)
        card.fingerprint = f"fp-{i % 300}"
        resp = await srv.stub.Recommend(make_request(f"pay-{i}", card=card), timeout=10)
        route = resp.routes[0].route_id
        approved = rng.random() < APPROVAL[route]
        at = Timestamp()
        at.FromMicroseconds(int((start + i * (2 * 86_400 - 600) / PAYMENTS) * 1e6))
        outcomes.append(
            attempt_pb2.AttemptOutcome(
                event_id=f"pay-{i}:1",
                request_id=f"pay-{i}",
                attempt=make_request(f"pay-{i}", card=card).attempt,
                route_id=route,
                status=attempt_pb2.OUTCOME_STATUS_APPROVED
                if approved
                else attempt_pb2.OUTCOME_STATUS_DECLINED,
                response_code="" if approved else "51",
                latency_ms=300,
                attempted_at=at,
            )
        )
    for k in range(0, PAYMENTS, 100):
        reply = await srv.stub.ReportOutcomes(
            optimizer_pb2.ReportOutcomesRequest(outcomes=outcomes[k : k + 100]), timeout=15
        )
        assert reply.accepted == len(outcomes[k : k + 100])
    await asyncio.sleep(1.0)  # the decision log's background task publishes what is queued

    log_dir, ope_dir = tmp_path / "log", tmp_path / "ope"
    routes = json.dumps([{"id": r, "cost_bps": bps, "fixed_fee_minor": fee} for r, bps, fee in ROUTES])
    exported = await asyncio.to_thread(
        authopt, "log", "export", "--brokers", broker.bootstrap, "--out", str(log_dir), "--quiet"
    )
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert [t["written"] for t in summary["topics"]] == [PAYMENTS, PAYMENTS]  # every attempt and decision
    trained = await asyncio.to_thread(
        authopt, "train", "--log", str(log_dir), "--routes", routes, "--out", str(tmp_path / "candidates"),
        "--version", "c", "--epochs", "3", "--hidden", "16", "--members", "1", "--min-route-attempts", "30",
        "--quiet",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    info = json.loads((tmp_path / "candidates" / "c" / "manifest.json").read_text())["data_summary"]
    assert "a served model's own routing (a)" in info["onpolicy"]  # the decisions say whose traffic it is
    assert info["selection"]["logged_decisions"] > 0  # fitted off-policy on the hold-out's decisions ...
    # ... of which this log has about the fitting minimum (history.train.MIN_DECISIONS): a tiny net's
    # choices put it just below in most runs, above in some (seen once in CI); either is handled.
    assert info["selection"]["applied"] or "too few to fit" in info["skipped"]["selection_correction"]
    evaluated = await asyncio.to_thread(
        authopt, "evaluate", "--log", str(log_dir), "--model", str(tmp_path / "candidates" / "c"),
        "--champion", str(models / "a"), "--routes", routes, "--out", str(ope_dir),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    doc = json.loads((ope_dir / "ope.json").read_text())
    assert doc["decisions"] > 0 and doc["policies"]["candidate"]["rows_weighted"] == doc["decisions"]
    assert doc["join"]["pairs"] == PAYMENTS and doc["join"]["unanswered"] == 0
    # the exported decisions hold the shadow's: the champion's and the challenger's versions
    from history.store import read_decisions

    logged = list(read_decisions(log_dir))
    assert {d.response.model_version for d in logged} == {"a"}
    assert {d.shadow.model_version for d in logged if d.HasField("shadow")} == {"b"}

    promoted = await asyncio.to_thread(
        authopt, "model", "promote", str(tmp_path / "candidates" / "c"), "--models", str(models), "--log",
        str(log_dir), "--routes", routes, "--force", "--reason", "loop test: a tiny log shows no sure gain",
    )  # fmt: skip
    assert promoted.returncode == 0, promoted.stderr
    assert "uplift" in promoted.stdout and "calibration" in promoted.stdout  # the gate's figures, recorded
    assert (models / "CURRENT").read_text().strip() == "c"
    async with asyncio.timeout(15):  # the running server follows the pointer
        while srv.server.registry.current is None or srv.server.registry.current.version != "c":
            await asyncio.sleep(0.1)
    resp = await srv.stub.Recommend(make_request("after-promotion"), timeout=10)
    assert resp.model_version == "c"
    listed = await asyncio.to_thread(authopt, "model", "list", "--models", str(models), "--json")
    doc = json.loads(listed.stdout)
    assert doc["served"] == "c"
    (entry,) = [v for v in doc["versions"] if v["version"] == "c"]
    gate = entry["promotion"]["gate"]
    assert gate["conditions"]  # the gate ran, and its figures are recorded with the promotion
    # --force promotes either way; it is recorded as forced only where the gate failed
    assert entry["promotion"]["action"] == ("promote" if gate["passed"] else "force")
