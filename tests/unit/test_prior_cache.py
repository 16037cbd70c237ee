"""The prior cache and the prior's change message, without Redis: a change message drops the tenant's
priors, a read that a change overtook is not cached, and profile messages are not taken for priors."""

from __future__ import annotations

import asyncio

import pytest

from piaa_personalization.model.residual import Prior
from piaa_personalization.store import format as fmt
from piaa_personalization.store.prior_cache import PriorCache

OLD, NEW = Prior.zero(21), Prior.zero(21)


def test_the_prior_change_message_round_trips_and_reads_as_a_profile_change_of_nobody() -> None:
    message = fmt.prior_change("acme", "fs1/paper20", 1765000000.123456)
    assert message == "prior:acme:fs1/paper20 1765000000123"
    assert fmt.parse_prior_change(message.encode()) == ("acme", "fs1/paper20", 1765000000.123)
    # a listener that reads '<name> <version>' finds an integer version and a name no user has
    name, _, version = message.rpartition(" ")
    assert int(version) > 0 and not name.startswith("t:")
    with pytest.raises(ValueError):
        fmt.parse_change(message)
    assert fmt.parse_prior_change(f"{fmt.Keys.tag('acme', 'prior:x')} 3") is None
    assert fmt.parse_prior_change("prior:bad tenant! 3") is None


async def test_a_change_drops_the_tenants_priors_and_a_read_it_overtook() -> None:
    cache, reads = PriorCache(), []

    async def read(prior: Prior) -> Prior:
        reads.append(prior)
        return prior

    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(OLD)) is OLD
    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(NEW)) is OLD  # cached
    cache.handle(fmt.prior_change("other", "fs1/paper20", 1.0))  # another tenant: kept
    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(NEW)) is OLD
    cache.handle(b"t:acme:u:bob 7")  # a profile change: kept
    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(NEW)) is OLD
    cache.handle(fmt.prior_change("acme", "fs1/paper20", 2.0).encode())
    assert cache.changes_seen == 2
    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(NEW)) is NEW
    assert reads == [OLD, NEW]

    # a read in flight when the change arrives answers its caller but is not cached
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_old() -> Prior:
        started.set()
        await release.wait()
        return OLD

    cache.drop("acme")
    task = asyncio.create_task(cache.get("acme", "fs1/paper20", 60.0, slow_old))
    await started.wait()
    cache.handle(fmt.prior_change("acme", "fs1/paper20", 3.0))
    release.set()
    assert await task is OLD
    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(NEW)) is NEW
    cache.clear()  # a lost subscription
    assert await cache.get("acme", "fs1/paper20", 60.0, lambda: read(OLD)) is OLD
