"""The profile cache never puts back a profile older than a change it heard (issue 25, defect 2).

A micro-batch reads a user's profile from Redis, a change lands while that read is on its way back, and
the batch then caches what it read. Without versions the old profile went back into the LRU after the
change message had dropped it, and the hot path served it for the whole TTL. Each test pauses one
batch right after its Redis read (a barrier in the store adapter's read_batch), makes the change, waits
until the service's listener has heard it, lets the batch finish, and scores again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from piaa_personalization.core import personalizer
from piaa_personalization.core.service import ImageRef, PersonalizationService
from tests.integration.consistency import (
    TENANT,
    cache_features,
    call,
    config,
    heads,
    new_prefix,
    rate,
    subscribed,
)


class PausedRead:
    """Holds the next batch read that asks for profiles between its Redis reply and its return."""

    def __init__(self, store: personalizer.StoreAdapter) -> None:
        self._original = store.read_batch
        self.armed = False
        self.read = asyncio.Event()
        self.go_on = asyncio.Event()
        store.read_batch = self._read_batch  # type: ignore[method-assign]

    async def _read_batch(self, digests: Any, users: Any) -> Any:
        result = await self._original(digests, users)
        if self.armed and users:
            self.armed = False
            self.read.set()
            await self.go_on.wait()
        return result


class Heard:
    """Signals when the service's change listener has applied a message about `tag`."""

    def __init__(self, service: PersonalizationService, tag: str) -> None:
        self.event = asyncio.Event()
        cache = service.profiles
        original = cache.handle

        def handle(payload: bytes | str) -> None:
            original(payload)
            text = payload.decode() if isinstance(payload, bytes) else payload
            if text.rpartition(" ")[0] == tag:
                self.event.set()

        cache.handle = handle  # type: ignore[method-assign]


@pytest.fixture
async def services(redis_url: str) -> AsyncIterator[tuple[PersonalizationService, PersonalizationService]]:
    """Two services on one prefix (two gateways; the first is the one under test), both listening."""
    prefix = new_prefix()
    one = await PersonalizationService.create(config(redis_url, prefix))
    other = await PersonalizationService.create(config(redis_url, prefix))
    try:
        await subscribed(redis_url, one.store.channel, listeners=2)
        yield one, other
    finally:
        await one.close()
        await other.close()


def expected(head: personalizer.Head, profile: personalizer.Profile) -> float:
    return float(personalizer.personalize([head], [profile], with_embedding=False)[0])


async def delete(service: PersonalizationService, user: str) -> None:
    await service.delete_profile(call(), user)


def rate_high(rows: dict[str, personalizer.Head]) -> Callable[[PersonalizationService, str], Awaitable[None]]:
    async def change(service: PersonalizationService, user: str) -> None:
        await rate(service, user, rows, [5.0] * len(rows))

    return change


@pytest.mark.parametrize(
    ("change", "where"),
    [("rating", "other gateway"), ("rating", "this worker"), ("delete", "other gateway")],
)
async def test_a_read_overtaken_by_a_change_does_not_put_the_old_profile_back(
    services: tuple[PersonalizationService, PersonalizationService], change: str, where: str
) -> None:
    service, other = services
    rows = heads(13, seed=1)
    await cache_features(service.store, rows)
    digests = list(rows)
    scored, first_rated, later_rated = digests[0], dict(list(rows.items())[1:7]), dict(list(rows.items())[7:])
    user = f"{change}-{where}".replace(" ", "-")
    tag = service.store.tag(TENANT, user)
    await rate(service, user, first_rated, [1.0, 1.0, 2.0, 1.0, 1.0, 2.0])
    (before,) = await service.store.get_profiles(TENANT, [user])
    assert before is not None and service.store.usable(before)

    paused, heard = PausedRead(service.store), Heard(service, tag)
    paused.armed = True
    first = asyncio.create_task(service.score(call(), user, [ImageRef(digest=scored)]))
    await paused.read.wait()  # the batch has the old profile in hand, not yet in the cache
    writer = service if where == "this worker" else other
    if change == "rating":
        await rate_high(later_rated)(writer, user)
    else:
        await delete(writer, user)
    await asyncio.wait_for(heard.event.wait(), 30)  # the change message reached the paused service
    paused.go_on.set()
    (answer,) = await first
    # The overtaken batch answers with what it read: the user's profile as it was when the read ran.
    assert answer.personalized and answer.score == pytest.approx(expected(rows[scored], before), abs=1e-5)

    (after,) = await service.store.get_profiles(TENANT, [user])
    (again,) = await service.score(call(), user, [ImageRef(digest=scored)])
    if change == "delete":
        assert after is None
        assert (again.personalized, again.reason) == (False, "no_profile"), "the deleted profile came back"
    else:
        assert after is not None and after.version > before.version
        assert not np.isclose(expected(rows[scored], after), expected(rows[scored], before), atol=1e-3)
        assert again.personalized and again.score == pytest.approx(expected(rows[scored], after), abs=1e-5), (
            f"scored with the profile of version {before.version} after version {after.version} was announced"
        )


async def test_a_refresh_ahead_overtaken_by_a_change_does_not_put_the_old_profile_back(
    services: tuple[PersonalizationService, PersonalizationService],
) -> None:
    """The hot path rereads a profile shortly before its entry expires (Scorer._refresh_profiles): that
    read is overtaken the same way."""
    service, other = services
    rows = heads(13, seed=2)
    await cache_features(service.store, rows)
    digests = list(rows)
    scored, first_rated, later_rated = digests[0], dict(list(rows.items())[1:7]), dict(list(rows.items())[7:])
    user, store = "refreshed", service.store
    await rate(service, user, first_rated, [1.0, 1.0, 2.0, 1.0, 1.0, 2.0])
    (before,) = await store.get_profiles(TENANT, [user])
    assert before is not None

    original, read, go_on = store.get_profiles, asyncio.Event(), asyncio.Event()

    async def paused_get_profiles(tenant: str, users: Any) -> Any:
        result = await original(tenant, users)
        read.set()
        await go_on.wait()
        return result

    store.get_profiles = paused_get_profiles  # type: ignore[method-assign]
    heard = Heard(service, store.tag(TENANT, user))
    service.scorer._refresh_ahead(TENANT, user)  # what the hot path does near the entry's expiry
    await read.wait()
    await rate_high(later_rated)(other, user)
    await asyncio.wait_for(heard.event.wait(), 30)
    go_on.set()
    refresher = service.scorer._refresher
    assert refresher is not None
    await refresher
    store.get_profiles = original  # type: ignore[method-assign]

    (after,) = await store.get_profiles(TENANT, [user])
    assert after is not None and after.version > before.version
    (again,) = await service.score(call(), user, [ImageRef(digest=scored)])
    assert again.personalized and again.score == pytest.approx(expected(rows[scored], after), abs=1e-5)
