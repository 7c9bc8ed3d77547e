"""The chaos suite's long run: every scenario of tests/chaos/ with durations x5, plus the 10-minute
soak, then the table docs/reliability.md shows.

  python -m bench.chaos [--out rows.jsonl] [-k EXPR]

Runs `pytest tests/chaos` with AUTHOPT_CHAOS_LONG=1 and AUTHOPT_CHAOS_REPORT (each scenario appends
its measured row), and prints one Markdown table: scenario, load, payments answered / total,
outcomes produced / folded, errors by code, p99 before / during / after. Real processes on
127.0.0.1 only; about 20 minutes on a 2-core machine; never fails on a timing (a scenario that
fails its assertions is shown as failed, its row still printed when it got that far).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cell(v: object) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()) or "0"
    if isinstance(v, list):
        return " / ".join("-" if x is None else str(x) for x in v)
    return str(v)


def table(rows: list[dict[str, object]]) -> str:
    head = (
        "| scenario | load | requests answered / made | outcomes produced / folded | errors "
        "| p99 ms before / during / after | more |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    core = {
        "scenario",
        "load",
        "payments",
        "answered",
        "errors",
        "outcomes_produced",
        "outcomes_folded",
        "p99_ms",
    }
    for r in rows:
        answered = r.get("answered", 0)
        errors = r.get("errors", {})
        asked = int(answered) + sum(errors.values()) if isinstance(errors, dict) else answered  # type: ignore[call-overload]
        more = "; ".join(f"{k}: {_cell(v)}" for k, v in r.items() if k not in core)
        lines.append(
            f"| {r['scenario']} | {r.get('load', '')} | {answered} / {asked} | "
            f"{r.get('outcomes_produced', '-')} / {r.get('outcomes_folded', '-')} | {_cell(errors)} | "
            f"{_cell(r.get('p99_ms', []))} | {more} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the rows here (JSON lines)")
    parser.add_argument("-k", default=None, help="only the scenarios matching this pytest -k expression")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp()) / "chaos.jsonl"
    out.unlink(missing_ok=True)
    env = {**os.environ, "AUTHOPT_CHAOS_LONG": "1", "AUTHOPT_CHAOS_REPORT": str(out)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "tests/chaos"]
    if args.k:
        cmd += ["-k", args.k]
    rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print(table(rows))
    print(f"\n(pytest exit status {rc}; rows in {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
