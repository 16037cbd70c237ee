"""`make bench`'s cluster configuration: the gateway on a 3-primary Redis Cluster next to the standalone one.

    python -m piaa_bench.cluster --rounds 5 --images 96     # alone: its own Redis, Triton and gateways

Both gateways share one Triton and score the same personalized workload (1,000 preloaded users, every
image new, so each micro-batch reads features and profiles and calls Triton), alternating in every round.
Per configuration: images/s, images per CPU-second of its whole serving tree (every redis-server of the
cluster, primaries and replicas; Triton; the gateway), and the Redis round trips each micro-batch's
answer waited for, by node (from the gateway's piaa_redis_round_trips_total).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from piaa_bench.gateway_batching import start_gateway
from piaa_bench.loadgen import Workload, closed_loop, load_photos, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.stack import Stack, per_batch, running_stack
from piaa_bench.stats import median_ratio, rounded, summarize
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_personalization.store.redis_cluster import LocalCluster

USERS = 1_000
CONFIGS = ("standalone", "cluster")


@contextlib.contextmanager
def cluster_stack(base: Stack, users: int = USERS) -> Iterator[Stack]:
    """A LocalCluster (3 primaries + 3 replicas) holding `users` preloaded profiles and a gateway in
    `--redis-mode cluster` on `base`'s Triton; yields its Stack, whose "redis" CPU is every node's.

    Raises RedisServerError when the cluster does not form, ProcessStartError when the gateway does not
    start.
    """
    with LocalCluster(3) as redis_cluster:
        preload_profiles(redis_cluster.url, users, cluster=True)
        nodes = [n.process.pid for n in redis_cluster.nodes if n.process is not None]
        flags = ["--redis-mode", "cluster"]
        with start_gateway(redis_cluster.url, base.triton_url, flags, metrics=True) as gateway:
            assert gateway.pid is not None
            pids = {"redis": nodes[0], "triton": base.pids["triton"], "gateway": gateway.pid}
            urls = (redis_cluster.url, base.triton_url, gateway.address, gateway.metrics_url)
            yield Stack(*urls, base.repository, pids, redis_pids=nodes)


def check_personalized(stack: Stack, photo: bytes, user: str) -> None:
    """Raises RuntimeError unless `user`'s score is personalized (a silent fallback would turn every
    personalized figure into a generic one)."""
    with grpc.insecure_channel(stack.gateway) as ch:
        reply = pb_grpc.PersonalizationStub(ch).Score(
            pb.ScoreRequest(user_id=user, images=[pb.Image(data=photo)]), timeout=120
        )
    if not reply.scores[0].personalized:
        raise RuntimeError(f"{user} was not personalized: fallback {reply.scores[0].fallback_reason}")


def point(stack: Stack, workload: Workload, concurrency: int, requests: int) -> dict[str, Any]:
    """One closed-loop run on `stack`: throughput, latency, CPU and round trips (stack.per_batch)."""
    before = stack.counters()
    summary = summarize(asyncio.run(closed_loop(stack.gateway, workload, concurrency, requests)))
    return {**summary.to_json(), **rounded(per_batch(before, stack.counters(), summary.images_ok))}


def compare(
    stacks: dict[str, Stack],
    photos: list[bytes],
    *,
    rounds: int,
    images: int,
    batch: int,
    concurrency: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`rounds` alternating rounds (who goes first alternates too) of `images` personalized images per
    configuration of `stacks` ("standalone", "cluster"); returns the points, their medians and `ratios`
    (cluster / standalone, wall clock and per CPU-second, each the median of per-round ratios)."""
    for stack in stacks.values():
        check_personalized(stack, photos[0], user_ids(1)[0])
    requests = max(1, images // batch)
    points: dict[str, list[dict[str, Any]]] = {name: [] for name in stacks}
    for stack in stacks.values():  # warm: Triton's stubs, the channels, the cluster's slot map
        point(stack, Workload(photos, batch, user_ids(USERS), seed=99), concurrency, concurrency)
    for r in range(rounds):
        order = list(stacks) if r % 2 == 0 else list(reversed(stacks))
        for name in order:
            workload = Workload(photos, batch, user_ids(USERS), seed=1000 + r)
            points[name].append(point(stacks[name], workload, concurrency, requests))
        shown = ", ".join(
            f"{n} {p[-1]['images_per_s']:.1f} img/s {p[-1]['images_per_cpu_s']:.1f} img/CPU-s"
            for n, p in points.items()
        )
        log(f"cluster round {r + 1}/{rounds}: {shown}")
    return {"users": USERS, "points": points, "medians": medians(points), "ratios": ratios(points)}


def medians(points: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration, the median over rounds of throughput, CPU, front-end CPU (gateway + Redis) per
    image, and round trips per micro-batch in all, by node and behind the answer."""
    out: dict[str, dict[str, Any]] = {}
    for name, runs in points.items():

        def med(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None]
            return round(statistics.median(kept), 3) if kept else None

        nodes = sorted({n for p in runs for n in p["redis_per_micro_batch_by_node"]})
        out[name] = {
            "images_per_s": med([p["images_per_s"] for p in runs]),
            "images_per_cpu_s": med([p["images_per_cpu_s"] for p in runs]),
            "front_cpu_ms_per_image": med(
                [1e3 * (p["cpu_s"]["gateway"] + p["cpu_s"]["redis"]) / p["images_ok"] for p in runs]
            ),
            "redis_per_micro_batch": med([p["redis_per_micro_batch"] for p in runs]),
            "redis_per_micro_batch_by_node": {
                node: med([p["redis_per_micro_batch_by_node"].get(node, 0.0) for p in runs]) for node in nodes
            },
            "redis_behind_per_micro_batch": med([p["redis_behind_per_micro_batch"] for p in runs]),
        }
    return out


def ratios(points: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """cluster_vs_standalone (images/s) and cpu_cluster_vs_standalone (images per CPU-second): medians of
    the per-round ratios."""

    def rate(name: str, key: str) -> list[float]:
        return [p[key] for p in points[name]]

    return {
        "cluster_vs_standalone": round(
            median_ratio(rate("cluster", "images_per_s"), rate("standalone", "images_per_s")), 3
        ),
        "cpu_cluster_vs_standalone": round(
            median_ratio(rate("cluster", "images_per_cpu_s"), rate("standalone", "images_per_cpu_s")), 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: the comparison alone on its own stack; prints the medians and ratios."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    photos = load_photos(args.photos)
    with running_stack() as standalone:
        preload_profiles(standalone.redis_url, USERS)
        with cluster_stack(standalone) as clustered:
            result = compare(
                {"standalone": standalone, "cluster": clustered},
                photos,
                rounds=args.rounds,
                images=args.images,
                batch=args.batch,
                concurrency=args.concurrency,
                log=lambda m: print(m, flush=True),
            )
    for name, m in result["medians"].items():
        print(f"{name}: {m}")
    print(f"ratios: {result['ratios']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
