"""deploy/redis_sizing.py on a real redis-server: what it reports is consistent with the store's format,
and a user of the paper layout with 50 ratings costs at most 10 kB of lasting Redis state."""

from __future__ import annotations

import asyncio

import numpy as np

from piaa_personalization.model.residual import PACKED_DIM, FeatureLayout, RatingScale
from piaa_personalization.store.format import RatingRecord, encode_rating
from piaa_personalization.store.redis_server import RedisServer
from tests.deploy_scripts import load


def test_measured_sizes_match_the_stored_encodings() -> None:
    sizing = load("redis_sizing.py")
    rating = RatingRecord("ab" * 32, 0.5, RatingScale.UNIT, np.zeros(PACKED_DIM, np.float32))
    encoded = len(encode_rating(rating))
    for with_embedding in (False, True):
        layout = FeatureLayout(with_embedding)
        d = layout.dim
        # A fresh server per layout: memory freed by an earlier measurement would be reused by malloc and
        # hide part of the growth that used_memory_per_user reads.
        with RedisServer() as server:
            m = asyncio.run(sizing.measure(server.url, layout, users=12, per_user=8))
        # The profile hash holds at least the weights (float32, in `lean`) and the statistics (float32 gram
        # triangle and moment, n and yy) of its layout...
        payload = 4 * d + 12 + 4 * (d + d * (d + 1) // 2)
        assert payload < m.profile_key_bytes < 1.2 * payload + 1024, (layout.key, m)
        # ...the ratings list every encoded rating, with a bounded per-element overhead.
        assert encoded <= m.per_rating_bytes < encoded + 64, (encoded, m.per_rating_bytes)
        keys = m.profile_key_bytes + m.ratings_key_bytes
        assert 0.9 * keys < m.used_memory_per_user < 1.5 * keys, m
    assert sizing.extrapolate(m, 10**6) == m.used_memory_per_user * 10**6 / 2**30


PER_USER_LIMIT = 10_000
"""Bytes of lasting Redis state (profile hash + ratings list + their keys) per user of the paper layout
with 50 ratings (format 1 took 24.5 kB; store/format.md has the arithmetic of format 2)."""


def test_a_paper_layout_user_with_50_ratings_costs_at_most_10_kb() -> None:
    sizing = load("redis_sizing.py")
    with RedisServer() as server:
        m = asyncio.run(sizing.measure(server.url, FeatureLayout(), users=60, per_user=50))
    print(f"\nfs1/paper20, 50 ratings: {m.used_memory_per_user:.0f} bytes per user ({m})")
    assert m.profile_key_bytes + m.ratings_key_bytes < m.used_memory_per_user <= PER_USER_LIMIT, m
