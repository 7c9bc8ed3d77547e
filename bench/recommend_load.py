"""Recommend under load vs a bare grpc.aio echo server, with h2load as the load generator.

  python -m bench.recommend_load [--duration 5] [--repeats 3] [--inflight 1,16,64]

Needs `h2load` (Debian package nghttp2-client). Servers, each its own process, started in turn:
authopt serving the bundled model as `authopt serve` does (no trace exporter: no SDK), with tracing
on (SDK, 1 % of traces sampled; every span sampled), without batching, with inline forwards and a
2 ms queue delay; a bare grpc.aio echo server with a coroutine handler (the framework's limit) and
one with a plain-function handler (which grpc.aio runs on a thread pool; the echo of reports before
2026-12-03). For each server and in-flight level it runs h2load `--repeats` times for `--duration`
seconds over one HTTP/2 connection with that many concurrent streams, framing one RecommendRequest
as gRPC, and reports the median QPS, p50 and p99 (from h2load's per-request log), and each QPS as a
ratio to the echo's. It checks that the recommend server really answered with model decisions
before measuring. Prints tables; never fails on a timing. Only 127.0.0.1 is targeted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _request_body() -> bytes:
    from authopt.samples import sample_request
    from bench.servers import ROUTES

    routes = [(r, 150 + 10 * i, 5) for i, r in enumerate(ROUTES)]
    req = sample_request("bench-0001", routes, latency_budget_ms=50)
    payload = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload  # gRPC length-prefixed message


def _free_port() -> int:
    from streams.broker import free_port

    return free_port()


def _start(
    mode: str, model_dir: Path, extra: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.servers",
        mode,
        "--port",
        str(port),
        "--model-dir",
        str(model_dir),
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        proc.kill()
        raise RuntimeError(f"{mode} server did not start")
    return proc, port


def _check_decision(port: int) -> str:
    import grpc

    from authopt.v1 import optimizer_pb2, optimizer_pb2_grpc

    req = optimizer_pb2.RecommendRequest.FromString(_request_body()[5:])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(ch).Recommend(req, timeout=5)
    return optimizer_pb2.DecisionSource.Name(resp.decision_source)


def _scrape(metrics_port: int) -> dict[str, float]:
    """Decisions by source and the mean requests per forward, from the server's Prometheus page."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("authopt_decisions_total{"):
            source = line.split('source="')[1].split('"')[0].removeprefix("DECISION_SOURCE_")
            out[source] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("authopt_batch_requests_sum ", "authopt_batch_requests_count ")):
            out[line.split(" ")[0]] = float(line.split(" ")[1])
    return out


