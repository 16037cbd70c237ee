"""Profiles and ratings written in format 1 (by format 1's writer, as it was) are read, extended and
converted by the format-2 store, on a real redis-server and a real Redis Cluster."""

from __future__ import annotations

import hashlib
import struct
import time
import uuid

import numpy as np
import pytest
import redis

from piaa_personalization.model.residual import (
    FeatureLayout,
    HeadOutputs,
    Posterior,
    Prior,
    RatingScale,
    SufficientStats,
    fit,
)
from piaa_personalization.store import format as fmt
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore, StoreConfig

LAYOUT = FeatureLayout()
PRIOR = Prior.zero(LAYOUT.dim)
TENANT = "legacy"


# -- format 1's writer (store_format.py at commit 79e3a6e), reproduced to write real format-1 data ----------


def encode_rating_v1(r: RatingRecord) -> bytes:
    fs = r.fs_version.encode()
    head = struct.pack("<cBdd32sB", b"1", int(r.scale), r.value, r.time, bytes.fromhex(r.digest), len(fs))
    return head + fs + r.outputs.astype("<f4").tobytes()


def encode_fit_v1(
    layout: FeatureLayout, stats: SufficientStats, post: Posterior, now: float, covers: int
) -> dict[str, bytes | str]:
    weights = post.mean.astype("<f4")
    lean_key = layout.key.encode()
    lean = struct.pack("<cqqdddB", b"1", stats.n, covers, now, post.alpha, post.lam, len(lean_key))
    return {
        "format": b"1",
        "feature_space_version": layout.fs_version,
        "dim": str(layout.dim),
        "weights": weights.tobytes(),
        "gram": stats.gram[np.triu_indices(layout.dim)].astype("<f8").tobytes(),
        "moment": stats.moment.astype("<f8").tobytes(),
        "yy": repr(stats.yy),
        "n": str(stats.n),
        "alpha": repr(post.alpha),
        "lam": repr(post.lam),
        "updated_at": repr(now),
        "lean": lean + lean_key + weights.tobytes(),
    }


# ------------------------------------------------------------------------------------------------------------


def records(seed: int, n: int) -> list[RatingRecord]:
    rng = np.random.default_rng(seed)
    return [
        RatingRecord(
            hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
            float(rng.integers(1, 6)),
            RatingScale.STARS_1_5,
            np.r_[
                rng.uniform(0.2, 0.8), rng.uniform(-1, 1, 10), rng.dirichlet(np.ones(10)), rng.normal(size=64)
            ],
            time=1_700_000_000.5 + i,
        )
        for i in range(n)
    ]


def exact_stats(recs: list[RatingRecord]) -> SufficientStats:
    x = LAYOUT.features(HeadOutputs.from_packed(np.stack([r.outputs for r in recs])))
    return SufficientStats.from_data(x, [r.unit - float(r.outputs[0]) for r in recs])


def write_v1_user(client: redis.Redis | redis.RedisCluster, user: str, recs: list[RatingRecord]) -> Posterior:
    """What format 1's append and commit left for a user whose ratings were all folded."""
    keys = fmt.Keys()
    stats = exact_stats(recs)
    post = fit(stats, PRIOR)
    client.rpush(keys.ratings(TENANT, user), *[encode_rating_v1(r) for r in recs])
    fields = {
        **encode_fit_v1(LAYOUT, stats, post, time.time(), len(recs)),
        "epoch": uuid.uuid4().hex,
        "num_ratings": len(recs),
        "layout": LAYOUT.key,
        "covers": len(recs),
        "version": 1,
    }
    client.hset(keys.profile(TENANT, user), mapping=fields)  # type: ignore[arg-type]
    return post


@pytest.fixture
def sync_client(redis_target: tuple[str, str]) -> redis.Redis | redis.RedisCluster:
    url, mode = redis_target
    return redis.RedisCluster.from_url(url) if mode == "cluster" else redis.Redis.from_url(url)


async def test_format1_user_is_read_then_converted_by_the_next_rating(
    redis_target: tuple[str, str], sync_client: redis.Redis | redis.RedisCluster
) -> None:
    url, mode = redis_target
    old, new = records(1, 10), records(2, 5)
    post_v1 = write_v1_user(sync_client, "old-timer", old)
    store = RedisProfileStore(StoreConfig(url=url, mode=mode))
    try:
        # Read as it is: scoring's lean read, the full profile with its float64 statistics, every rating.
        (lean,) = await store.get_profiles(TENANT, ["old-timer"])
        assert lean is not None and lean.is_current(LAYOUT) and (lean.n, lean.covers) == (10, 10)
        np.testing.assert_array_equal(lean.weights, post_v1.mean.astype(np.float32))  # type: ignore[arg-type]
        full = await store.get_profile(TENANT, "old-timer")
        assert full is not None and full.stats is not None and full.version == 1
        np.testing.assert_array_equal(full.stats.gram, exact_stats(old).gram)
        stored = await store.get_ratings(TENANT, "old-timer")
        assert [(r.digest, r.time) for r in stored] == [(r.digest, r.time) for r in old]
        np.testing.assert_array_equal(
            np.stack([r.outputs for r in stored]), np.stack([r.outputs for r in old])
        )

        # The next rating folds into the format-1 statistics and commits format 2 in their place.
        profile, _ = await store.add_ratings(TENANT, "old-timer", new, layout=LAYOUT, prior=PRIOR)
        assert (profile.num_ratings, profile.n, profile.covers, profile.version) == (15, 15, 15, 2)
        pkey = fmt.Keys().profile(TENANT, "old-timer")
        assert sorted(k.decode() for k in sync_client.hkeys(pkey)) == sorted(fmt.PROFILE_FIELDS)
        assert sync_client.hget(pkey, "format") == b"2"
        converted = await store.get_profile(TENANT, "old-timer")
        assert converted is not None and converted.stats is not None
        quantized_new = [
            RatingRecord(r.digest, r.value, r.scale, fmt.quantized(r.outputs), time=r.time) for r in new
        ]
        expect = exact_stats(old + quantized_new)
        np.testing.assert_allclose(converted.stats.gram, expect.gram, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(converted.stats.moment, expect.moment, rtol=1e-6, atol=1e-5)

        # The list now mixes both formats; a refit in another layout reads all of them.
        raw = sync_client.lrange(fmt.Keys().ratings(TENANT, "old-timer"), 0, -1)
        assert [bytes(r[:1]) for r in raw] == [b"1"] * 10 + [b"2"] * 5  # type: ignore[union-attr]
        refit = await store.refit(TENANT, "old-timer", layout=FeatureLayout(True), prior=Prior.zero(85))
        assert refit is not None and (refit[0].n, refit[0].covers) == (15, 15)
    finally:
        await store.close()
        sync_client.close()
