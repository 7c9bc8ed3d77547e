"""A latency probe apart from the simulated platform: its own process and channel, one Recommend at a
time every `--every` seconds for `--seconds`, each printed as `monotonic latency_ms server_ms`.

    python -m tests.chaos.probe --target 127.0.0.1:PORT --body recommend.grpc --seconds 600

Where the platform (busy playing its world in the test's process) and this probe (doing nothing
else) see different tails, the difference is the platform's own client; where both see them, it is
the server's side of the wire.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from authopt.v1 import optimizer_pb2, optimizer_pb2_grpc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--body", type=Path, required=True, help="a gRPC-framed RecommendRequest")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--every", type=float, default=0.05)
    args = parser.parse_args(argv)
    req = optimizer_pb2.RecommendRequest.FromString(args.body.read_bytes()[5:])
    with grpc.insecure_channel(args.target) as channel:
        recommend = optimizer_pb2_grpc.AuthorizationOptimizerServiceStub(channel).Recommend
        end = time.monotonic() + args.seconds
        while (now := time.monotonic()) < end:
            try:
                resp = recommend(req, timeout=1.0)
            except grpc.RpcError:
                continue
            done = time.monotonic()
            print(f"{done:.4f} {1000 * (done - now):.3f} {resp.server_time_us / 1000:.3f}", flush=True)
            time.sleep(max(0.0, args.every - (done - now)))
    sys.exit(0)


if __name__ == "__main__":
    main()
