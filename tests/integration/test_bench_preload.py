"""The benchmark's preloaded profiles read back through the real store as usable profiles, and the Ray
peer's pipeline (without Ray) scores with the same math, against a real redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from piaa_bench.loadgen import user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.ray_peer import PeerModel
from piaa_personalization.model import residual
from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig
from piaa_triton.paths import repository_dir
from tests.fixtures.photos import Photo

pytestmark = pytest.mark.integration


async def _read(url: str, users: list[str]) -> list:
    store = RedisProfileStore(StoreConfig(url=url))
    try:
        return await store.get_profiles("default", users)
    finally:
        await store.close()


def test_preloaded_profiles_are_current_in_the_gateway_layout(redis_url: str) -> None:
    preload_profiles(redis_url, 2_500, ratings=12, chunk=1_000)
    ids = user_ids(2_500)
    profiles = asyncio.run(_read(redis_url, [ids[0], ids[1_234], ids[-1], "bench-u2500"]))
    layout = residual.FeatureLayout()
    for p in profiles[:3]:
        assert p is not None and p.is_current(layout) and p.num_ratings == 12
        assert p.weights is not None and 0 < np.abs(p.weights).max() < 1
    assert not np.array_equal(profiles[0].weights, profiles[1].weights)  # every user has their own
    assert profiles[3] is None  # no user beyond the count


def test_peer_pipeline_scores_with_the_gateway_math(redis_url: str, photos: list[Photo]) -> None:
    preload_profiles(redis_url, 3)
    peer = PeerModel(repository_dir("cpu"), redis_url)
    images = [p.path.read_bytes() for p in photos[:3]]
    items = [(images[0], "bench-u1", False), (images[1], "bench-u1", True), (images[2], "nobody", False)]

    async def run() -> tuple[list[float], list]:
        try:
            return await peer.score(items), await peer.store.get_profiles("default", ["bench-u1"])
        finally:
            await peer.store.close()

    scores, (profile,) = asyncio.run(run())
    heads = peer.infer(images)
    layout = residual.FeatureLayout()
    expected = residual.personalize(heads.generic[:1], layout.features(heads.take([0])), profile.weights)
    assert scores[0] == pytest.approx(float(expected[0]), abs=1e-5)
    assert scores[0] != pytest.approx(float(heads.generic[0]), abs=1e-6)  # the residual was applied
    # generic_only, and a user without a profile, get the generic score.
    assert scores[1:] == pytest.approx([float(g) for g in heads.generic[1:]], abs=1e-5)
