"""The cache-miss path's CPU per image, by process: what the capacity model (docs/deployment.md, "Capacity per
GPU") multiplies by a GPU's images per second to size gateway and Triton cores.

    python -m piaa_bench.miss_path --rounds 3 --images 192        # alone: its own stack, ~1-2 min on 2 cores

`make bench` (suite.py) records the same split on every gateway point of its rounds and publishes the
personalized 1,000-user point's (8 unique images per request, 4 in flight) as `cpu_miss_*_ms_per_image`.
Every image carries a nonce (loadgen.Workload), so none is a feature-cache hit: each goes to Triton, which
`summarize_points` checks. CPU is user + system time by process: the gateway's tree; tritonserver's own
process (gRPC, the ensemble's scheduler, the batchers: what stays on the CPU when the models run on a GPU);
its Python backend stubs (on the cpu profile they decode and run ONNX Runtime: the models' work, which a GPU
takes); Redis.

A process also burns CPU when idle (the gateway's health checks of Triton, pollers, timers: a few ms per
second), which a slow CPU stack spreads over few images: the published figures are net of it (the idle
rate, measured on the same stack before the load, times the load's wall time): the marginal cost of an
image, which the capacity model scales to a GPU's thousands per second. The raw figures stay in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from piaa_bench.layouts import cpu_by_model
from piaa_bench.loadgen import Workload, closed_loop, load_photos, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.stack import Stack, cpu_seconds, per_batch, running_stack
from piaa_bench.stats import rounded, summarize

USERS = 1_000
"""The users of the published point: the suite's `gateway_personalized_1000`."""
ROLES = ("gateway", "tritonserver", "triton_stubs", "redis")


def cpu_by_role(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of the gateway (its tree), tritonserver's own process, Triton's Python stubs
    (the rest of its tree) and Redis (every node of a cluster)."""
    triton = cpu_by_model(stack.pids["triton"])
    server = triton.pop("tritonserver", 0.0)
    redis_pids = stack.redis_pids or [stack.pids["redis"]]
    return {
        "gateway": cpu_seconds(stack.pids["gateway"]),
        "tritonserver": server,
        "triton_stubs": sum(triton.values()),
        "redis": sum(cpu_seconds(pid) for pid in redis_pids),
    }


def idle_rate(stack: Stack, seconds: float) -> dict[str, float]:
    """CPU seconds per wall-clock second by role while nothing calls the stack, over `seconds`."""
    before, start = cpu_by_role(stack), time.monotonic()
    time.sleep(seconds)
    after, wall = cpu_by_role(stack), time.monotonic() - start
    return {k: (after[k] - before[k]) / wall for k in ROLES}


def point(stack: Stack, workload: Workload, concurrency: int, requests: int) -> dict[str, Any]:
    """One closed-loop run of the gateway: its summary, the counters' differences (stack.per_batch), the
    images Triton received, and CPU seconds by role (`cpu_role_s`) over `cpu_wall_s` seconds."""
    before, roles, start = stack.counters(), cpu_by_role(stack), time.monotonic()
    summary = summarize(asyncio.run(closed_loop(stack.gateway, workload, concurrency, requests)))
    roles_after, wall, after = cpu_by_role(stack), time.monotonic() - start, stack.counters()
    return {
        **summary.to_json(),
        **rounded(per_batch(before, after, summary.images_ok)),
        "triton_images": after["triton_images"] - before["triton_images"],
        "cpu_role_s": rounded({k: roles_after[k] - roles[k] for k in ROLES}),
        "cpu_wall_s": round(wall, 3),
    }


def summarize_points(points: Sequence[dict[str, Any]], idle: dict[str, float]) -> dict[str, Any]:
    """CPU milliseconds per image by role: net of the idle rate (`idle`, CPU-s per second, times the
    points' wall time) and raw, pooled over the points (CPU seconds summed over images summed: the 10 ms
    granularity of process CPU times weighs 1/len(points) as much as in one point); raw per point too.

    Raises ValueError when a point's images did not all go to Triton (a cache hit would make it no
    miss-path figure) or when no image succeeded.
    """
    images = sum(p["images_ok"] for p in points)
    if not images:
        raise ValueError("no successful image to divide by")
    for p in points:
        if p["triton_images"] < p["images_ok"]:
            missed = p["images_ok"] - p["triton_images"]
            raise ValueError(f"{missed:.0f} images skipped Triton: not all misses")
    wall = sum(p["cpu_wall_s"] for p in points)
    cpu = {r: sum(p["cpu_role_s"][r] for p in points) for r in ROLES}
    return {
        "images": images,
        "points": len(points),
        "wall_s": round(wall, 3),
        "idle_ms_per_s": {r: round(1e3 * idle[r], 3) for r in ROLES},
        "ms_per_image": {r: round(1e3 * (cpu[r] - idle[r] * wall) / images, 3) for r in ROLES},
        "raw_ms_per_image": {r: round(1e3 * cpu[r] / images, 3) for r in ROLES},
        "raw_ms_per_image_by_point": [
            {r: round(1e3 * p["cpu_role_s"][r] / p["images_ok"], 3) for r in ROLES} for p in points
        ],
    }


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The published figures, net of idle: `cpu_miss_<role>_ms_per_image`."""
    return {f"cpu_miss_{role}_ms_per_image": ms for role, ms in result["ms_per_image"].items()}


def measure(
    stack: Stack,
    photos: Sequence[bytes],
    *,
    rounds: int,
    images: int,
    batch: int = 8,
    concurrency: int = 4,
    idle_s: float = 20.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The idle rate over `idle_s`, then `rounds` points of `images` unique images each, `batch` per
    request, `concurrency` in flight, users drawn from USERS preloaded profiles; returns
    summarize_points' figures with the config."""
    idle = idle_rate(stack, idle_s)
    points = []
    for r in range(rounds):
        workload = Workload(photos, batch, user_ids(USERS), seed=r)
        points.append(point(stack, workload, concurrency, max(1, images // batch)))
        done = points[-1]
        log(f"miss path round {r + 1}/{rounds}: {done['images_ok']} images, CPU s {done['cpu_role_s']}")
    config = {"images_per_request": batch, "concurrency": concurrency, "users": USERS, "unique_images": True}
    return {"config": config, **summarize_points(points, idle)}


def main(argv: list[str] | None = None) -> int:
    """CLI: starts a stack (Redis, CPU Triton, gateway), preloads USERS profiles, measures, prints JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m piaa_bench.miss_path", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=192, help="images per round")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds to measure the idle CPU rate over")
    parser.add_argument("--out", type=Path, default=None, help="also write miss_path.json here")
    parser.add_argument(
        "--repository", type=Path, default=None, help="Triton model repository (default: the cpu profile's)"
    )
    args = parser.parse_args(argv)
    photos = load_photos(args.photos)
    with running_stack(args.repository) as stack:
        preload_profiles(stack.redis_url, USERS)
        point(stack, Workload(photos, 8, user_ids(USERS), seed=99), 4, 4)  # warm every path once
        time.sleep(1)  # the warm-up's writes behind its answers
        result = measure(
            stack,
            photos,
            rounds=args.rounds,
            images=args.images,
            idle_s=args.idle,
            log=lambda m: print(m, flush=True),
        )
    result["command"] = " ".join(
        ["python -m piaa_bench.miss_path", *(sys.argv[1:] if argv is None else argv)]
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "miss_path.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
