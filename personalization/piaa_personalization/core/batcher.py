"""Micro-batcher: gathers the work items of concurrent requests into one batch (max size, max delay)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from piaa_personalization.errors import DeadlineExceeded, Overloaded, ShuttingDown

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Job(Generic[T]):
    """One item waiting for a batch, with its caller's deadline (time.monotonic() seconds, or None)."""

    item: T
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[object] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued_s: float = 0.0
    """Seconds between submit and dispatch, set when the batch leaves the queue."""

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - (time.monotonic() if now is None else now)


Process = Callable[[list[Job[T]]], Awaitable[Sequence[object]]]
"""Handles one batch: returns one result per job, in order; an Exception instance fails only its job."""


class MicroBatcher(Generic[T, R]):
    """Collects jobs until `max_batch_size` are waiting or the first has waited `max_delay_s`, then
    hands them to `process` as one batch; at most `max_concurrent` batches run at once.

    A result that is an exception fails only its own job; an exception raised by `process` fails the
    whole batch. Jobs whose deadline passed, or whose caller went away, are dropped before dispatch.
    """

    def __init__(
        self,
        process: Process[T],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_concurrent: int = 4,
        max_queued: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_delay_s < 0 or max_concurrent < 1:
            raise ValueError("max_batch_size and max_concurrent must be >= 1, max_delay_s >= 0")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._on_batch = on_batch
        self.max_queued = max_queued
        self._queue: asyncio.Queue[Job[T]] = asyncio.Queue()
        self._running: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        self._outstanding = 0

    def _ensure_started(self) -> None:
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queues one item and returns its result once its batch ran.

        Raises the job's own exception, DeadlineExceeded when the deadline passed in the queue, or
        ShuttingDown after close().
        """
        (result,) = await self.submit_many([item], deadline)
        if isinstance(result, BaseException):
            raise result
        return result

    async def submit_many(self, items: Sequence[T], deadline: float | None = None) -> list[R | BaseException]:
        """Queues several items together (they may land in one or several batches); one result or
        exception per item, in order. Raises ShuttingDown after close(), Overloaded when more than
        `max_queued` items would wait (shed at the door rather than time out in the queue)."""
        if self._closed:
            raise ShuttingDown("the gateway is shutting down")
        if self.max_queued is not None and self._queue.qsize() + len(items) > self.max_queued:
            raise Overloaded(f"{self._queue.qsize()} images already queued; retry later")
        self._ensure_started()
        jobs = [Job(item, deadline) for item in items]
        for job in jobs:
            self._outstanding += 1
            job.future.add_done_callback(self._resolved)
            self._queue.put_nowait(job)
        try:
            results = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        except asyncio.CancelledError:
            for job in jobs:
                job.future.cancel()
            raise
        return list(results)  # type: ignore[arg-type]

    async def _collect(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            until = time.monotonic() + self.max_delay_s
            while len(batch) < self.max_batch_size:
                if self._queue.empty():
                    wait = until - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), wait))
                    except TimeoutError:
                        break
                else:
                    batch.append(self._queue.get_nowait())
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Job[T]]) -> None:
        try:
            now = time.monotonic()
            live = []
            for job in batch:
                if job.future.done():  # the caller went away
                    continue
                remaining = job.remaining(now)
                if remaining is not None and remaining <= 0:
                    job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    continue
                job.queued_s = now - job.enqueued
                live.append(job)
            if not live:
                return
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                results = await self._process(live)
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} returned {len(results)} results")
            except Exception as err:  # the whole batch failed: every job gets the error
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
                return
            for job, result in zip(live, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self._slots.release()

    def _resolved(self, _: asyncio.Future[object]) -> None:
        self._outstanding -= 1

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not yet resolved."""
        return self._outstanding

    async def close(self) -> None:
        """Refuses new jobs, lets queued and running batches finish, then stops the collector."""
        self._closed = True
        while self._outstanding or self._running:
            await asyncio.sleep(0.005)
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
