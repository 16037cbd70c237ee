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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
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
    (the rest of its tree) and Redis."""
    triton = cpu_by_model(stack.pids["triton"])
    server = triton.pop("tritonserver", 0.0)
    redis = (
        sum(cpu_seconds(p) for p in stack.redis_pids)
        if stack.redis_pids
        else cpu_seconds(stack.pids["redis"])
    )
    return {
        "gateway": cpu_seconds(stack.pids["gateway"]),
        "tritonserver": server,
        "triton_stubs": sum(triton.values()),
        "redis": redis,
    }


def point(stack: Stack, workload: Workload, concurrency: int, requests: int) -> dict[str, Any]:
    """One closed-loop run of the gateway: its summary, the counters' differences (stack.per_batch), the
    images Triton received, and CPU seconds by role (`cpu_role_s`)."""
    before, roles = stack.counters(), cpu_by_role(stack)
    summary = summarize(asyncio.run(closed_loop(stack.gateway, workload, concurrency, requests)))
    roles_after, after = cpu_by_role(stack), stack.counters()
    used = {k: roles_after[k] - roles[k] for k in ROLES}
    return {
        **summary.to_json(),
        **rounded(per_batch(before, after, summary.images_ok)),
        "triton_images": after["triton_images"] - before["triton_images"],
        "cpu_role_s": rounded(used),
    }


def summarize_points(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """CPU milliseconds per image by role, pooled over the points (CPU seconds summed over images summed:
    the 10 ms granularity of process CPU times weighs 1/len(points) as much as in one point), and per point.

    Raises ValueError when a point's images did not all go to Triton (a cache hit would make it no
    miss-path figure) or when no image succeeded.
    """
    images = sum(p["images_ok"] for p in points)
    if not images:
        raise ValueError("no successful image to divide by")
    for p in points:
        if p["triton_images"] < p["images_ok"]:
            raise ValueError(
                f"{p['images_ok'] - p['triton_images']:.0f} images skipped Triton: not all misses"
            )
    return {
        "images": images,
        "points": len(points),
        "ms_per_image": {r: round(1e3 * sum(p["cpu_role_s"][r] for p in points) / images, 3) for r in ROLES},
        "ms_per_image_by_point": [
            {r: round(1e3 * p["cpu_role_s"][r] / p["images_ok"], 3) for r in ROLES} for p in points
        ],
    }


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The published figures: `cpu_miss_<role>_ms_per_image`."""
    return {f"cpu_miss_{role}_ms_per_image": ms for role, ms in result["ms_per_image"].items()}


def measure(
    stack: Stack,
    photos: Sequence[bytes],
    *,
    rounds: int,
    images: int,
    batch: int = 8,
    concurrency: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`rounds` points of `images` unique images each, `batch` per request, `concurrency` in flight, users
    drawn from USERS preloaded profiles; returns summarize_points' figures with the config."""
    points = []
    for r in range(rounds):
        workload = Workload(photos, batch, user_ids(USERS), seed=r)
        points.append(point(stack, workload, concurrency, max(1, images // batch)))
        done = points[-1]
        log(f"miss path round {r + 1}/{rounds}: {done['images_ok']} images, CPU s {done['cpu_role_s']}")
    config = {"images_per_request": batch, "concurrency": concurrency, "users": USERS, "unique_images": True}
    return {"config": config, **summarize_points(points)}


def main(argv: list[str] | None = None) -> int:
    """CLI: starts a stack (Redis, CPU Triton, gateway), preloads USERS profiles, measures, prints JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m piaa_bench.miss_path", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=192, help="images per round")
    parser.add_argument("--out", type=Path, default=None, help="also write miss_path.json here")
    args = parser.parse_args(argv)
    photos = load_photos(args.photos)
    with running_stack() as stack:
        preload_profiles(stack.redis_url, USERS)
        point(stack, Workload(photos, 8, user_ids(USERS), seed=99), 4, 4)  # warm every path once
        result = measure(
            stack, photos, rounds=args.rounds, images=args.images, log=lambda m: print(m, flush=True)
        )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "miss_path.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
