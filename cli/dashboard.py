"""What `authopt up` and `authopt simulate` show: the live dashboard, the status lines, the summary text.

Presentation only: every figure comes from `PlatformStats` — its `live()` (the last few seconds:
rates, latency, feature age) and its `summary()` (the run so far: decision shares, each policy's
approval rates, the oracle's) — or from the processes' `Stack` (`cli.up`); nothing here computes
a share or a rate of its own. The formats are those of the README's sample run and docs/up.md.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cli.up import Child, Stack, UpOptions
    from sim.platform import Platform
    from sim.platform_stats import PlatformStats

__all__ = [
    "dashboard",
    "format_platform",
    "format_summary",
    "incidents_line",
    "platform_line",
    "status_line",
]


def _pct(x: float, width: int = 0) -> str:
    """A share as a percentage: `80.4 %`; `width` pads it for a table column."""
    return f"{100 * x:{width}.1f} %"


def _ms(x: float | None) -> str:
    return "—" if x is None else (f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms")


def _errors(p: dict[str, Any]) -> int:
    """Failed Recommend calls, all reasons together, of a `PlatformStats.summary()`."""
    return sum(p["request_errors"].values())


def _world_clock(p: dict[str, Any]) -> str:
    end = p["world_clock"]["end"]
    return "—" if end is None else datetime.fromisoformat(end).strftime("%Y-%m-%d %H:%M")


# --- while it runs ------------------------------------------------------------------------------


def platform_line(stats: PlatformStats, elapsed: float) -> str:
    """One status line about the traffic (for logs)."""
    live, p = stats.live(), stats.summary()
    return (
        f"[{elapsed:5.0f}s] {live['payments_per_s']:.0f} payments/s, {live['requests_per_s']:.0f} req/s "
        f"p50 {_ms(live['latency_p50_ms'])} "
        f"p99 {_ms(live['latency_p99_ms'])} | model {_pct(p['model_share'])} "
        f"explored {_pct(p['exploration_share'])} | feature age {_ms(live['feature_age_p50_ms'])} "
        f"| first-try approval authopt {_pct(p['authopt']['first_attempt_approval'])} "
        f"static {_pct(p['static']['first_attempt_approval'])} | {p['outcomes_reported']:,} outcomes reported"
    )


def status_line(stats: PlatformStats, stack: Stack, elapsed: float) -> str:
    """One line for logs (--no-dashboard): the traffic, the worker, the processes."""
    health = stack.worker_health()

    def shown(c: Child) -> str:
        return f"{c.name} {c.status()}" + (f" ({health})" if c.name == "worker" and health else "")

    return f"{platform_line(stats, elapsed)}, {stack.events_folded():,} folded | " + " ".join(
        shown(c) for c in stack.children.values()
    )


def incidents_line(platform: Platform) -> str:
    """The world's incidents at its clock now, in words."""
    now = platform.incidents_now()
    if not now:
        return "no incident in the world now"
    return "incidents now: " + ", ".join(
        f"{i.kind} {i.id} {'outage' if i.kind == 'issuer' else 'degraded'} ({100 * i.severity:.0f} %, "
        f"until {datetime.fromtimestamp(i.end, UTC):%H:%M})"
        for i in now
    )


