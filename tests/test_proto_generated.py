"""The committed authopt/v1 gencode must match what scripts/gen_proto.py produces from proto/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "authopt" / "v1").iterdir())
    committed = ROOT / "authopt" / "v1"
    for rel in fresh:
        assert (ROOT / rel).read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run `python scripts/gen_proto.py` and commit the result"
        )
    stray = {p.name for p in committed.glob("*_pb2*")} - {p.name for p in fresh}
    assert not stray, f"generated files without a proto: {stray}"


def test_api_has_no_field_for_a_card_number() -> None:
    assert importlib.util.find_spec("authopt.v1.attempt_pb2") is not None
    from authopt.v1 import attempt_pb2

    names = {f.name for f in attempt_pb2.Card.DESCRIPTOR.fields}
    assert names == {"bin", "last4", "network", "funding", "issuer_country", "network_token", "fingerprint"}