def _h2load(port: int, body: Path, inflight: int, duration: float, log: Path) -> dict[str, float]:
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    cmd = [
        "h2load", "-c", "1", "-t", "1", "-m", str(inflight), "-D", f"{duration:g}", "--warm-up-time", "1",
        "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body),
        "--log-file", str(log), f"http://127.0.0.1:{port}/authopt.v1.AuthorizationOptimizerService/Recommend",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finished = re.search(r"finished in ([0-9.]+)s, ([0-9.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if finished is None or codes is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip())
    n = len(lat)
    return {
        "qps": float(finished.group(2)),
        "p50_ms": lat[n // 2] / 1000 if n else float("nan"),
        "p99_ms": lat[min(n - 1, int(n * 0.99))] / 1000 if n else float("nan"),
        "ok": float(codes.group(1)),
        "not_ok": float(sum(int(codes.group(i)) for i in (2, 3, 4))),
    }


Results = dict[str, dict[int, dict[str, float]]]
Server = tuple[str, list[str], dict[str, str], str]  # mode, extra args, env, model folder


ECHO = "echo (bare grpc.aio)"


def _servers(levels: list[int], large_hidden: int) -> dict[str, tuple[Server, list[int]]]:
    # Every span sampled unless said otherwise; the SDK reads OTEL_TRACES_SAMPLER itself.
    all_spans = {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    one_percent = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    inline = {"AUTHOPT_SERVER_INFERENCE_EXECUTOR": "inline"}
    servers: dict[str, tuple[Server, list[int]]] = {
        # `authopt serve` without an exporter installs no SDK: the API's non-recording spans.
        "authopt (default: no exporter)": (("recommend", ["--no-sdk"], {}, "bundled"), levels),
        "authopt (traced, 1% sampled)": (("recommend", [], one_percent, "bundled"), levels),
        "authopt (traced, every span)": (("recommend", [], all_spans, "bundled"), levels),
        "authopt (no batching)": (("recommend", ["--no-sdk", "--no-batching"], {}, "bundled"), levels),
        "authopt (inline, 2 ms queue delay)": (
            ("recommend", ["--no-sdk", "--queue-delay-us", "2000"], inline, "bundled"),
            levels,
        ),
        ECHO: (("echo", [], {}, "bundled"), levels),
        # grpc.aio runs a plain-function handler on a thread pool: the echo of earlier reports.
        "echo (plain-function handler)": (("echo-sync", [], {}, "bundled"), levels),
    }
    if large_hidden:
        top = [max(levels)]
        servers[f"authopt hidden {large_hidden} (batching)"] = (("recommend", ["--no-sdk"], {}, "large"), top)
        servers[f"authopt hidden {large_hidden} (no batching)"] = (
            ("recommend", ["--no-sdk", "--no-batching"], {}, "large"), top,
        )  # fmt: skip
    return servers


def _measure(
    name: str, server: Server, levels: list[int], tmpdir: Path, args: argparse.Namespace
) -> dict[int, dict[str, float]]:
    mode, extra, env, folder = server
    metrics_port = _free_port()
    if mode == "recommend":
        extra = [*extra, "--metrics-port", str(metrics_port)]
    proc, port = _start(mode, tmpdir / folder, extra, env)
    out: dict[int, dict[str, float]] = {}
    try:
        if mode == "recommend":
            print(f"{name}: decision_source of a probe request = {_check_decision(port)}", flush=True)
        for level in levels:
            before = _scrape(metrics_port) if mode == "recommend" else {}
            runs = [
                _h2load(port, tmpdir / "body.bin", level, args.duration, tmpdir / "log.tsv")
                for _ in range(args.repeats)
            ]
            r = out[level] = {k: statistics.median(x[k] for x in runs) for k in ("qps", "p50_ms", "p99_ms")}
            note = ""
            if mode == "recommend":
                # Only decisions the model made count as model throughput: a fallback is cheaper.
                after = _scrape(metrics_port)
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                forwards = delta.pop("authopt_batch_requests_count", 0.0)
                merged = delta.pop("authopt_batch_requests_sum", 0.0)
                r["model_share"] = delta.get("MODEL", 0.0) / (sum(delta.values()) or 1.0)
                r["requests_per_forward"] = merged / max(forwards, 1.0)
                note = f"  MODEL {r['model_share']:.1%}, {r['requests_per_forward']:.1f} requests/forward"
            print(
                f"  {name:34s} in-flight {level:3d}: {r['qps']:8.0f} req/s  "
                f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms{note}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def _report(results: Results, levels: list[int], large_hidden: int) -> None:
    echo = results[ECHO]
    print("\n| server | in flight | QPS | p50 ms | p99 ms | QPS / echo | MODEL share | model decisions/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, by_level in results.items():
        for level, r in by_level.items():
            ratio = r["qps"] / echo[level]["qps"]
            share = r.get("model_share")
            model = "— | —" if share is None else f"{share:.1%} | {r['qps'] * share:.0f}"
            cells = f"{r['qps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio:.2f} | {model}"
            print(f"| {name} | {level} | {cells} |")
    top = max(levels)
    pairs = [("bundled model", "authopt (default: no exporter)", "authopt (no batching)")]
    if large_hidden:
        h = large_hidden
        pairs.append(
            (f"hidden-{h} model", f"authopt hidden {h} (batching)", f"authopt hidden {h} (no batching)")
        )
    print()
    for label, on, off in pairs:
        b = results[on][top]["qps"] * results[on][top]["model_share"]
        nb = results[off][top]["qps"] * results[off][top]["model_share"]
        gain = f"{b / nb:.2f}x" if nb else "unbounded"
        print(f"batching gain at {top} in flight, {label}: {gain} ({b:.0f} vs {nb:.0f} model decisions/s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report", type=Path, help="only print the tables of a run saved with --json")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inflight", default="1,16,64")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--large-hidden", type=int, default=512,
        help="also compare batching on a model this wide at the highest in-flight level (0: skip)",
    )  # fmt: skip
    args = parser.parse_args()
    levels = [int(x) for x in args.inflight.split(",")]
    if args.report:
        saved = json.loads(args.report.read_text())
        _report({n: {int(k): v for k, v in by.items()} for n, by in saved.items()}, levels, args.large_hidden)
        return
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    from model import DELAY_BUCKETS_S, INPUT_LAYOUT, ApprovalNet, export_model
    from model.artifacts import DEFAULT_MODEL_DIR

    results: Results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        shutil.copytree(
            DEFAULT_MODEL_DIR, tmpdir / "bundled", ignore=shutil.ignore_patterns("*.py", "__pycache__")
        )
        if args.large_hidden:
            torch.manual_seed(0)
            wide = ApprovalNet(len(INPUT_LAYOUT), len(DELAY_BUCKETS_S), hidden=args.large_hidden).eval()
            export_model(wide, tmpdir / "large", "bench-large")
        (tmpdir / "body.bin").write_bytes(_request_body())
        print(
            f"request: {(tmpdir / 'body.bin').stat().st_size} bytes framed; {os.cpu_count()} CPUs; "
            f"{args.repeats} x {args.duration:g}s per point, medians",
            flush=True,
        )
        for name, (server, server_levels) in _servers(levels, args.large_hidden).items():
            results[name] = _measure(name, server, server_levels, tmpdir, args)
    _report(results, levels, args.large_hidden)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