def dashboard(platform: Platform, stack: Stack, opts: UpOptions, elapsed: float) -> Any:
    """The rich renderable of the live dashboard."""
    from rich.columns import Columns
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    stats = platform.stats
    live, p = stats.live(), stats.summary()
    a, s = p["authopt"], p["static"]
    of = f" of {opts.duration_s:g}s" if opts.duration_s else " (Ctrl-C stops)"
    speed = opts.rate * 3600 / opts.world.traffic.payments_per_hour
    head = (
        f"[b]authopt up[/b] · world [b]{opts.world_ref}[/b] seed {opts.seed} · "
        f"{opts.rate:g} payments/s · {elapsed:.0f}s{of} · world clock {_world_clock(p)} "
        f"({speed:,.0f}x real time)"
    )
    traffic = Table.grid(padding=(0, 2))
    traffic.add_column(style="dim")
    traffic.add_column(justify="right")
    for label, value in (
        ("payments/s", f"{live['payments_per_s']:,.0f} of {opts.rate:g}"),
        ("requests/s", f"{live['requests_per_s']:,.0f}"),
        ("latency p50", _ms(live["latency_p50_ms"])),
        ("latency p99", _ms(live["latency_p99_ms"])),
        ("from the model", _pct(p["model_share"], 5)),
        ("fallback", _pct(p["fallback_share"], 5)),
        ("exploration", _pct(p["exploration_share"], 5)),
        ("feature age", _ms(live["feature_age_p50_ms"])),
        ("payments", f"{p['payments']:,}"),
        ("errors", f"{_errors(p):,}"),
    ):
        traffic.add_row(label, value)
    results = Table(box=None, padding=(0, 2))
    results.add_column("same payments", style="dim")
    results.add_column("authopt", justify="right", style="bold green")
    results.add_column("static", justify="right")
    results.add_column("oracle", justify="right", style="dim")
    oracle = _pct(p["oracle_expected_first_attempt_approval"], 5)
    for label, key, beside in (
        ("first-try approval", "first_attempt_approval", ""),
        ("expected (true P)", "expected_first_attempt_approval", oracle),
        ("approved in the run", "approval", ""),
    ):
        results.add_row(label, _pct(a[key], 5), _pct(s[key], 5), beside)
    # The tallies' own net revenue: the summary's is rounded to hundredths, this shows whole units.
    results.add_row(
        "net revenue (minor)", f"{stats.authopt.net_minor:,.0f}", f"{stats.static.net_minor:,.0f}", ""
    )
    results.add_row("retries", f"{a['retries']:,}", f"{s['retries']:,}", "")
    results.add_row("retries deferred", f"{a['retries_deferred']:,}", f"{s['retries_deferred']:,}", "")
    procs = Table(box=None, padding=(0, 2))
    for col in ("process", "pid", "status", "detail"):
        procs.add_column(col, style="dim" if col == "pid" else None)
    details = {
        "broker": stack.children["broker"].address,
        "worker": ", ".join(
            part
            for part in (
                stack.worker_health(),
                f"{stack.events_folded():,} events folded, {stack.dead_lettered():,} dead-lettered",
            )
            if part
        ),
        "server": f"{stack.children['server'].address}, {p['outcomes_reported']:,} outcomes reported",
    }
    for c in stack.children.values():
        style = "green" if c.alive else "red"
        procs.add_row(c.name, str(c.process.pid), f"[{style}]{c.status()}[/{style}]", details.get(c.name, ""))
    incidents = incidents_line(platform)
    return Group(
        head,
        f"[yellow]{incidents}[/yellow]" if incidents.startswith("incidents") else f"[dim]{incidents}[/dim]",
        Columns(
            [Panel(traffic, title="traffic", expand=False), Panel(results, title="approval", expand=False)]
        ),
        Panel(procs, title="processes", expand=False),
    )


# --- at the end ---------------------------------------------------------------------------------


def _incidents_text(incidents: list[dict[str, Any]]) -> str:
    if not incidents:
        return "none"
    shown = [
        f"{i['kind']} {i['id']} {i['start'][11:16]}-{i['end'][11:16]} ({100 * i['severity']:.0f} %)"
        for i in incidents[:6]
    ]
    more = f" and {len(incidents) - 6} more" if len(incidents) > 6 else ""
    return ", ".join(shown) + more


def format_platform(doc: dict[str, Any]) -> str:
    """The traffic part of a summary, as text."""
    p, a, s = doc["platform"], doc["platform"]["authopt"], doc["platform"]["static"]
    return "\n".join(
        [
            f"{p['payments']:,} payments, {p['requests']:,} decisions in {p['elapsed_s']:.1f}s "
            f"({p['requests_per_s']:.0f}/s; latency p50 {_ms(p['latency_ms']['p50'])}, "
            f"p99 {_ms(p['latency_ms']['p99'])}); world {doc['world']} seed {doc['seed']}",
            f"  decisions: model {_pct(p['model_share'])}, "
            f"fallback {_pct(p['fallback_share'])}, explored {_pct(p['exploration_share'])}; "
            f"errors {_errors(p)}",
            f"  first-try approval: authopt {_pct(a['first_attempt_approval'])}, "
            f"static {_pct(s['first_attempt_approval'])} (expected: authopt "
            f"{_pct(a['expected_first_attempt_approval'])}, static "
            f"{_pct(s['expected_first_attempt_approval'])}, oracle "
            f"{_pct(p['oracle_expected_first_attempt_approval'])})",
            f"  approved in the run: authopt {_pct(a['approval'])} with {a['retries']:,} retries "
            f"({a['retries_deferred']:,} deferred past the end), static {_pct(s['approval'])} "
            f"with {s['retries']:,}; net revenue (minor units, all currencies) authopt "
            f"{a['net_revenue_minor']:,.0f}, static {s['net_revenue_minor']:,.0f}",
            f"  world incidents played through: {_incidents_text(p.get('incidents', []))}",
            f"  feature age at the end: p50 {_ms(p['feature_age_ms']['p50'])}, "
            f"max {_ms(p['feature_age_ms']['max'])}; outcomes reported {p['outcomes_reported']:,}, "
            f"not reported {p['outcomes_unreported']:,}",
        ]
    )


def format_summary(doc: dict[str, Any]) -> str:
    """The final summary of `authopt up`, as text."""
    o = doc["outcomes"]
    lines = [
        "authopt up: " + format_platform(doc),
        f"  outcomes: {o['produced']:,} reported, {o['consumed']:,} taken by the worker, "
        f"{o['lost']:,} lost, {o['dead_lettered']:,} dead-lettered",
        "  processes: "
        + ", ".join(
            f"{k} pid {v['pid']} {v['status']} (exit {v['exit_code']})" for k, v in doc["processes"].items()
        ),
    ]
    if doc["problems"]:
        lines.append("  PROBLEMS: " + "; ".join(doc["problems"]))
    lines.append(f"  logs: {doc['workdir']}")
    return "\n".join(lines)
