"""A served model's traffic as its platform would export it: what `authopt world served` writes.

The model decides every payment of a world through the server's decision code (`sim.policies.
Authopt`: feature lookup, ranking, ε-greedy exploration, network rules, retry advice), and the
play is written in `authopt log export`'s layout: the attempts under `OUT/attempts/` and, under
`OUT/decisions/`, each first attempt's decision record as the server publishes it to
`authopt.decisions.v1` (`server.decision_log.decision_record`: the request, the ranked response,
the exploration rate and every route's first-position propensity). The world's attempts carry their
payment's id as request id; here it is prefixed with the world's seed (`s<seed>-pay-N`, so a served
log beside another world's history never shares an id with it), and each record is filed under the
same id, which is how an outcome joins its decision (`streams.decisions.join_decisions`).

This is the log a platform has after serving a model for a while: `authopt train --log` reads its
decisions as a served model's own routing (the on-policy refit and the selection correction).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from authopt.v1 import events_pb2, optimizer_pb2
from history.store import DayWriter, decision_id
from server.decision_log import decision_record
from server.models import LoadedModel
from sim.play import AttemptView, play
from sim.policies import Authopt
from sim.world import Payment, World
from streams.replay import iter_records

__all__ = ["ServedLog", "served_log"]


@dataclass(frozen=True)
class ServedLog:
    attempts: int
    decisions: int
    payments: int
    first_attempt_approval: float
    days: list[str]


def served_log(
    world: World,
    model: LoadedModel,
    out: Path,
    *,
    payments: Sequence[Payment] | None = None,
    exploration: float = 0.1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ServedLog:
    """Play `model` on the world's payments and write its attempts and decisions under `out`
    (source name `served-<world>-<seed>-<model version>`; a rerun replaces what it wrote)."""
    pays = list(world.payments() if payments is None else payments)
    policy = Authopt(model, exploration_rate=exploration, seed=seed)
    source = f"served-{world.config.name}-{world.seed}-{model.version}"
    decisions = DayWriter(out, source, "decisions")
    prefix = f"s{world.seed}-"
    count = 0

    def keep(
        view: AttemptView, req: optimizer_pb2.RecommendRequest, resp: optimizer_pb2.RecommendResponse
    ) -> None:
        nonlocal count
        record = decision_record(req, resp, view.now, producer="sim", exploration_rate=exploration)
        record.request.request_id = f"{prefix}pay-{view.payment.index}"
        decisions.add(decision_id(record), record.decided_at.ToMicroseconds(), record.SerializeToString())
        count += 1

    policy.on_response = keep
    buffer = io.BytesIO()
    try:
        result = play(world, policy, payments=pays, log=buffer, progress=progress)
        attempts = DayWriter(out, source, "attempts")
        n = 0
        for raw in iter_records(buffer.getvalue()):
            event = events_pb2.AttemptEvent.FromString(raw)
            event.outcome.request_id = prefix + event.outcome.request_id
            attempts.add(
                event.outcome.event_id, event.outcome.attempted_at.ToMicroseconds(), event.SerializeToString()
            )
            n += 1
    except BaseException:
        decisions.abort()
        raise
    days = sorted(attempts.commit() | decisions.commit())
    approval = sum(result.first_approved) / max(1, len(pays))
    return ServedLog(n, count, len(pays), approval, days)
