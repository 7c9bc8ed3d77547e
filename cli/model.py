"""`authopt model`: which version the server serves — promote through the gate, roll back, list."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import click

from cli.train import ROUTES_OPTION, log_option

__all__ = ["model"]


@click.group()
def model() -> None:
    """The served model: promote a candidate through the off-policy gate, roll back, list versions."""


_MODELS = click.option(
    "--models",
    "models",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The model directory the server serves from (AUTHOPT_SERVER_MODEL_DIR).",
)


@model.command("promote")
@click.argument("candidate")
@_MODELS
@log_option("The log to evaluate on (decisions with propensities); required unless --force.")
@ROUTES_OPTION
@click.option(
    "--metric",
    type=click.Choice(["approval", "net_revenue"]),
    default="approval",
    show_default=True,
    help="The metric the candidate must improve.",
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Evaluate on decisions from this time (UTC) [default: the candidate's hold-out, else all].",
)
@click.option("--out", type=click.Path(path_type=Path), help="Also write the evaluation report here.")
@click.option("--force", is_flag=True, help="Promote even if the gate fails (needs --reason; recorded).")
@click.option("--reason", default="", help="Why the gate is overridden (with --force).")
def promote(
    candidate: str,
    models: Path,
    log_dir: Path | None,
    routes: str | None,
    metric: str,
    since: datetime | None,
    out: Path | None,
    force: bool,
    reason: str,
) -> None:
    """Serve CANDIDATE (a version in --models, or a version directory elsewhere, copied in) if the
    gate passes on --log: DR lower bound of its uplift over the served model > 0 on --metric, ECE <=
    0.02, no network-rule violation in its replayed retry advice. Otherwise print which condition
    failed and by how much, and change nothing (exit 1). The server follows the pointer
    (MODELS/CURRENT) at its next poll."""
    from cli.train import _route_config
    from history.errors import HistoryError
    from history.offline import evaluate_log, write_report
    from history.promotion import GateResult, gate, move_pointer, served_version
    from server.models import POINTER_FILE

    if force and not reason.strip():
        raise click.UsageError("--force needs --reason (it is recorded in the model directory's history)")
    if log_dir is None and not force:
        raise click.UsageError("--log is required: the gate evaluates the candidate on a log (or --force)")
    pinned = (models / POINTER_FILE).exists()
    champion = served_version(models)
    if not pinned and champion is not None and Path(candidate).name != champion:
        # Without a pointer the server serves the newest version: a candidate copied in would go
        # live at once. Pin what serves now first.
        move_pointer(models, champion, action="pin", reason="pinned before a candidate was brought in")
        pinned = True
    version = _bring_in(Path(candidate), models)
    if champion == version:
        if pinned:
            raise click.ClickException(f"{version} is already the served version")
        champion = None  # the newest serves without a pointer: promoting it pins it
    result: GateResult | None = None
    try:
        if log_dir is not None:
            doc = evaluate_log(
                log_dir,
                _route_config(routes),
                models / version,
                champion_dir=models / champion if champion else None,
                since=since.replace(tzinfo=UTC) if since is not None else None,
                progress=lambda done, total: click.echo(f"replaying the log: {done:,} / {total:,}", err=True),
            )
            if out is not None:
                write_report(doc, out)
            result = gate(doc, metric=metric)
            for c in result.conditions:
                click.echo(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}")
        if result is not None and not result.passed and not force:
            raise click.ClickException(
                f"{version} not promoted; the gate failed: " + "; ".join(result.failures())
            )
        entry = move_pointer(
            models,
            version,
            action="force" if force and (result is None or not result.passed) else "promote",
            gate_result=result,
            reason=reason,
        )
    except HistoryError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{models / 'CURRENT'} -> {version} (was {entry['previous'] or 'none'})")


def _bring_in(candidate: Path, models: Path) -> str:
    """The candidate's version name in `models`, copying a version directory from elsewhere in."""
    if candidate.parent == models or (not candidate.exists() and (models / candidate.name).exists()):
        return candidate.name
    if not (candidate / "manifest.json").is_file():
        raise click.ClickException(f"{candidate}: not a model version (no manifest.json)")
    target = models / candidate.name
    if target.exists():
        raise click.ClickException(f"{target} exists already; promote it by name ({candidate.name})")
    models.mkdir(parents=True, exist_ok=True)
    tmp = models / f".{candidate.name}.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(candidate, tmp)
    tmp.rename(target)
    return candidate.name


@model.command("rollback")
@_MODELS
def rollback_(models: Path) -> None:
    """Serve the version that was served before the current one (recorded in the history)."""
    from history.promotion import PromotionError, rollback

    try:
        entry = rollback(models)
    except PromotionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{models / 'CURRENT'} -> {entry['version']} (was {entry['previous']})")


@model.command("list")
@_MODELS
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(models: Path, as_json: bool) -> None:
    """Versions in --models, the served one marked *, with when and by which gate figures each was
    last promoted."""
    from history.promotion import list_versions, served_version

    versions = list_versions(models)
    served = served_version(models)
    if as_json:
        click.echo(json.dumps({"served": served, "versions": versions}, indent=2))
        return
    if not versions:
        click.echo(f"no model versions under {models}")
        return
    for v in versions:
        mark = "*" if v["version"] == served else " "
        p = v["promotion"]
        how = "never promoted"
        if p is not None:
            how = f"{p['action']}d {p['at']}"
            if p["gate"]:
                figures = ", ".join(f"{c['name']} {c['measured']:.4g}" for c in p["gate"]["conditions"])
                how += f" (gate {'passed' if p['gate']['passed'] else 'FAILED'}: {figures})"
            if p["reason"]:
                how += f"; reason: {p['reason']}"
        click.echo(f"{mark} {v['version']}  created {v['created_at']}  {how}")
