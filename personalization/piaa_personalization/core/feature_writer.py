"""Writes newly computed head outputs to the Redis feature cache behind the answer, from a bounded queue."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Write = Callable[[dict[str, Any]], Awaitable[None]]
"""Writes {digest: head row} in one round trip (StoreAdapter.put_features of the batch's space)."""


class FeatureWriter:
    """One background task drains a queue of at most `max_pending` writes, one round trip each; scoring
    never waits for the cache. A full queue drops the write (the image is recomputed by Triton once more
    if it comes back before a later write lands); `on_result(result, images)` counts each outcome:
    `written`, `failed` (Redis refused or was unreachable: logged, never raised) or `dropped`. Until a
    write has landed, `get(space, digest)` returns its head row, so this worker's next batch never misses
    what it just computed."""

    def __init__(self, max_pending: int, on_result: Callable[[str, int], None]) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._queue: asyncio.Queue[tuple[str, Write, dict[str, Any]]] = asyncio.Queue(max_pending)
        self._unwritten: dict[tuple[str, str], Any] = {}
        self._current = 0  # images of the write in flight
        self._on_result = on_result
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def get(self, space: str, digest: str) -> Any | None:
        """The head row of `digest` in `space` queued or being written; None when there is none."""
        return self._unwritten.get((space, digest))

    def submit(self, space: str, write: Write, heads: dict[str, Any]) -> None:
        """Queues `write(heads)` (head rows of feature space `space`); returns at once (drops it when the
        queue is full or the writer closed)."""
        if not heads:
            return
        if self._closed:
            self._on_result("dropped", len(heads))
            return
        try:
            self._queue.put_nowait((space, write, heads))
        except asyncio.QueueFull:
            self._on_result("dropped", len(heads))
            return
        self._unwritten.update(((space, d), h) for d, h in heads.items())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    @property
    def pending(self) -> int:
        """Writes queued and not yet started."""
        return self._queue.qsize()

    async def _drain(self) -> None:
        while not self._queue.empty():
            space, write, heads = self._queue.get_nowait()
            self._current = len(heads)
            try:
                await write(heads)
            except Exception as err:  # the scores were right; only the cache misses out
                log.warning("feature cache write of %d images failed: %s", len(heads), err)
                self._on_result("failed", len(heads))
            else:
                self._on_result("written", len(heads))
            finally:
                self._current = 0
                for digest in heads:
                    self._unwritten.pop((space, digest), None)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stops taking writes and waits up to `timeout_s` for the queued ones (the rest are dropped)."""
        self._closed = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            left = self._current + sum(len(h) for _, _, h in self._drop_all())
            self._unwritten.clear()
            self._on_result("dropped", left)
            log.warning("feature cache writes still queued at shutdown: %d images dropped", left)

    def _drop_all(self) -> list[tuple[str, Write, dict[str, Any]]]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items
