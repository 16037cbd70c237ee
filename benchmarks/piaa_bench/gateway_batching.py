"""Side-by-side check of the gateway's micro-batcher and feature cache, in one run on one machine.

Starts one Redis and one Triton (CPU profile), then gateways with different batcher settings in turn,
and drives each with the same closed-loop load (C concurrent clients, one-image Score calls on photos
no cache has seen), then once more on the same photos (every feature a cache hit). Prints images/s and
the server-side stage timings (x-piaa-timing-ms) per setting; compare the ratios, not the absolutes.

    python -m piaa_bench.gateway_batching --photos ../shared/data/photos --images 256 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import redis

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_personalization.core.metrics import TIMING_METADATA_KEY, parse_timings
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import repository_dir
from piaa_triton.server import ServerOptions, TritonServer

SETTINGS = {
    "no batching (max batch 1)": ["--max-batch-size", "1", "--max-batch-delay-ms", "0"],
    "batch 16, delay 2 ms": ["--max-batch-size", "16", "--max-batch-delay-ms", "2"],
    "batch 4, delay 2 ms, 4 calls": [
        "--max-batch-size",
        "4",
        "--max-batch-delay-ms",
        "2",
        "--triton-max-inflight",
        "4",
    ],
}


def start_gateway(redis_url: str, triton_url: str, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A gateway subprocess and its address once it serves."""
    args = [sys.executable, "-u", "-m", "piaa_personalization.api.server", "--port", "0",
            "--redis-url", redis_url, "--triton-url", triton_url, *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("gateway serving on "):
            return proc, line.split()[-1]
    raise RuntimeError(f"gateway exited with {proc.wait()}")


async def drive(address: str, images: list[bytes], concurrency: int) -> tuple[float, dict[str, float]]:
    """Images per second over the run, and the median server-side milliseconds per stage."""
    todo = list(range(len(images)))
    timings: list[dict[str, float]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)

        async def client() -> None:
            while todo:
                i = todo.pop()
                call = stub.Score(
                    pb.ScoreRequest(images=[pb.Image(data=images[i])], generic_only=True), timeout=120
                )
                await call
                timings.append(parse_timings(dict(await call.trailing_metadata())[TIMING_METADATA_KEY]))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    stages = {s: statistics.median(t[s] for t in timings) for s in timings[0]}
    return len(images) / elapsed, stages


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison and prints one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="a folder of JPEGs")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    files = sorted(args.photos.glob("*.JPEG")) + sorted(args.photos.glob("*.jpg"))
    images = [f.read_bytes() for f in files[: args.images]]
    with RedisServer() as rds, TritonServer(ServerOptions(repository=repository_dir("cpu"))) as triton:
        # Warm Triton's stubs once so the first setting does not pay for it.
        proc, address = start_gateway(rds.url, triton.grpc_url, [])
        asyncio.run(drive(address, images[:32], 8))
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        # Settings alternate within each round so that load from elsewhere hits them alike.
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, extra in SETTINGS.items():
                with redis.Redis.from_url(rds.url) as client:
                    client.flushall()
                proc, address = start_gateway(rds.url, triton.grpc_url, extra)
                try:
                    for run in ("cache misses", "cache hits"):
                        rate, stages = asyncio.run(drive(address, images, args.concurrency))
                        rates.setdefault((name, run), []).append(rate)
                        shown = " ".join(f"{k}={v:.1f}" for k, v in stages.items())
                        print(f"{name:28s} {run:12s} {rate:7.1f} images/s   median ms: {shown}", flush=True)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
        print("medians over rounds:")
        for (name, run), values in rates.items():
            print(f"  {name:28s} {run:12s} {statistics.median(values):7.1f} images/s  ({len(values)} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
