"""Operator commands for the profile store: learn a tenant's population prior, and measure the store.

python -m piaa_personalization.store.tools learn-prior --redis-url URL --tenant default
python -m piaa_personalization.store.tools bench [--redis-url URL]   # local redis-server if no URL
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from piaa_personalization.model.residual import (
    PACKED_DIM,
    PRIOR_FIT,
    FeatureLayout,
    HeadOutputs,
    Prior,
    RatingScale,
    SufficientStats,
    fit,
)
from piaa_personalization.store.redis_server import RedisServer
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore, StoreConfig, StoreError


async def learn_prior(url: str, tenant: str, with_embedding: bool, min_ratings: int) -> dict[str, Any]:
    """Learns and stores the tenant's prior; returns a summary."""
    store = RedisProfileStore(StoreConfig(url=url))
    try:
        layout = FeatureLayout(with_embedding)
        prior = await store.learn_prior(tenant, layout, min_ratings=min_ratings, hyper=PRIOR_FIT)
        return {"tenant": tenant, "layout": layout.key, "users": prior.n_users, "stored": prior.n_users >= 2}
    finally:
        await store.close()


def _records(seed: int, n: int) -> list[RatingRecord]:
    rng = np.random.default_rng(seed)
    packed = rng.uniform(0, 1, (n, PACKED_DIM)).astype(np.float32)
    return [
        RatingRecord(hashlib.sha256(f"{seed}/{i}".encode()).hexdigest(), float(rng.integers(1, 6)),
                     RatingScale.STARS_1_5, packed[i])
        for i in range(n)
    ]  # fmt: skip


async def _best_ms(fn: Callable[[], Awaitable[object]], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


async def bench(url: str, users: int, concurrent: int, repeat: int) -> dict[str, Any]:
    """Side-by-side timings (best of `repeat`, milliseconds) on one Redis; ratios are what to compare."""
    store = RedisProfileStore(StoreConfig(url=url))
    layout, prior = FeatureLayout(), Prior.zero(FeatureLayout().dim)
    tenant = "bench"
    try:
        ids = [f"u{i}" for i in range(users)]
        for i, user in enumerate(ids):
            await store.add_ratings(tenant, user, _records(i, 5), layout=layout, prior=prior)
        digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(users)]
        await store.put_features(digests, HeadOutputs.from_packed(np.zeros((users, PACKED_DIM))))

        async def one_by_one_profiles() -> None:
            for user in ids:
                await store.get_profiles(tenant, [user])

        async def one_by_one_features() -> None:
            for d in digests:
                await store.get_features([d])

        out: dict[str, Any] = {"users": users}
        out["get_profiles_batch_ms"] = await _best_ms(lambda: store.get_profiles(tenant, ids), repeat)
        out["get_profiles_one_by_one_ms"] = await _best_ms(one_by_one_profiles, repeat)
        out["get_features_batch_ms"] = await _best_ms(lambda: store.get_features(digests), repeat)
        out["get_features_one_by_one_ms"] = await _best_ms(one_by_one_features, repeat)

        records = _records(10_000, concurrent)
        start = time.perf_counter()
        await asyncio.gather(
            *[store.add_ratings(tenant, "hot", [r], layout=layout, prior=prior) for r in records]
        )
        elapsed = time.perf_counter() - start
        out[f"add_ratings_{concurrent}_concurrent_one_user_per_s"] = concurrent / elapsed
        start = time.perf_counter()
        for r in _records(20_000, concurrent):
            await store.add_ratings(tenant, "calm", [r], layout=layout, prior=prior)
        out[f"add_ratings_{concurrent}_sequential_per_s"] = concurrent / (time.perf_counter() - start)
        for dim in (21, 85):
            rng = np.random.default_rng(dim)
            x = rng.normal(size=(50, dim))
            y = x @ rng.normal(0, 0.1, dim) + rng.normal(0, 0.1, 50)  # a user with a taste, plus noise
            stats, p = SufficientStats.from_data(x, y), Prior.zero(dim)
            start = time.perf_counter()
            for _ in range(repeat * 10):
                fit(stats, p)
            out[f"fit_d{dim}_ms"] = (time.perf_counter() - start) / (repeat * 10) * 1e3
        out["batch_speedup_profiles"] = out["get_profiles_one_by_one_ms"] / out["get_profiles_batch_ms"]
        out["batch_speedup_features"] = out["get_features_one_by_one_ms"] / out["get_features_batch_ms"]
        return out
    finally:
        for user in ("hot", "calm", *[f"u{i}" for i in range(users)]):
            await store.delete_user(tenant, user)
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry; prints one JSON object; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m piaa_personalization.store.tools", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("learn-prior", help="learn and store a tenant's population prior")
    lp.add_argument("--redis-url", required=True)
    lp.add_argument("--tenant", default="default")
    lp.add_argument("--with-embedding", action="store_true")
    lp.add_argument("--min-ratings", type=int, default=10)
    b = sub.add_parser("bench", help="time batch vs one-by-one reads, concurrent writes and fits")
    b.add_argument("--redis-url", help="default: start a local redis-server")
    b.add_argument("--users", type=int, default=100)
    b.add_argument("--concurrent", type=int, default=200)
    b.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        if args.command == "learn-prior":
            result = asyncio.run(
                learn_prior(args.redis_url, args.tenant, args.with_embedding, args.min_ratings)
            )
        elif args.redis_url:
            result = asyncio.run(bench(args.redis_url, args.users, args.concurrent, args.repeat))
        else:
            with RedisServer() as server:
                result = asyncio.run(bench(server.url, args.users, args.concurrent, args.repeat))
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
