"""Docs stay true to the code: the README's configuration reference is generated from the settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_doc.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out in (ROOT / "README.md").read_text(), (
        "README is stale: run python scripts/settings_doc.py --write"
    )


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n\n")[1]
    assert "scripts/setup" in head and "scripts/test" in head
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
