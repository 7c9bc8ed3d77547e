"""A/B of two model directories through the real server, interleaved, with h2load.

  python -m bench.recommend_ab DIR_A DIR_B [--rounds 5] [--inflight 16] [--duration 5]

Each round starts `bench.servers recommend --no-sdk` (what `authopt serve` runs without a trace
exporter) on DIR_A and on DIR_B in turn — the order alternates between rounds, so drift of this
shared machine falls on both alike — checks that a probe decision comes from the model, and loads it
with h2load as `bench.recommend_load` does (one connection, `--inflight` streams, 1 s warm-up, then
`--duration` s). Prints each run and the medians: QPS, p50, p99, and B's QPS over A's. Needs
`h2load` (Debian nghttp2-client); targets only 127.0.0.1; never fails on a timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.recommend_load import _check_decision, _h2load, _request_body, _start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path, help="model directory A (what the server's --model-dir takes)")
    parser.add_argument("b", type=Path, help="model directory B")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(_request_body())
        for r in range(args.rounds):
            order = [("A", args.a), ("B", args.b)]
            for name, model_dir in order if r % 2 == 0 else order[::-1]:
                proc, port = _start("recommend", model_dir, ["--no-sdk"])
                try:
                    source = _check_decision(port)
                    if source != "DECISION_SOURCE_MODEL":
                        sys.exit(f"{name}: the probe decision came from {source}, not the model")
                    m = _h2load(port, body, args.inflight, args.duration, Path(tmp) / "log.tsv")
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                runs[name].append(m)
                print(
                    f"round {r + 1} {name}: {m['qps']:.0f} req/s, p50 {m['p50_ms']:.2f} ms, "
                    f"p99 {m['p99_ms']:.2f} ms, not ok {m['not_ok']:.0f}",
                    flush=True,
                )
    med = {
        k: {f: statistics.median(m[f] for m in v) for f in ("qps", "p50_ms", "p99_ms")}
        for k, v in runs.items()
    }
    for k, path in (("A", args.a), ("B", args.b)):
        m = med[k]
        print(f"{k} {path}: median {m['qps']:.0f} req/s, p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms")
    ratio = med["B"]["qps"] / med["A"]["qps"]
    print(f"B / A throughput: {ratio:.2f}x ({args.inflight} in flight, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
