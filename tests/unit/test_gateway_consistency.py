"""The profile cache's versions and the refit queue's bounds, without a network (issue 25, defects 2, 3).

The integration tests (test_consistency_cache.py, test_refit_queue.py) show the same rules on real
services and Redis; these pin each rule of the two small classes down on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from piaa_personalization.core.profile_cache import ProfileCache
from piaa_personalization.core.refits import RefitQueue


@dataclass(frozen=True)
class P:
    """A stand-in profile: the cache only reads `version`."""

    version: int


def test_a_read_that_started_before_a_change_cannot_cache_an_older_version() -> None:
    cache: ProfileCache[P] = ProfileCache(size=10, ttl_s=60)
    since = cache.mark()  # a batch sends its read
    cache.handle(b"alice 3")  # a commit's message arrives meanwhile
    assert not cache.put("alice", P(2), since)  # what the read brought back predates it
    assert cache.get("alice") is ProfileCache.MISS
    assert cache.put("alice", P(3), since)  # a read that saw the change (or a newer one) is kept
    assert cache.get("alice") == P(3)


def test_no_profile_is_version_0_and_a_delete_admits_no_earlier_read() -> None:
    cache: ProfileCache[P] = ProfileCache(size=10, ttl_s=60)
    since = cache.mark()
    cache.handle("bob 1")  # bob's first fit
    assert not cache.put("bob", None, since)  # "never rated", read before it
    since = cache.mark()
    cache.handle("bob -1")  # deleted
    assert not cache.put("bob", P(7), since) and not cache.put("bob", None, since)
    assert cache.put("bob", None, cache.mark())  # a read after the delete
    assert cache.get("bob") is None


def test_changes_to_other_users_do_not_hold_a_read_back() -> None:
    cache: ProfileCache[P] = ProfileCache(size=10, ttl_s=60)
    since = cache.mark()
    cache.handle("carol 5")
    assert cache.put("dave", P(1), since)


def test_an_entry_is_never_replaced_by_an_older_version_and_a_late_message_keeps_a_newer_one() -> None:
    cache: ProfileCache[P] = ProfileCache(size=10, ttl_s=60)
    assert cache.put("erin", P(4))
    assert not cache.put("erin", P(3))  # e.g. a refresh read before a batch read that came back later
    cache.handle("erin 4")  # the message of the version already cached: nothing to drop
    assert cache.get("erin") == P(4)
    cache.handle("erin 5")
    assert cache.get("erin") is ProfileCache.MISS


def test_a_local_invalidation_of_unknown_version_and_a_clear_admit_no_earlier_read() -> None:
    cache: ProfileCache[P] = ProfileCache(size=10, ttl_s=60)
    since = cache.mark()
    cache.invalidate("frank")
    assert not cache.put("frank", P(9), since)
    since = cache.mark()
    cache.clear()  # a switch of feature space, or a lost subscription
    assert not cache.put("gina", P(1), since)
    assert cache.put("gina", P(1), cache.mark())


def test_a_read_older_than_the_remembered_changes_is_not_cached() -> None:
    cache: ProfileCache[P] = ProfileCache(size=1, ttl_s=60)  # remembers at least 1024 changes
    since = cache.mark()
    for i in range(1025):
        cache.handle(f"user{i} 1")
    assert not cache.put("user0", P(0), since)  # its change is forgotten: no way to tell
    assert not cache.put("someone-else", P(1), since)  # nor whether theirs was among them
    assert cache.put("someone-else", P(1), cache.mark())


async def test_the_refit_queue_runs_n_at_once_keeps_m_waiting_drops_and_deduplicates() -> None:
    drops: list[int] = []
    queue = RefitQueue(concurrency=2, max_queued=2, on_drop=lambda: drops.append(1))
    gate, ran = asyncio.Event(), []

    def job(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            await gate.wait()
            ran.append(name)

        return run

    accepted = [queue.submit(k, job(k)) for k in ("a", "b", "c", "d", "e", "a", "c")]
    assert accepted == [True, True, True, True, False, True, True]  # "e" dropped; "a", "c" known
    assert (queue.running, queue.queued, len(drops)) == (2, 2, 1)
    assert queue.pending("c") and not queue.pending("e")
    gate.set()
    await queue.join()
    assert sorted(ran) == ["a", "b", "c", "d"] and (queue.running, queue.queued) == (0, 0)
    assert queue.submit("a", job("a2"))  # done: the key may run again
    await queue.join()
    assert ran[-1] == "a2"


async def test_closing_the_refit_queue_drops_the_waiting_and_waits_for_the_running() -> None:
    queue = RefitQueue(concurrency=1, max_queued=5)
    gate, ran = asyncio.Event(), []

    async def first() -> None:
        await gate.wait()
        ran.append("first")

    async def second() -> None:
        ran.append("second")

    queue.submit("x", first)
    queue.submit("y", second)
    closing = asyncio.create_task(queue.close())
    await asyncio.sleep(0)
    assert not closing.done()
    gate.set()
    await closing
    assert ran == ["first"] and not queue.submit("z", second)
