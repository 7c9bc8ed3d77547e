"""The promotion gate and the served pointer: `authopt model promote / rollback / list`.

A model directory holds versions (`MODELS/<version>/`, as `authopt train` exports them) and, once one
has been promoted, the **served pointer** `MODELS/CURRENT` (one line: the version's name), which the
server's registry follows (`server.models.ModelRegistry`; without it, the newest version is served).
The pointer is replaced atomically (written aside, then renamed), and only to a complete version, so
a half-written version is never loaded.

`promote` moves the pointer only when the gate passes on an off-policy evaluation of the candidate
against the champion (`history.offline.evaluate_log`):

- the lower end of the 95 % interval of the candidate's DR uplift over the champion on the chosen
  metric is above 0;
- the candidate's ECE on the logged decisions is at most 0.02;
- its retry advice, replayed on the logged declines, breaks no network rule.

Otherwise it says which condition failed and by how much, and moves nothing. `--force --reason`
promotes anyway and records the override. Without a pointer the server serves the newest version,
so before a candidate is copied into the directory the served version is pinned (action "pin").
Every move of the pointer (promotion, forced promotion, pin, rollback) is appended to
`MODELS/promotions.jsonl` with its time, the gate's figures and the reason.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from history.errors import HistoryError
from model.export import MANIFEST_FILE, MODEL_FILE
from server.models import POINTER_FILE, natural_key

__all__ = [
    "HISTORY_FILE",
    "MAX_ECE",
    "Condition",
    "GateResult",
    "PromotionError",
    "gate",
    "history",
    "list_versions",
    "move_pointer",
    "rollback",
    "served_version",
]

HISTORY_FILE = "promotions.jsonl"
MAX_ECE = 0.02


class PromotionError(HistoryError):
    """The pointer cannot move (no such version, nothing to roll back to, a refused gate)."""


@dataclass(frozen=True)
class Condition:
    name: str
    passed: bool
    measured: float
    threshold: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "measured": self.measured,
            "threshold": self.threshold,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class GateResult:
    metric: str
    conditions: list[Condition]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.conditions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "passed": self.passed,
            "conditions": [c.as_dict() for c in self.conditions],
        }

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.conditions if not c.passed]


def gate(doc: dict[str, Any], *, metric: str = "approval", max_ece: float = MAX_ECE) -> GateResult:
    """The gate's three conditions on an evaluation document of `evaluate_log` (the uplift one passes
    when there is no champion: nothing is served yet)."""

    def unit(v: float) -> str:
        return f"{100 * v:+.3f} pp" if metric == "approval" else f"{v / 100:+,.2f} per decision"

    if "uplift" in doc:
        u = doc["uplift"][metric]
        low = float(u["low"])
        uplift_ok = math.isfinite(low) and low > 0
        uplift = Condition(
            "uplift",
            uplift_ok,
            low,
            "> 0",
            f"DR uplift over the champion {unit(u['value'])}, "
            f"95 % interval [{unit(u['low'])}, {unit(u['high'])}]"
            + ("" if uplift_ok else f": the lower bound is {unit(low)}, not above 0"),
        )
    else:  # nothing serves yet: the first promotion has nothing to beat
        uplift = Condition(
            "uplift", True, math.nan, "> 0", "no served model to compare with: the first promotion"
        )
    ece = float(doc["calibration"]["candidate"]["ece"])
    ece_ok = math.isfinite(ece) and ece <= max_ece
    calibration = Condition(
        "calibration",
        ece_ok,
        ece,
        f"<= {max_ece}",
        f"ECE {ece:.4f}" + ("" if ece_ok else f", {ece - max_ece:.4f} above {max_ece}"),
    )
    check = doc["rules"]["candidate"]
    violations = int(check["violations"])
    rules = Condition(
        "network_rules",
        violations == 0,
        float(violations),
        "== 0",
        f"{violations} violations in {check['retries_advised']:,} advised retries "
        f"on {check['declines']:,} declines"
        + (f", e.g. {check['examples'][0]}" if check["examples"] else ""),
    )
    return GateResult(metric, [uplift, calibration, rules])


def _is_version(models: Path, name: str) -> bool:
    d = models / name
    return not name.startswith(".") and (d / MANIFEST_FILE).is_file() and (d / MODEL_FILE).is_file()


def served_version(models: Path) -> str | None:
    """The version the server serves: the pointer's, else the newest complete one (None: none)."""
    pointer = models / POINTER_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        return name or None
    versions = list_versions(models)
    return versions[-1]["version"] if versions else None


def history(models: Path) -> list[dict[str, Any]]:
    path = models / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def list_versions(models: Path) -> list[dict[str, Any]]:
    """Every complete version, oldest first (by creation), with when and how it was last promoted."""
    if not models.is_dir():
        return []
    last_promotion = {h["version"]: h for h in history(models) if h["action"] in ("promote", "force")}
    out = []
    for d in sorted(
        (p for p in models.iterdir() if _is_version(models, p.name)), key=lambda p: natural_key(p.name)
    ):
        manifest = json.loads((d / "manifest.json").read_text())
        out.append(
            {
                "version": d.name,
                "created_at": manifest.get("created_at"),
                "promotion": last_promotion.get(d.name),
            }
        )
    return out


def move_pointer(
    models: Path, version: str, *, action: str, gate_result: GateResult | None = None, reason: str = ""
) -> dict[str, Any]:
    """Point the server at `version` (atomically) and append the move to the history."""
    if not _is_version(models, version):
        raise PromotionError(f"{models / version} is not a complete model version (manifest.json + model.pt)")
    previous = served_version(models)
    pointer = models / POINTER_FILE
    tmp = models / f".{POINTER_FILE}.tmp-{os.getpid()}"
    tmp.write_text(version + "\n")
    os.replace(tmp, pointer)
    entry = {
        "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "action": action,
        "version": version,
        "previous": previous,
        "reason": reason,
        "gate": gate_result.as_dict() if gate_result is not None else None,
    }
    with (models / HISTORY_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def rollback(models: Path) -> dict[str, Any]:
    """Point back at the version served before the current one (the history's previous)."""
    current = served_version(models)
    for entry in reversed(history(models)):  # the promotion that made `current` the served version
        if entry["action"] in ("promote", "force") and entry["version"] == current:
            if not entry["previous"] or entry["previous"] == current:
                break
            return move_pointer(
                models, entry["previous"], action="rollback", reason=f"rolled back from {current}"
            )
    raise PromotionError(f"{models}: nothing to roll back to (no earlier served version in {HISTORY_FILE})")
