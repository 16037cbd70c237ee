"""Refits of stale profiles are bounded, deduplicated, and do not ping-pong between layouts (issue 25,
defect 3).

Real services on the real redis-server (tests/integration/consistency.py). A profile is made stale the
way a release does it: refit into another feature space's layout straight in the store. The store
adapter's `refit` is wrapped (RefitTap) to count the refits a service starts and to hold them at a gate,
so how many run at once is read while they are held, not guessed from timing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from piaa_personalization.core.service import ImageRef, PersonalizationService
from piaa_personalization.model.residual import FeatureLayout, Prior
from tests.integration.consistency import (
    TENANT,
    RefitTap,
    cache_features,
    call,
    config,
    heads,
    new_prefix,
    rate,
    until,
)

OLD_SPACE = FeatureLayout(with_embedding=False, fs_version="fs0")


async def make_stale(service: PersonalizationService, users: list[str]) -> str:
    """Rates for each user, then refits their profiles as if fitted before the heads changed; returns a
    digest to score (its head row cached, so scoring it needs no Triton)."""
    rows = heads(7, seed=3)
    await cache_features(service.store, rows)
    rated = dict(list(rows.items())[1:])
    for user in users:
        await rate(service, user, rated, [1.0, 2.0, 3.0, 4.0, 5.0, 3.0])
        await service.store.inner.refit(TENANT, user, layout=OLD_SPACE, prior=Prior.zero(OLD_SPACE.dim))
    return next(iter(rows))


async def layouts(service: PersonalizationService, users: list[str]) -> list[str | None]:
    read = await service.store.get_profiles(TENANT, users)
    return [None if p is None else p.layout_key for p in read]


@pytest.fixture
async def service(redis_url: str) -> AsyncIterator[PersonalizationService]:
    """A service with the default refit settings (2 at once)."""
    s = await PersonalizationService.create(config(redis_url, new_prefix()))
    try:
        yield s
    finally:
        await s.close()


async def test_stale_reads_of_many_users_run_two_refits_at_a_time(service: PersonalizationService) -> None:
    users = [f"user{i}" for i in range(8)]
    digest = await make_stale(service, users)
    tap = RefitTap(service.store, hold=True)
    refits_before = service.metrics.refits._value.get()

    # One image scored for 8 users whose profiles are all stale: 8 generic answers, 8 refits wanted.
    with tap.released_at_exit():
        _, scores = await service.score_for_users(call(), ImageRef(digest=digest), users)
        assert [s.reason for s in scores] == ["stale_profile"] * 8
        await tap.entered_at_least(2)
        # Held at the gate, the refits started are all that can have started: the default is 2 at once.
        assert tap.entered == 2, f"{tap.entered} refits of stale profiles run at once"
        assert (service.scorer.refits.running, service.scorer.refits.queued) == (2, 6)
    await service.scorer.refits.join()
    assert tap.entered == 8
    assert service.metrics.refits._value.get() == refits_before + 8
    assert await layouts(service, users) == ["fs1/paper20"] * 8
    _, scores = await service.score_for_users(call(), ImageRef(digest=digest), users)
    assert all(s.personalized for s in scores)


async def test_a_full_refit_queue_drops_and_counts_and_a_user_is_refit_once(redis_url: str) -> None:
    service = await PersonalizationService.create(
        config(redis_url, new_prefix(), refit_concurrency=1, refit_queue_size=2)
    )
    try:
        users = [f"user{i}" for i in range(5)]
        digest = await make_stale(service, users)
        tap = RefitTap(service.store, hold=True)
        # Three calls for the same stale users (the first user once more on its own) while the refits
        # are held: one refit per user at most, 1 running + 2 queued, the other 2 users dropped.
        with tap.released_at_exit():
            for group in (users, users, users[:1]):
                await service.score_for_users(call(), ImageRef(digest=digest), group)
            await tap.entered_at_least(1)
            assert tap.entered == 1, f"{tap.entered} refits run at once, with refit_concurrency=1"
            assert (service.scorer.refits.running, service.scorer.refits.queued) == (1, 2)
            dropped = service.metrics.refits_dropped._value.get()
            assert dropped == 2 * 2  # users 3 and 4, at each of the two calls that named them
        await service.scorer.refits.join()
        assert tap.entered == 3 and service.metrics.refits._value.get() == 3
        assert await layouts(service, users) == ["fs1/paper20"] * 3 + ["fs0/paper20"] * 2
        # The dropped ones are asked for again at their next stale read.
        await service.score_for_users(call(), ImageRef(digest=digest), users)
        await service.scorer.refits.join()
        assert await layouts(service, users) == ["fs1/paper20"] * 5
    finally:
        await service.close()


async def test_during_a_with_embedding_rollout_a_profile_is_refit_once_toward_the_newer_layout(
    redis_url: str,
) -> None:
    """Gateway `old` (paper20) runs; gateway `new` (paper20+emb64) starts later. Each would refit a user's
    profile into its own layout at every stale read it serves, undoing the other's fit: the newest
    gateway's layout is the deployment's refit layout, and the old gateway leaves such profiles alone."""
    prefix = new_prefix()
    old = await PersonalizationService.create(config(redis_url, prefix, with_embedding=False))
    new = await PersonalizationService.create(config(redis_url, prefix, with_embedding=True))
    try:
        rows = heads(7, seed=4)
        await cache_features(old.store, rows)
        digest, rated = next(iter(rows)), dict(list(rows.items())[1:])
        user = "rolling"
        await rate(old, user, rated, [1.0, 2.0, 5.0, 4.0, 5.0, 1.0])
        assert await layouts(old, [user]) == ["fs1/paper20"]
        old_tap, new_tap = RefitTap(old.store), RefitTap(new.store)

        (on_new,) = await new.score(call(), user, [ImageRef(digest=digest)])
        assert on_new.reason == "stale_profile"
        await new_tap.settle()
        assert await layouts(new, [user]) == ["fs1/paper20+emb64"]
        (version,) = [p.version for p in await new.store.get_profiles(TENANT, [user]) if p is not None]

        for _ in range(3):
            (on_old,) = await old.score(call(), user, [ImageRef(digest=digest)])
            assert on_old.reason == "stale_profile"  # the old gateway cannot use the new fit
            await old_tap.settle()  # every refit the old gateway started (if any) has returned
            assert await layouts(old, [user]) == ["fs1/paper20+emb64"], "the old gateway refit it back"
            (on_new,) = await new.score(call(), user, [ImageRef(digest=digest)])
            await new_tap.settle()
            assert on_new.personalized, on_new.reason
        (after,) = await new.store.get_profiles(TENANT, [user])
        assert after is not None and after.version == version  # no refit committed since the first
        assert new.metrics.refits._value.get() == 1 and old.metrics.refits._value.get() == 0
        assert old.metrics.refits_skipped._value.get() == 3

        # AddRatings on the old gateway still fits in its own layout; the new one refits it once more.
        await rate(old, user, dict(list(rated.items())[:2]), [5.0, 5.0])
        assert await layouts(old, [user]) == ["fs1/paper20"]
        tag = new.store.tag(TENANT, user)
        await until(lambda: _forgot(new, tag), "the new gateway heard of the rating")
        (on_new,) = await new.score(call(), user, [ImageRef(digest=digest)])
        assert on_new.reason == "stale_profile"
        await new_tap.settle()
        assert await layouts(new, [user]) == ["fs1/paper20+emb64"]
        assert new.metrics.refits._value.get() == 2
    finally:
        await old.close()
        await new.close()


async def _forgot(service: PersonalizationService, tag: str) -> bool:
    return service.profiles.get(tag) is service.profiles.MISS
