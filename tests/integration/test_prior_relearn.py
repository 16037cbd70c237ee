"""Relearning a tenant's prior, against a real redis-server and a real Redis Cluster (each test runs in
both modes), with the order of events forced: the new prior reaches another gateway's fits at once (its
change message), a learning reads at most max_users profiles in full (counted by the server), refits
fold and fit off the event loop, and the relearn lock outlives a learning longer than its TTL and fences
the write of a learner that lost it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest
import redis

from piaa_personalization.core.personalizer import Head, StoreAdapter
from piaa_personalization.core.profile_cache import ProfileCache
from piaa_personalization.model.residual import FeatureLayout, Prior, SufficientStats, fit
from piaa_personalization.store import prior_learning, redis_store
from piaa_personalization.store.prior_learning import PriorLearner, RelearnPolicy
from piaa_personalization.store.redis_store import RedisProfileStore
from tests.integration.test_prior_learning import records, stats_of

LAYOUT = FeatureLayout()
TENANT = "relearning"
POLICY = RelearnPolicy(min_users=4, growth=2.0, min_ratings=10)


async def enrol(store: RedisProfileStore, learner: PriorLearner, user: int, n: int = 12) -> bool:
    profile, _ = await store.add_ratings(
        TENANT, f"user{user}", records(user, n), layout=LAYOUT, prior=Prior.zero(LAYOUT.dim)
    )
    return await learner.note_ratings(TENANT, profile.num_ratings, n)


def primaries(store: RedisProfileStore) -> list[redis.Redis]:
    """Plain clients of every primary (the server itself when standalone), for INFO and CONFIG."""
    if store.config.mode == "standalone":
        return [redis.Redis.from_url(store.config.url)]
    cluster = redis.RedisCluster.from_url(store.config.url)
    nodes = [redis.Redis(host=n.host, port=int(n.port)) for n in cluster.get_primaries()]
    cluster.close()
    return nodes


def hgetall_calls(nodes: list[redis.Redis]) -> int:
    return sum(int(n.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)) for n in nodes)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Waits for `condition` (a barrier on something the test caused, checked every 10 ms)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def heard(store: RedisProfileStore, cache: ProfileCache[object], marker: str) -> None:
    """Publishes '<marker> -1' on the change channel from the tenant's node (where the prior's message
    was published, so the two reach every subscriber in that order) and waits until `cache`'s listener
    has applied it: every message published before it has been handled."""
    cache.put(marker, None)
    node = await store.conn.node_of(store.keys.prior(TENANT, LAYOUT))
    target = {"target_nodes": node} if node is not None else {}

    async def publish() -> None:
        async with store.conn.guard():
            await store.client.execute_command("PUBLISH", store.keys.changes, f"{marker} -1", **target)

    await publish()
    await until(lambda: cache.get(marker) is ProfileCache.MISS, f"the listener to hear {marker}")


async def test_a_relearned_prior_reaches_the_other_gateways_fits_at_once(
    gateways: list[RedisProfileStore],
) -> None:
    a, b = (StoreAdapter(s, False, prior_ttl_s=3600.0) for s in gateways)
    caches: list[ProfileCache[object]] = [ProfileCache(100, 60.0), ProfileCache(100, 60.0)]
    for cache, adapter in zip(caches, (a, b), strict=True):  # each gateway's change listener
        cache.start_listening(adapter.pubsub_client(), adapter.channel)
    try:
        # both listeners subscribed: a probe published now is heard (published again until it is)
        for cache in caches:
            cache.put("probe", None)
        while any(c.get("probe") is not ProfileCache.MISS for c in caches):
            async with gateways[0].conn.guard():
                await gateways[0].client.publish(gateways[0].keys.changes, "probe -1")
            await asyncio.sleep(0.05)

        assert (await b.prior(TENANT)).n_users == 0  # b caches the zero prior for an hour
        learner = PriorLearner(gateways[0], LAYOUT, POLICY)
        assert [await enrol(gateways[0], learner, u) for u in range(4)] == [False] * 3 + [True]
        learned = await learner.relearn(TENANT)  # on gateway a
        assert learned is not None and learned.n_users == 4
        await heard(gateways[0], caches[1], "after-the-prior")  # b's listener is past the prior's message

        new = records(700, 4)
        profile = await b.add_ratings(
            TENANT,
            "newcomer",
            digests=[r.digest for r in new],
            heads=[Head(r.outputs) for r in new],
            values=[r.value for r in new],
            scales=[r.scale for r in new],
        )
        assert profile is not None
        stored = await gateways[1].get_prior(TENANT, LAYOUT)
        assert stored is not None and stored.learned_at == learned.learned_at
        # Before the fix b fitted under its cached zero prior for up to prior_cache_ttl_s, and kept it.
        np.testing.assert_allclose(profile.weights, fit(stats_of(new), stored).mean, rtol=1e-5, atol=1e-6)
        assert not np.allclose(profile.weights, fit(stats_of(new), Prior.zero(LAYOUT.dim)).mean, atol=1e-3)
        assert (await b.prior(TENANT)).learned_at == learned.learned_at
    finally:
        for cache in caches:
            await cache.stop_listening()


async def test_a_learning_reads_at_most_max_users_profiles(gateways: list[RedisProfileStore]) -> None:
    store = gateways[0]
    policy = RelearnPolicy(min_users=4, min_ratings=10, max_users=3)
    learner = PriorLearner(store, LAYOUT, policy)
    for u in range(6):  # six enrolled users
        await enrol(store, learner, u)
    for u in range(100, 106):  # six who rated too little to teach the prior
        await enrol(store, learner, u, n=4)
    nodes = primaries(store)
    try:
        for n in nodes:
            n.config_resetstat()
        prior = await learner.relearn(TENANT)
        # Before the fix every profile of the tenant was read in full (HGETALL of all 12).
        assert hgetall_calls(nodes) <= policy.max_users
        assert prior is not None and prior.n_users == 3
    finally:
        for n in nodes:
            n.close()


async def test_the_refits_run_off_the_event_loop(
    gateways: list[RedisProfileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = gateways[0]
    learner = PriorLearner(store, LAYOUT, POLICY)
    for u in range(4):
        await enrol(store, learner, u)
    on_loop: list[bool] = []
    real_fit = redis_store.fit

    def watched_fit(stats: SufficientStats, prior: Prior, hyper: object = None) -> object:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            on_loop.append(False)
        return real_fit(stats, prior, hyper)  # type: ignore[arg-type]

    monkeypatch.setattr(redis_store, "fit", watched_fit)
    prior = await learner.relearn(TENANT)
    assert prior is not None and prior.n_users == 4
    assert len(on_loop) == 4  # one refit per user under the new prior
    assert not any(on_loop)  # before the fix: every one on the event loop


class Paused:
    """learn_from that stops in its first call until `go` is set (the learning takes as long as the
    test says); later calls run through."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.calls = 0
        self.real = prior_learning.learn_from

    def __call__(self, stats: list[SufficientStats], dim: int) -> Prior:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.go.wait(30)
        return self.real(stats, dim)


