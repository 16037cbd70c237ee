"""The feature-space migration against a real redis-server and a real Redis Cluster: every profile moves into
the new space from the stored backbone features, exactly as a fresh fit there; ratings recorded meanwhile are
caught up; an interrupted run resumes; a rerun changes nothing; deleted users stay deleted. The heads of
the new space are a fixed numpy function here (the real heads model runs in test_upgrade_drill.py)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest

from piaa_personalization.model.residual import (
    PACKED_DIM,
    FeatureLayout,
    HeadOutputs,
    Prior,
    RatingScale,
    SufficientStats,
    fit,
)
from piaa_personalization.store import backbone, rollout
from piaa_personalization.store.backbone import BackboneStore
from piaa_personalization.store.migration import Interrupted, Migration, Plan
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore, StoreConfig

OLD, NEW = FeatureLayout(fs_version="fs1"), FeatureLayout(fs_version="fs2")
TENANT = "acme"
_RNG = np.random.default_rng(42)
_PROJECTION = _RNG.normal(0, 0.02, (1280, PACKED_DIM)).astype(np.float32)


def new_heads_of(features: np.ndarray) -> np.ndarray:
    """The stand-in new heads: a fixed projection squashed into each output's range (packed [N, 85])."""
    z = np.tanh(features.astype(np.float32) @ _PROJECTION)
    out = z.copy()
    out[:, 0] = 0.5 + 0.4 * z[:, 0]  # generic in [0, 1]
    content = np.exp(z[:, 11:21])
    out[:, 11:21] = content / content.sum(1, keepdims=True)
    return out.astype(np.float32)


async def new_heads(features: np.ndarray) -> np.ndarray:
    return new_heads_of(features)


def image(seed: int, i: int) -> tuple[str, np.ndarray]:
    digest = hashlib.sha256(f"img-{seed}-{i}".encode()).hexdigest()
    feature = np.random.default_rng([seed, i]).gamma(0.6, 0.5, 1280).astype(np.float32)
    return digest, feature


def old_record(digest: str, value: float) -> RatingRecord:
    packed = np.r_[0.5, np.zeros(10), np.full(10, 0.1), np.zeros(64)].astype(np.float32)
    return RatingRecord(digest, value, RatingScale.STARS_1_5, packed, "fs1")


@pytest.fixture
async def store(redis_target: tuple[str, str]) -> AsyncIterator[RedisProfileStore]:
    url, mode = redis_target
    # Its own key prefix: the migration counts every user under the prefix, and tests that use the session
    # redis-server without this fixture's flush (the session gateway's) leave users under "piaa".
    s = RedisProfileStore(StoreConfig(url=url, mode=mode, key_prefix=f"mig{uuid.uuid4().hex[:8]}"))
    yield s
    await s.close()


async def enrol(store: RedisProfileStore, users: int, ratings: int) -> dict[str, list[tuple[str, float]]]:
    """Users rate images (in fs1) whose backbone features are stored; returns each user's (digest, stars)."""
    backbones = BackboneStore(store.conn, store.config.key_prefix)
    images = [image(0, i) for i in range(ratings + users)]
    await backbones.put([d for d, _ in images], np.stack([f for _, f in images]))
    out = {}
    for u in range(users):
        mine = [(images[u + k][0], float(1 + (u * 7 + k * 3) % 5)) for k in range(ratings)]
        await store.add_ratings(
            TENANT, f"user-{u}", [old_record(d, v) for d, v in mine], layout=OLD, prior=Prior.zero(OLD.dim)
        )
        out[f"user-{u}"] = mine
    return out


def expected_weights(rated: list[tuple[str, float]]) -> np.ndarray:
    # The migration sees the stored 8-bit features, so the expected fit is made from those.
    features = {d: backbone.decode(backbone.encode(f)) for d, f in (image(0, i) for i in range(200))}
    packed = new_heads_of(np.stack([features[d] for d, _ in rated]))
    x = NEW.features(HeadOutputs.from_packed(packed))
    y = [(v - 1) / 4 - float(p[0]) for (_, v), p in zip(rated, packed, strict=True)]
    return fit(SufficientStats.from_data(x, y), Prior.zero(NEW.dim)).mean


