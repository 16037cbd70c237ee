"""Priors that learn themselves, against a real redis-server and a real Redis Cluster: enrolment past the
threshold relearns the tenant's prior once however many gateways see it, growth relearns it again, the
cost bound holds, and the gateway's store then fits new ratings under the learned prior."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from piaa_personalization.core.personalizer import Head, StoreAdapter
from piaa_personalization.model.residual import (
    FeatureLayout,
    HeadOutputs,
    Prior,
    RatingScale,
    SufficientStats,
    fit,
)
from piaa_personalization.store import format as fmt
from piaa_personalization.store.prior_learning import PriorLearner, RelearnPolicy, learn_from
from piaa_personalization.store.redis_store import RatingRecord, RedisProfileStore, StoreConfig

LAYOUT = FeatureLayout()
TENANT = "growing"
POLICY = RelearnPolicy(min_users=5, growth=2.0, min_ratings=10)


def packed_rows(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            np.r_[
                rng.uniform(0.2, 0.8), rng.uniform(-1, 1, 10), rng.dirichlet(np.ones(10)), rng.normal(size=64)
            ]
            for _ in range(n)
        ]
    ).astype(np.float32)


def records(seed: int, n: int) -> list[RatingRecord]:
    """n ratings of a user who likes content cluster 0 (so the population has a taste to learn)."""
    rows, rng = packed_rows(seed, n), np.random.default_rng(seed + 1)
    stars = np.clip(np.rint(1 + 4 * (rows[:, 0] + 0.6 * rows[:, 11] + rng.normal(0, 0.05, n))), 1, 5)
    return [
        RatingRecord(hashlib.sha256(f"{seed}/{i}".encode()).hexdigest(), float(s), RatingScale.STARS_1_5, r)
        for i, (r, s) in enumerate(zip(rows, stars, strict=True))
    ]


def stats_of(recs: list[RatingRecord]) -> SufficientStats:
    """The statistics of the ratings as the store keeps them (format 2: quantized head outputs)."""
    packed = np.stack([fmt.quantized(r.outputs) for r in recs])
    x = LAYOUT.features(HeadOutputs.from_packed(packed))
    return SufficientStats.from_data(x, [r.unit - float(p[0]) for r, p in zip(recs, packed, strict=True)])


async def enrol(store: RedisProfileStore, learner: PriorLearner, user: int, n: int = 12) -> bool:
    """A user's first n ratings through the store, then the enrolment count; returns whether a relearn
    is due."""
    profile, _ = await store.add_ratings(
        TENANT, f"user{user}", records(user, n), layout=LAYOUT, prior=Prior.zero(LAYOUT.dim)
    )
    return await learner.note_ratings(TENANT, profile.num_ratings, n)


async def test_enrolment_past_the_threshold_relearns_once_and_the_prior_is_used(
    gateways: list[RedisProfileStore],
) -> None:
    first, second = (PriorLearner(s, LAYOUT, POLICY) for s in gateways)
    due = [await enrol(gateways[0], first, u) for u in range(4)]
    assert due == [False] * 4 and await gateways[0].get_prior(TENANT, LAYOUT) is None
    # a user below min_ratings is not enrolled; more ratings of an enrolled user do not count again
    assert not await enrol(gateways[0], first, 99, n=5)
    profile, _ = await gateways[0].add_ratings(
        TENANT, "user0", records(1000, 3), layout=LAYOUT, prior=Prior.zero(LAYOUT.dim)
    )
    assert not await first.note_ratings(TENANT, profile.num_ratings, 3)
    assert await first.state(TENANT) == (4, 0)

    assert await enrol(gateways[1], second, 4)  # the fifth enrolled user, seen by the other gateway
    # both gateways try at once: one learns, the other finds the lock (or the work done)
    results = await asyncio.gather(first.relearn(TENANT), second.relearn(TENANT))
    learned = [p for p in results if p is not None]
    assert len(learned) == 1 and learned[0].n_users == 5
    assert await first.state(TENANT) == (5, 5)
    assert await first.relearn(TENANT) is None  # no longer due
    stored = await gateways[1].get_prior(TENANT, LAYOUT)
    assert stored is not None and stored.n_users == 5
    np.testing.assert_allclose(stored.mean, learned[0].mean)
    # the enrolled users' fits, as learn_from makes them (user 99 has too few ratings to teach it)
    expected = learn_from(
        [stats_of(records(u, 12) + (records(1000, 3) if u == 0 else [])) for u in range(5)], 21
    )
    np.testing.assert_allclose(stored.mean, expected.mean, rtol=1e-4, atol=1e-6)  # float32 statistics
    assert stored.learned_at == learned[0].learned_at > 0

    # the users fitted under the zero prior were refitted under the learned one (user 99 too: a user with
    # few ratings is the one a prior helps most)
    for user, recs in [("user3", records(3, 12)), ("user99", records(99, 5))]:
        got = await gateways[1].get_profile(TENANT, user)
        assert got is not None and got.num_ratings == len(recs)
        np.testing.assert_allclose(got.weights, fit(stats_of(recs), stored).mean, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got.weights, fit(stats_of(recs), Prior.zero(LAYOUT.dim)).mean, atol=1e-3)
    # a late refit of the same ratings under the older prior (a gateway's stale cache) changes nothing
    await gateways[0].refit(TENANT, "user3", layout=LAYOUT, prior=Prior.zero(LAYOUT.dim))
    got = await gateways[1].get_profile(TENANT, "user3")
    assert got is not None
    np.testing.assert_allclose(got.weights, fit(stats_of(records(3, 12)), stored).mean, rtol=1e-5, atol=1e-6)

    # the gateway's store picks the prior up (after its cache's TTL) and fits new ratings under it
    adapter = StoreAdapter(gateways[1], with_embedding=False, prior_ttl_s=0.0)
    assert (await adapter.prior(TENANT)).n_users == 5
    new = records(500, 4)
    profile = await adapter.add_ratings(
        TENANT,
        "newcomer",
        digests=[r.digest for r in new],
        heads=[Head(r.outputs) for r in new],
        values=[r.value for r in new],
        scales=[r.scale for r in new],
    )
    assert profile is not None
    stats = stats_of(new)
    np.testing.assert_allclose(profile.weights, fit(stats, stored).mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(profile.weights, fit(stats, Prior.zero(LAYOUT.dim)).mean, atol=1e-3)

    # growth: at twice the users of the last learning, it is relearned
    due = [await enrol(gateways[0], first, u) for u in range(5, 10)]
    assert due == [False] * 4 + [True]
    task = first.start(TENANT)
    await first.drain()
    relearned = task.result()
    assert relearned is not None and relearned.n_users == 10
    assert (await gateways[1].get_prior(TENANT, LAYOUT)).n_users == 10  # type: ignore[union-attr]


async def test_a_learning_reads_at_most_max_users(gateways: list[RedisProfileStore]) -> None:
    learner = PriorLearner(gateways[0], LAYOUT, RelearnPolicy(min_users=4, min_ratings=10, max_users=3))
    due = [await enrol(gateways[0], learner, u) for u in range(6)]
    assert due.index(True) == 3
    prior = await learner.relearn(TENANT)
    assert prior is not None and prior.n_users == 3
    assert await learner.state(TENANT) == (6, 6)


async def test_a_held_lock_stops_a_second_learner(gateways: list[RedisProfileStore]) -> None:
    learner = PriorLearner(gateways[0], LAYOUT, RelearnPolicy(min_users=2, min_ratings=10))
    for u in range(2):
        await enrol(gateways[0], learner, u)
    async with gateways[0].conn.guard():
        await gateways[0].client.set(learner.lock_key(TENANT), "another gateway", px=60_000)
    assert await learner.relearn(TENANT) is None
    async with gateways[0].conn.guard():
        assert await gateways[0].client.get(learner.lock_key(TENANT)) == b"another gateway"  # not ours
        await gateways[0].client.delete(learner.lock_key(TENANT))
    assert (await learner.relearn(TENANT)) is not None


def test_the_policy_is_checked() -> None:
    assert not POLICY.due(4, 0) and POLICY.due(5, 0) and not POLICY.due(9, 5) and POLICY.due(10, 5)
    assert not RelearnPolicy(min_users=0).due(1000, 0)
    with pytest.raises(ValueError):
        RelearnPolicy(growth=1.0)


async def test_gateways_relearn_from_their_add_ratings(gateways: list[RedisProfileStore]) -> None:
    """The gateway's store counts enrolments as AddRatings records them: the gateway that enrols the
    fifth user relearns in the background, the other does not, and both then fit under the new prior."""
    a, b = (StoreAdapter(s, False, prior_ttl_s=3600.0, relearn=POLICY) for s in gateways)

    async def add(adapter: StoreAdapter, user: int, n: int = 12) -> None:
        recs = records(user, n)
        await adapter.add_ratings(
            TENANT,
            f"user{user}",
            digests=[r.digest for r in recs],
            heads=[Head(r.outputs) for r in recs],
            values=[r.value for r in recs],
            scales=[r.scale for r in recs],
        )

    assert (await a.prior(TENANT)).n_users == 0  # cached for an hour: only a's own relearning drops it
    for user in range(4):
        await add(a if user % 2 else b, user)
    assert a.learner is not None and b.learner is not None
    assert not a.learner._tasks and not b.learner._tasks
    await add(b, 4)
    assert len(b.learner._tasks) == 1 and not a.learner._tasks
    await b.learner.drain()
    assert (await b.prior(TENANT)).n_users == 5  # b dropped its cached copy when the prior was stored
    # no change listener runs here, so a keeps its copy until the TTL (a gateway's listener drops it at
    # once: test_prior_relearn.py)
    assert (await a.prior(TENANT)).n_users == 0
    assert await b.learner.state(TENANT) == (5, 5)
    a.prior_ttl_s = 0.0
    assert (await a.prior(TENANT)).n_users == 5


async def test_relearning_needs_no_command_beyond_the_store_acl(redis_url: str) -> None:
    """As the least-privilege Redis user the gateway runs as (redis_store.acl_rules)."""
    import redis as sync_redis

    from piaa_personalization.store.redis_store import acl_rules

    with sync_redis.Redis.from_url(redis_url) as admin:
        admin.execute_command("ACL", "SETUSER", "learner", "on", ">pw", *acl_rules())
    url = redis_url.replace("redis://", "redis://learner:pw@", 1)
    store = RedisProfileStore(StoreConfig(url=url))
    try:
        learner = PriorLearner(store, LAYOUT, RelearnPolicy(min_users=2, min_ratings=10))
        assert [await enrol(store, learner, u) for u in range(2)] == [False, True]
        prior = await learner.relearn(TENANT)
        assert prior is not None and prior.n_users == 2
    finally:
        await store.close()
        with sync_redis.Redis.from_url(redis_url) as admin:
            admin.execute_command("ACL", "DELUSER", "learner")
