"""Redis sizing: bytes per user profile, per rating and per cached image, measured on a real redis-server.

Users are written through the real store (RedisProfileStore.add_ratings: the same Lua scripts and encodings
the gateway uses), then Redis is asked what they cost: MEMORY USAGE per key (exact, SAMPLES 0) and the
growth of used_memory (which includes the keyspace's own overhead). Run from the repository root:
  .venv/bin/python deploy/redis_sizing.py [--users 200] [--ratings 10 50] [--json out.json]
Prints a table and the extrapolation to 1 M, 100 M and 1 B users (docs/deployment.md quotes it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import redis

from piaa_personalization.model.residual import PACKED_DIM, FeatureLayout, HeadOutputs, Prior, RatingScale
from piaa_personalization.store.redis_server import RedisServer, server_version
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore, StoreConfig

TENANT = "sizing"


@dataclass(frozen=True)
class Measurement:
    """What one configuration (layout, ratings per user) costs in Redis, in bytes."""

    layout: str
    ratings_per_user: int
    users: int
    profile_key_bytes: float
    """MEMORY USAGE of a user's profile hash (lean snapshot, float32 statistics, counters), mean."""
    ratings_key_bytes: float
    """MEMORY USAGE of a user's ratings list (every rating kept, with its quantized head outputs), mean."""
    used_memory_per_user: float
    """Growth of INFO used_memory per added user (second half of the users): both keys plus the keyspace's
    per-key overhead."""

    @property
    def per_rating_bytes(self) -> float:
        return self.ratings_key_bytes / self.ratings_per_user


def digest(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "little")).hexdigest()


def ratings_for(rng: np.random.Generator, user: int, count: int) -> list[RatingRecord]:
    """`count` ratings with plausible head outputs (values do not change sizes, only shapes do; content
    must be probabilities, which the rating encoding checks)."""
    packed = rng.random((count, PACKED_DIM), dtype=np.float32)
    values = rng.random(count)
    return [
        RatingRecord(digest(user * 1_000_003 + k), float(values[k]), RatingScale.UNIT, packed[k])
        for k in range(count)
    ]


async def measure(url: str, layout: FeatureLayout, users: int, per_user: int, seed: int = 0) -> Measurement:
    """Writes `users` users with `per_user` ratings each into an empty Redis and measures them."""
    sync = redis.Redis.from_url(url)
    sync.flushall()
    store = RedisProfileStore(StoreConfig(url=url))
    rng = np.random.default_rng(seed)
    prior = Prior.zero(layout.dim)
    half = users // 2
    memory = []
    try:
        for u in range(users):
            if u == half:  # the second half's growth is the marginal cost (no script cache, no buffers)
                memory.append(int(sync.info("memory")["used_memory"]))
            await store.add_ratings(
                TENANT, f"user-{u}", ratings_for(rng, u, per_user), layout=layout, prior=prior
            )
    finally:
        await store.close()
    memory.append(int(sync.info("memory")["used_memory"]))
    profile, ratings = [], []
    for u in range(users):
        keys = store.keys.user_keys(TENANT, f"user-{u}")
        profile.append(int(sync.memory_usage(keys[0], samples=0) or 0))
        ratings.append(int(sync.memory_usage(keys[1], samples=0) or 0))
    sync.flushall()
    sync.close()
    return Measurement(layout.key, per_user, users, float(np.mean(profile)), float(np.mean(ratings)),
                       (memory[1] - memory[0]) / (users - half))  # fmt: skip


def feature_cache_entry_bytes(url: str, images: int = 500) -> float:
    """MEMORY USAGE of one cached image's head outputs (key by digest, with its TTL), mean."""

    async def fill() -> None:
        store = RedisProfileStore(StoreConfig(url=url))
        try:
            outputs = HeadOutputs.from_packed(np.zeros((images, PACKED_DIM), np.float32))
            await store.put_features([digest(i) for i in range(images)], outputs)
        finally:
            await store.close()

    asyncio.run(fill())
    with redis.Redis.from_url(url) as sync:
        keys = list(sync.scan_iter(match="*:feat:*", count=1000))
        sizes = [int(sync.memory_usage(k, samples=0) or 0) for k in keys]
        sync.flushall()
    if len(sizes) != images:
        raise RuntimeError(f"expected {images} cached feature keys, found {len(sizes)}")
    return float(np.mean(sizes))


def extrapolate(m: Measurement, users: int) -> float:
    """GiB of used_memory for `users` users like these (before fragmentation and replicas)."""
    return m.used_memory_per_user * users / 2**30


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measures each (layout, ratings per user) on a fresh redis-server (or --url) and prints it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--ratings", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--url", default=None, help="an EMPTY Redis to measure in (it is flushed!)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    server = None if args.url else RedisServer().start()
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        results = [
            asyncio.run(measure(url, FeatureLayout(with_embedding), args.users, per_user))
            for with_embedding in (False, True)
            for per_user in args.ratings
        ]
        feature_bytes = feature_cache_entry_bytes(url)
        version = server_version(server.binary) if server else "external"
    finally:
        if server is not None:
            server.stop()
    print(f"redis: {version}; {args.users} users per row; bytes; GiB = used_memory x users")
    print(f"{'layout':<22}{'ratings':>8}{'profile':>10}{'ratings':>10}{'/rating':>9}{'per user':>10}"
          f"{'1M GiB':>9}{'100M GiB':>10}{'1B GiB':>9}")  # fmt: skip
    for m in results:
        print(f"{m.layout:<22}{m.ratings_per_user:>8}{m.profile_key_bytes:>10.0f}{m.ratings_key_bytes:>10.0f}"
              f"{m.per_rating_bytes:>9.0f}{m.used_memory_per_user:>10.0f}{extrapolate(m, 10**6):>9.1f}"
              f"{extrapolate(m, 10**8):>10.0f}{extrapolate(m, 10**9):>9.0f}")  # fmt: skip
    print(f"feature cache: {feature_bytes:.0f} bytes per cached image")
    if args.json:
        with open(args.json, "w") as out:
            rows = [{**asdict(m), "per_rating_bytes": m.per_rating_bytes} for m in results]
            json.dump(
                {"redis": version, "results": rows, "feature_cache_entry_bytes": feature_bytes}, out, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