async def test_every_profile_moves_into_the_new_space_as_a_fresh_fit(store: RedisProfileStore) -> None:
    rated = await enrol(store, users=7, ratings=9)
    job = Migration(store, Plan("fs1", "fs2", batch=3), new_heads)
    assert await job.count() == (7, 63)  # the dry run's numbers
    counts = await job.run_pass()
    assert (counts.users, counts.migrated, counts.ratings, counts.without_features) == (7, 7, 63, 0)
    assert counts.heads_computed == 15  # each image once, shared by the users who rated it
    new_store = store.in_space("fs2")
    for user, mine in rated.items():
        profile = await new_store.get_profile(TENANT, user)
        assert profile is not None and profile.layout_key == NEW.key and profile.num_ratings == 9
        np.testing.assert_allclose(profile.weights, expected_weights(mine), rtol=2e-3, atol=2e-4)
        old = await store.get_profile(TENANT, user)  # the old space's profile is untouched
        assert old is not None and old.layout_key == OLD.key
    again = await job.run_pass()  # idempotent: nothing left to do
    assert (again.migrated, again.current) == (0, 7)


async def test_ratings_recorded_during_the_migration_are_caught_up(store: RedisProfileStore) -> None:
    rated = await enrol(store, users=4, ratings=5)
    job = Migration(store, Plan("fs1", "fs2"), new_heads)
    await job.run_pass()
    digest, _ = image(0, 7)
    await store.add_ratings(
        TENANT, "user-1", [old_record(digest, 5.0)], layout=OLD, prior=Prior.zero(OLD.dim)
    )
    caught = await job.run_pass()
    assert (caught.migrated, caught.current) == (1, 3)
    profile = await store.in_space("fs2").get_profile(TENANT, "user-1")
    assert profile is not None and (profile.num_ratings, profile.n) == (6, 6)
    np.testing.assert_allclose(
        profile.weights, expected_weights([*rated["user-1"], (digest, 5.0)]), rtol=2e-3, atol=2e-4
    )


async def test_an_interrupted_run_resumes_where_it_stopped(store: RedisProfileStore) -> None:
    await enrol(store, users=12, ratings=3)
    job = Migration(store, Plan("fs1", "fs2", batch=2), new_heads)
    seen = []

    def stop_after_first(counts: object) -> None:
        seen.append(counts)
        job.stop_requested = True

    with pytest.raises(Interrupted):
        await job.run_pass(on_batch=stop_after_first)
    first = sum(c.migrated for c in seen)
    assert 0 < first < 12
    resumed = Migration(store, Plan("fs1", "fs2", batch=2), new_heads)
    rest = await resumed.run_pass()
    # A resumed SCAN may return a key twice but never skips one: every user is migrated exactly once.
    assert first + rest.migrated == 12 and rest.users >= 12 - first


async def test_ratings_without_a_backbone_feature_are_reported_not_invented(store: RedisProfileStore) -> None:
    await enrol(store, users=1, ratings=3)
    unknown = hashlib.sha256(b"never sent").hexdigest()
    await store.add_ratings(
        TENANT, "user-0", [old_record(unknown, 2.0)], layout=OLD, prior=Prior.zero(OLD.dim)
    )
    counts = await Migration(store, Plan("fs1", "fs2"), new_heads).run_pass()
    assert counts.without_features == 1 and counts.digests_without_backbone == {unknown}
    profile = await store.in_space("fs2").get_profile(TENANT, "user-0")
    assert profile is not None and (profile.num_ratings, profile.n, profile.covers) == (4, 3, 4)
    again = await Migration(store, Plan("fs1", "fs2"), new_heads).run_pass()
    assert again.migrated == 0  # not retried forever: its rebuild covered the whole list


async def test_a_switch_is_recorded_and_a_delete_removes_every_space(store: RedisProfileStore) -> None:
    await enrol(store, users=2, ratings=3)
    await Migration(store, Plan("fs1", "fs2"), new_heads).run_pass()
    state = await rollout.switch(store, "fs2", also=("fs1",))
    assert (state.active, state.previous, set(state.spaces)) == ("fs2", None, {"fs1", "fs2"})
    back = await rollout.switch(store, "fs1")
    assert (back.active, back.previous) == ("fs1", "fs2")
    new_store = store.in_space("fs2")
    new_store.other_spaces = ("fs1",)
    assert await new_store.delete_user(TENANT, "user-0") == 3  # both profiles and the ratings
    assert await store.get_profile(TENANT, "user-0") is None
    assert await new_store.get_profile(TENANT, "user-0") is None
    counts = await Migration(store, Plan("fs1", "fs2"), new_heads).run_pass()
    assert counts.users == 1  # the deleted user is not resurrected
