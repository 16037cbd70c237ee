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
import statistics
import sys
import time
from pathlib import Path

import grpc
import redis

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_personalization.core.metrics import TIMING_METADATA_KEY, parse_timings
from piaa_personalization.gateway_process import GatewayProcess
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


def start_gateway(
    redis_url: str, triton_url: str, extra: list[str], *, metrics: bool = False
) -> GatewayProcess:
    """A gateway subprocess on port 0 with these flags, started (its `address` is set); close() it.

    Raises piaa_common.process.ProcessStartError with its output's tail when it does not start.
    """
    args = ["--port", "0", "--redis-url", redis_url, "--triton-url", triton_url, *extra]
    return GatewayProcess(args, metrics=metrics).start()


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
        with start_gateway(rds.url, triton.grpc_url, []) as gateway:
            asyncio.run(drive(gateway.address, images[:32], 8))
        # Settings alternate within each round so that load from elsewhere hits them alike.
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, extra in SETTINGS.items():
                with redis.Redis.from_url(rds.url) as client:
                    client.flushall()
                with start_gateway(rds.url, triton.grpc_url, extra) as gateway:
                    for run in ("cache misses", "cache hits"):
                        rate, stages = asyncio.run(drive(gateway.address, images, args.concurrency))
                        rates.setdefault((name, run), []).append(rate)
                        shown = " ".join(f"{k}={v:.1f}" for k, v in stages.items())
                        print(f"{name:28s} {run:12s} {rate:7.1f} images/s   median ms: {shown}", flush=True)
        print("medians over rounds:")
        for (name, run), values in rates.items():
            print(f"  {name:28s} {run:12s} {statistics.median(values):7.1f} images/s  ({len(values)} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