async def test_the_relearn_lock_outlives_a_long_learning(
    gateways: list[RedisProfileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    # renewed every 0.5 s: a loaded 2-core machine may hold the event loop for a few hundred ms
    policy = RelearnPolicy(min_users=4, min_ratings=10, lock_ttl_s=1.5)
    first, second = (PriorLearner(s, LAYOUT, policy) for s in gateways)
    for u in range(4):
        await enrol(gateways[0], first, u)
    paused = Paused()
    monkeypatch.setattr(prior_learning, "learn_from", paused)
    task = asyncio.create_task(first.relearn(TENANT))
    try:
        assert await asyncio.to_thread(paused.entered.wait, 30)
        await asyncio.sleep(3 * policy.lock_ttl_s)  # the learning outlasts the lock's TTL, on purpose
        # Before the fix the lock had expired: the second gateway took it and learned the prior again.
        assert await second.relearn(TENANT) is None
    finally:
        paused.go.set()
    learned = await task
    assert learned is not None and learned.n_users == 4 and paused.calls == 1
    async with gateways[0].conn.guard():
        assert await gateways[0].client.exists(first.lock_key(TENANT)) == 0  # released


async def test_a_learner_that_lost_its_lock_writes_nothing(
    gateways: list[RedisProfileStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = gateways[0]
    learner = PriorLearner(store, LAYOUT, POLICY)
    for u in range(4):
        await enrol(store, learner, u)
    paused = Paused()
    monkeypatch.setattr(prior_learning, "learn_from", paused)
    task = asyncio.create_task(learner.relearn(TENANT))
    try:
        assert await asyncio.to_thread(paused.entered.wait, 30)
        async with store.conn.guard():  # the lock passes to another gateway (it expired, say)
            await store.client.set(learner.lock_key(TENANT), "another gateway", px=60_000)
    finally:
        paused.go.set()
    # Before the fix the learner stored its prior and state anyway, under the other gateway's lock.
    assert await task is None
    assert await store.get_prior(TENANT, LAYOUT) is None
    assert await learner.state(TENANT) == (4, 0)
    async with store.conn.guard():
        assert await store.client.get(learner.lock_key(TENANT)) == b"another gateway"
