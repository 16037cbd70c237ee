"""The bench's cluster configuration on real servers: a gateway on the session redis-server and one on a
3-primary LocalCluster, sharing the session Triton, driven side by side; CPU and round trips counted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from piaa_bench import cluster
from piaa_bench.gateway_batching import start_gateway
from piaa_bench.preload import preload_profiles
from piaa_bench.stack import Stack
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.server import TritonServer
from tests.fixtures.photos import Photo

pytestmark = pytest.mark.integration


def test_cluster_and_standalone_side_by_side_one_round_trip_per_micro_batch_and_node(
    triton_server: TritonServer, redis_server: RedisServer, redis_url: str, photos: list[Photo]
) -> None:
    images = [p.path.read_bytes() for p in photos[:16]]
    preload_profiles(redis_url, cluster.USERS)
    assert redis_server.process is not None and triton_server.process is not None
    with start_gateway(redis_url, triton_server.grpc_url, [], metrics=True) as gateway:
        assert gateway.pid is not None
        pids = {
            "redis": redis_server.process.pid,
            "triton": triton_server.process.pid,
            "gateway": gateway.pid,
        }
        urls = (redis_url, triton_server.grpc_url, gateway.address, gateway.metrics_url)
        standalone = Stack(*urls, Path("."), pids)
        with cluster.cluster_stack(standalone) as clustered:
            assert len(clustered.redis_pids) == 6  # every node's CPU is counted, replicas included
            result = cluster.compare(
                {"standalone": standalone, "cluster": clustered},
                images,
                rounds=2,
                images=16,
                batch=8,
                concurrency=2,
                log=lambda _: None,
            )
    for name, runs in result["points"].items():
        assert len(runs) == 2, name
        for p in runs:
            assert p["images_ok"] == 16 and p["errors"] == {}, (name, p)
            assert p["micro_batches"] >= 1 and p["cpu_s"]["triton"] > 0 and p["cpu_s"]["gateway"] > 0
            assert p["images_per_cpu_s"] is not None and p["images_per_cpu_s"] > 0
            assert p["redis_behind_per_micro_batch"] > 0  # every image was new: its features written after
    # Every image is new, so every micro-batch reads features and profiles: once, in one round trip...
    for p in result["points"]["standalone"]:
        assert p["redis_per_micro_batch_by_node"] == {"standalone": 1.0}
    # ...and on the cluster at most once per primary (one pipeline per node, in parallel).
    for p in result["points"]["cluster"]:
        by_node = p["redis_per_micro_batch_by_node"]
        assert 1 <= len(by_node) <= 3 and all(0 < v <= 1.0 for v in by_node.values()), by_node
        assert p["redis_per_micro_batch"] > 1.0  # 16+ keys spread over 3 primaries
    ratio = result["ratios"]["cpu_cluster_vs_standalone"]
    assert math.isfinite(ratio) and ratio > 0
