"""The gateway's cost on the feature-cached path: milliseconds of serving CPU per image, by process.

    python -m piaa_bench.cached                                  # ~1 min; this tree's gateway
    python -m piaa_bench.cached --gateways 6f4d9c7,HEAD --rounds 5  # before/after: one gateway per commit

Every photo is sent once first, so its head outputs are in the feature cache; then the measured runs
re-send the same bytes (no nonce) at 8 images/request and at 1 image/request, 4 requests in flight,
personalized for one user (an active user: the profile stays in the gateway's LRU) and for 1,000
preloaded users drawn uniformly (most calls then read a profile from Redis); for one user also by digest
and on 4 open ScoreStreams instead of unary calls. What counts is CPU seconds
of the serving tree (gateway + Redis + Triton and its stubs) per image: neighbours on a shared machine
change wall clock, not what the work costs. The same load against `piaa_bench.grpc_floor` (canned
answers, nothing else) measures what grpc.aio itself costs here: the floor under the gateway.

With --gateways, one gateway per git ref (or folder holding a personalization/ tree) runs that
version's piaa_personalization (the client and the stubs stay this tree's) against the same Redis and
Triton; they alternate within each round, so a neighbour's burst hits all alike, and each figure is
the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piaa_bench.loadgen import Workload, closed_loop, load_photos, streamed_loop, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.stack import Stack, cpu_seconds, per_batch, running_stack
from piaa_bench.stats import rounded, summarize
from piaa_personalization.gateway_process import GatewayProcess, environment_without_piaa
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import repository_dir
from piaa_triton.server import ServerOptions, TritonServer

REPO = Path(__file__).resolve().parents[2]

TARGETS_MS = {8: 0.15, 1: 0.40}
"""Serving CPU ms per image on the cached path, by images per request (issue 16)."""


@dataclass(frozen=True)
class CachedPoint:
    """One measured load point of the cached path."""

    images_per_request: int
    users: int
    images: int
    concurrency: int = 4
    by_digest: bool = False
    """Images sent as their SHA-256 (Image.digest) instead of their bytes."""
    streamed: bool = False
    """The requests sent on `concurrency` open ScoreStreams instead of as unary Score calls."""

    @property
    def name(self) -> str:
        """The key of its results: <images per request>x<users>, then "d" when sent by digest and "s" when
        streamed."""
        return f"{self.images_per_request}x{self.users}" + "d" * self.by_digest + "s" * self.streamed


POINTS = (
    CachedPoint(8, 1, 1536),
    CachedPoint(1, 1, 768),
    CachedPoint(8, 1_000, 1536),
    CachedPoint(1, 1_000, 768),
    CachedPoint(8, 1, 1536, by_digest=True),
    CachedPoint(1, 1, 768, by_digest=True),
    CachedPoint(8, 1, 1536, streamed=True),
    CachedPoint(1, 1, 768, streamed=True),
)
"""The suite's cached configuration: 8 and 1 images/request, for one user and for 1,000; for one user
with the images sent by digest (what a client that remembers its photos' digests sends); and for one user
on open ScoreStreams (a client that scores at a high rate)."""


def warm_cache(stack: Stack, photos: list[bytes], users: int = 1_000) -> None:
    """Scores every photo once (cache misses run through Triton), so later sends of the same bytes hit
    the feature cache; raises RuntimeError when any request failed."""
    workload = Workload(photos, 8, user_ids(users), unique=False)
    samples = asyncio.run(closed_loop(stack.gateway, workload, 4, -(-len(photos) // 8), timeout=300))
    failed = [s.code for s in samples if s.code != "OK"]
    if failed:
        raise RuntimeError(f"warming the feature cache failed: {failed[:3]}")


def measure(stack: Stack, photos: list[bytes], point: CachedPoint) -> dict[str, Any]:
    """One closed-loop run of `point` on cached photos: throughput, latency, and CPU ms per image of
    each serving process tree and of their sum ("cpu_ms_per_image"). A stack without a metrics URL
    (the floor) counts only its processes' CPU."""
    users = user_ids(point.users)
    workload = Workload(
        photos,
        point.images_per_request,
        users,
        seed=point.images,
        unique=False,
        by_digest=point.by_digest,
        timings=False,  # what a production client pays: no stage timings in the trailers
    )
    requests = max(1, point.images // point.images_per_request)
    counters = stack.counters if stack.metrics_url else (lambda: _cpu(stack))
    before = counters()
    drive = streamed_loop if point.streamed else closed_loop
    summary = summarize(asyncio.run(drive(stack.gateway, workload, point.concurrency, requests)))
    after = counters()
    if stack.metrics_url:
        used = per_batch(before, after, summary.images_ok)
    else:
        used = {"cpu_s": {k: after[k] - before[k] for k in before}, "client_cpu_s": 0.0}
    n = max(summary.images_ok, 1)
    cpu_ms = {k: 1e3 * v / n for k, v in used["cpu_s"].items()}
    return {
        "images_per_request": point.images_per_request,
        "concurrency": point.concurrency,
        **summary.to_json(),
        **rounded(used),
        "cpu_ms_per_image_by_process": rounded(cpu_ms),
        "cpu_ms_per_image": round(sum(cpu_ms.values()), 4),
        "client_cpu_ms_per_image": round(1e3 * used["client_cpu_s"] / n, 4),
    }


@contextlib.contextmanager
def redis_and_triton() -> Iterator[Stack]:
    """Redis and a CPU Triton, without a gateway (gateway_from adds them)."""
    repository = repository_dir("cpu")
    with RedisServer() as rds, TritonServer(ServerOptions(repository=repository)) as triton:
        assert rds.process is not None and triton.process is not None
        pids = {"redis": rds.process.pid, "triton": triton.process.pid}
        yield Stack(rds.url, triton.grpc_url, "", "", repository, pids)


@contextlib.contextmanager
def gateway_from(stack: Stack, source: str) -> Iterator[Stack]:
    """Another gateway running the piaa_personalization of `source` (a git ref of this repository, or a
    folder holding personalization/) against the stack's Redis and Triton; yields a Stack that points
    at it (its CPU counted in place of the stack's own gateway's)."""
    with tempfile.TemporaryDirectory(prefix="piaa-gateway-") as tmp:
        if Path(source, "personalization").is_dir():
            root = Path(source)
        else:
            git = ["git", "-C", str(REPO), "archive", source, "personalization"]
            archive = subprocess.run(git, check=True, capture_output=True).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(tmp, filter="data")
            root = Path(tmp)
        env = environment_without_piaa()
        paths = [str(root / "personalization"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        args = ["--port", "0", "--redis-url", stack.redis_url, "--triton-url", stack.triton_url]
        with GatewayProcess(args, metrics=True, env=env) as gateway:
            assert gateway.pid is not None
            pids = {**stack.pids, "gateway": gateway.pid}
            urls = (stack.redis_url, stack.triton_url, gateway.address, gateway.metrics_url)
            yield Stack(*urls, stack.repository, pids)


def _cpu(stack: Stack) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in stack.pids.items()}


@contextlib.contextmanager
def floor_server() -> Iterator[Stack]:
    """piaa_bench.grpc_floor in a child process, as a Stack without Redis, Triton or metrics."""
    with GatewayProcess(["--port", "0"], module="piaa_bench.grpc_floor") as floor:
        assert floor.pid is not None
        yield Stack("", "", floor.address, "", Path(), {"floor": floor.pid})


def compare(gateways: dict[str, Stack], photos: list[bytes], rounds: int, log: Any = print) -> dict[str, Any]:
    """`rounds` rounds of every point on every gateway and on the gRPC floor, alternating, after the
    feature cache is warmed through the first gateway. Profiles of 1,000 users must be in Redis.

    Returns {"rounds": {gateway: {point: [measurements]}}, "median_cpu_ms_per_image": {gateway:
    {point: ms}}, "vs_floor": {gateway: {point: median over rounds of gateway ms / floor ms}}}.
    """
    warm_cache(next(iter(gateways.values())), photos)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with floor_server() as floor:
        everyone = {**gateways, "grpc_floor": floor}
        for stack in everyone.values():  # warm each one's channels, memories and code paths
            for point in POINTS:
                measure(stack, photos, dataclasses.replace(point, images=256))
        for r in range(rounds):
            for point in POINTS:
                for name, stack in everyone.items():
                    m = measure(stack, photos, point)
                    raw.setdefault(name, {}).setdefault(point.name, []).append(m)
                    log(
                        f"round {r + 1} {name} {point.images_per_request} img/req x {point.users} users: "
                        f"{m['cpu_ms_per_image']:.3f} ms CPU/image {m['cpu_ms_per_image_by_process']} "
                        f"{m['images_per_s']:.0f} img/s"
                    )
    medians = {
        name: {k: statistics.median(p["cpu_ms_per_image"] for p in pts) for k, pts in by_point.items()}
        for name, by_point in raw.items()
    }
    floor_ms = {k: [p["cpu_ms_per_image"] for p in pts] for k, pts in raw["grpc_floor"].items()}
    vs_floor = {
        name: {
            k: statistics.median(p["cpu_ms_per_image"] / f for p, f in zip(pts, floor_ms[k], strict=True))
            for k, pts in by_point.items()
        }
        for name, by_point in raw.items()
        if name != "grpc_floor"
    }
    return {"rounds": raw, "median_cpu_ms_per_image": medians, "vs_floor": vs_floor}


def run(
    rounds: int, sources: list[str] | None = None, photos_dir: Path | None = None, log: Any = print
) -> dict[str, Any]:
    """Starts Redis, Triton and the gateways (this tree's, or one per source: see gateway_from),
    preloads 1,000 profiles and runs compare() on the photos of `photos_dir` (default: load_photos's);
    returns its results with the load average and the photos' count and mean size."""
    photos = load_photos(photos_dir)
    results: dict[str, Any] = {
        "load_avg_start": os.getloadavg()[0],
        "photos": len(photos),
        "mean_photo_kib": round(sum(map(len, photos)) / len(photos) / 1024, 1),
    }
    with contextlib.ExitStack() as running:
        if sources:
            servers = running.enter_context(redis_and_triton())
            gateways = {src: running.enter_context(gateway_from(servers, src)) for src in sources}
        else:
            gateways = {"current": running.enter_context(running_stack())}
        preload_profiles(next(iter(gateways.values())).redis_url, 1_000)
        results.update(compare(gateways, photos, rounds, log))
    results["load_avg_end"] = os.getloadavg()[0]
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: runs the cached-path measurement and prints the medians as JSON."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.cached", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateways", default="", help="comma-separated git refs or folders, side by side")
    parser.add_argument("--photos", type=Path, default=None, help="default: shared photos or demo album")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    sources = [s for s in args.gateways.split(",") if s]
    results = run(args.rounds, sources, args.photos, log=lambda m: print(m, flush=True))
    print(json.dumps({k: results[k] for k in ("median_cpu_ms_per_image", "vs_floor")}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{results['photos']} photos, mean {results['mean_photo_kib']} KiB; load average "
        f"{results['load_avg_start']:.1f} → {results['load_avg_end']:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
