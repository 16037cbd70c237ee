"""Background refits of stale profiles: one per key at a time, a bounded number at once, a bounded queue.

A stale read (a profile fitted in another layout or feature space) is answered with the generic score
and hands its refit here. A refit costs a few Redis round trips and a fit; thousands of users go stale
at once when a gateway's layout changes, and unbounded refits would take the connection pool from the
scoring path. So: at most `concurrency` refits run, at most `max_queued` more wait (oldest first), a key
already waiting or running is not added again, and a refit beyond that is dropped (counted; the user's
next stale read asks again).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class RefitQueue:
    """Runs jobs in the background, deduplicated by key, `concurrency` at once, `max_queued` waiting.

    `on_drop()` is called for each job refused because the queue is full. Jobs should not raise (an
    exception is logged). A job starts at once when a slot is free (its task is created in submit()).
    """

    def __init__(self, concurrency: int, max_queued: int, on_drop: Callable[[], None] = lambda: None) -> None:
        if concurrency < 1 or max_queued < 0:
            raise ValueError("a refit queue needs concurrency >= 1 and max_queued >= 0")
        self.concurrency = concurrency
        self.max_queued = max_queued
        self.on_drop = on_drop
        self._waiting: OrderedDict[Hashable, Job] = OrderedDict()
        self._running: dict[Hashable, asyncio.Task[None]] = {}
        self._closed = False

    def submit(self, key: Hashable, job: Job) -> bool:
        """Runs `job` unless one of `key` is waiting or running already (True either way); False when it
        was dropped (the queue is full, or closed)."""
        if key in self._running or key in self._waiting:
            return True
        if self._closed:
            return False
        if len(self._running) < self.concurrency:
            self._start(key, job)
        elif len(self._waiting) < self.max_queued:
            self._waiting[key] = job
        else:
            self.on_drop()
            return False
        return True

    def pending(self, key: Hashable) -> bool:
        """Whether a job of `key` is waiting or running."""
        return key in self._running or key in self._waiting

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Jobs waiting for a free slot."""
        return len(self._waiting)

    def _start(self, key: Hashable, job: Job) -> None:
        self._running[key] = asyncio.get_running_loop().create_task(self._run(key, job))

    async def _run(self, key: Hashable, job: Job) -> None:
        try:
            await job()
        except Exception:  # a job reports its own failures; this one escaped
            log.exception("background refit %r failed", key)
        finally:
            del self._running[key]
            if self._waiting and not self._closed:
                self._start(*self._waiting.popitem(last=False))

    async def join(self) -> None:
        """Waits until no job is waiting or running."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def close(self) -> None:
        """Drops the waiting jobs (a later stale read asks again), refuses new ones, waits for the running."""
        self._closed = True
        self._waiting.clear()
        await self.join()
