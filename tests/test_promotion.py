"""The promotion gate and the served pointer: `authopt model promote / rollback / list`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.main import main
from history.promotion import (
    HISTORY_FILE,
    PromotionError,
    gate,
    history,
    move_pointer,
    rollback,
    served_version,
)
from model import make_tiny_artifact


def _doc(
    *, low: float = 0.004, ece: float = 0.01, violations: int = 0, champion: bool = True
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "calibration": {"candidate": {"ece": ece, "rows": 1000}},
        "rules": {
            "candidate": {"violations": violations, "retries_advised": 40, "declines": 90, "examples": []}
        },
    }
    if champion:
        doc["uplift"] = {
            "approval": {"value": low + 0.002, "low": low, "high": low + 0.004},
            "net_revenue": {"value": 5.0, "low": -1.0, "high": 11.0},
        }
    return doc


def test_the_gate_passes_only_when_all_three_conditions_hold() -> None:
    assert gate(_doc()).passed
    assert gate(_doc(champion=False)).passed  # nothing served yet: nothing to beat
    refused = gate(_doc(low=-0.001, ece=0.031, violations=2))
    assert not refused.passed
    assert [c.name for c in refused.conditions if not c.passed] == ["uplift", "calibration", "network_rules"]
    failures = " | ".join(refused.failures())
    assert "the lower bound is -0.100 pp, not above 0" in failures  # which condition, and by how much
    assert "0.0110 above 0.02" in failures and "2 violations in 40 advised retries" in failures
    assert not gate(_doc(), metric="net_revenue").passed  # its interval reaches below 0
    assert math.isnan(gate(_doc(champion=False)).conditions[0].measured)


def test_pointer_moves_are_atomic_recorded_and_roll_back(tmp_path: Path) -> None:
    for v in ("a", "b", "c"):
        make_tiny_artifact(tmp_path, v)
    assert served_version(tmp_path) == "c"  # no pointer: the newest, as the server does
    move_pointer(tmp_path, "a", action="promote", gate_result=gate(_doc(champion=False)))
    move_pointer(tmp_path, "b", action="promote", gate_result=gate(_doc()))
    move_pointer(tmp_path, "c", action="force", reason="incident hotfix")
    assert served_version(tmp_path) == "c" and (tmp_path / "CURRENT").read_text() == "c\n"
    assert [h["action"] for h in history(tmp_path)] == ["promote", "promote", "force"]
    assert history(tmp_path)[-1]["reason"] == "incident hotfix" and history(tmp_path)[-1]["previous"] == "b"
    assert rollback(tmp_path)["version"] == "b"
    assert rollback(tmp_path)["version"] == "a"
    # before the first promotion the server served the newest version, c: that is a's "previous"
    assert history(tmp_path)[0]["previous"] == "c" and rollback(tmp_path)["version"] == "c"
    with pytest.raises(PromotionError, match="not a complete model version"):
        move_pointer(tmp_path, "missing", action="promote")
    assert not list(tmp_path.glob(".CURRENT*"))  # no temporary left behind


def test_cli_promote_needs_a_log_or_a_forced_reason_and_lists_versions(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for v in ("v1", "v2"):
        make_tiny_artifact(models, v)
    runner = CliRunner()
    no_log = runner.invoke(main, ["model", "promote", "v1", "--models", str(models)])
    assert no_log.exit_code == 2 and "--log is required" in no_log.output
    no_reason = runner.invoke(main, ["model", "promote", "v1", "--models", str(models), "--force"])
    assert no_reason.exit_code == 2 and "--force needs --reason" in no_reason.output
    forced = runner.invoke(
        main, ["model", "promote", "v1", "--models", str(models), "--force", "--reason", "bootstrap"]
    )
    assert forced.exit_code == 0, forced.output
    assert served_version(models) == "v1"
    listed = runner.invoke(main, ["model", "list", "--models", str(models)])
    assert listed.exit_code == 0
    assert "* v1" in listed.output and "forced" in listed.output and "reason: bootstrap" in listed.output
    assert "  v2" in listed.output and "never promoted" in listed.output
    doc = json.loads(runner.invoke(main, ["model", "list", "--models", str(models), "--json"]).output)
    assert doc["served"] == "v1"
    again = runner.invoke(
        main, ["model", "promote", "v1", "--models", str(models), "--force", "--reason", "x"]
    )
    assert again.exit_code == 1 and "already the served version" in again.output
    # without a pointer the newest (v2) served: it was pinned before v1 moved the pointer
    assert [json.loads(line)["action"] for line in (models / HISTORY_FILE).read_text().splitlines()] == [
        "pin",
        "force",
    ]
    back = runner.invoke(main, ["model", "rollback", "--models", str(models)])
    assert back.exit_code == 0 and served_version(models) == "v2"  # served (the newest) before v1's promotion
    fresh = tmp_path / "fresh"
    make_tiny_artifact(fresh, "only")
    move_pointer(fresh, "only", action="promote")  # the newest, promoted: nothing was served before it
    nothing = runner.invoke(main, ["model", "rollback", "--models", str(fresh)])
    assert nothing.exit_code == 1 and "nothing to roll back to" in nothing.output
