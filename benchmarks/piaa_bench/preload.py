"""Preloads benchmark users' profiles into Redis with a pipelined writer, in the store's own format.

Going through AddRatings would fit every profile (seconds per thousand users); scoring only reads the
lean snapshot (store_format.LEAN_FIELDS), so this writes each user's profile hash directly with the
store's encoders (format 2 without `stats` and `epoch`, which only refits read): a fitted-looking
profile of `ratings` ratings with small random weights in the gateway's feature layout. 100,000 users
take a few seconds.
"""

from __future__ import annotations

import time

import numpy as np
import redis

from piaa_bench.loadgen import user_ids
from piaa_personalization.model.residual import FeatureLayout
from piaa_personalization.store import format as fmt


def preload_profiles(
    url: str,
    count: int,
    *,
    tenant: str = "default",
    layout: FeatureLayout | None = None,
    ratings: int = 20,
    key_prefix: str = "piaa",
    seed: int = 0,
    chunk: int = 5000,
    cluster: bool = False,
) -> float:
    """Writes the profiles of users bench-u0..bench-u{count-1} (`cluster`: `url` names a node of a Redis
    Cluster); returns the seconds it took.

    Raises redis.RedisError when Redis cannot be written.
    """
    layout = layout or FeatureLayout()
    keys = fmt.Keys(key_prefix)
    rng = np.random.default_rng(seed)
    ids = user_ids(count)
    now = time.time()
    start = time.perf_counter()
    client: redis.Redis | redis.RedisCluster = (
        redis.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    )
    with client:
        for lo in range(0, count, chunk):
            weights = rng.normal(0.0, 0.02, (min(chunk, count - lo), layout.dim)).astype("<f4")
            pipe = client.pipeline(transaction=False)
            for user, w in zip(ids[lo : lo + chunk], weights, strict=True):
                lean = fmt.encode_lean(
                    layout.key, w, n=ratings, covers=ratings, updated_at=now, alpha=1.0, lam=1.0
                )
                pipe.hset(
                    keys.profile(tenant, user),
                    mapping={
                        "format": fmt.FORMAT,
                        "layout": layout.key,
                        "num_ratings": ratings,
                        "covers": ratings,
                        "version": 1,
                        "lean": lean,
                    },
                )
            pipe.execute()
    return time.perf_counter() - start
