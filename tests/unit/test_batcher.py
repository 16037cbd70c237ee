"""The micro-batcher: batches form under concurrency, per-item errors stay per item, deadlines, drain."""

from __future__ import annotations

import asyncio
import time

import pytest

from piaa_personalization.core.batcher import Job, MicroBatcher
from piaa_personalization.errors import DeadlineExceeded, ImageRejected, Overloaded, ShuttingDown


class Recorder:
    """A process function that doubles ints, fails on negative ones, and records batch sizes."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s

    async def __call__(self, jobs: list[Job[int]]) -> list[object]:
        self.batches.append([j.item for j in jobs])
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return [ImageRejected(f"bad {j.item}") if j.item < 0 else j.item * 2 for j in jobs]


async def test_concurrent_items_share_batches_and_keep_their_results() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=8, max_delay_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert results == [2 * i for i in range(20)]
    assert max(len(b) for b in rec.batches) == 8  # the size limit is reached, never passed
    assert len(rec.batches) == 3
    assert sorted(i for b in rec.batches for i in b) == list(range(20))
    await batcher.close()


async def test_a_failing_item_fails_only_its_own_caller() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=16, max_delay_s=0.05)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in (1, -1, 3)), return_exceptions=True)
    assert outcomes[0] == 2 and outcomes[2] == 6
    assert isinstance(outcomes[1], ImageRejected) and "bad -1" in str(outcomes[1])
    assert rec.batches == [[1, -1, 3]]
    await batcher.close()


async def test_a_process_that_raises_fails_the_whole_batch() -> None:
    async def broken(jobs: list[Job[int]]) -> list[object]:
        raise ConnectionError("triton down")

    batcher: MicroBatcher[int, int] = MicroBatcher(broken, max_batch_size=4, max_delay_s=0.01)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    await batcher.close()


async def test_submit_many_keeps_order_and_per_item_errors() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=2, max_delay_s=0.0)
    out = await batcher.submit_many([5, -2, 7])
    assert out[0] == 10 and out[2] == 14 and isinstance(out[1], ImageRejected)
    assert all(len(b) <= 2 for b in rec.batches)
    await batcher.close()


async def test_expired_deadline_is_dropped_before_dispatch() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=4, max_delay_s=0.01)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(1, deadline=time.monotonic() - 1)
    assert rec.batches == []
    assert await batcher.submit(2, deadline=time.monotonic() + 30) == 4
    await batcher.close()


async def test_queue_time_is_recorded_and_concurrency_is_bounded() -> None:
    rec = Recorder(delay_s=0.02)
    seen: list[int] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        rec, max_batch_size=1, max_delay_s=0.0, max_concurrent=1, on_batch=seen.append
    )
    queued: list[float] = []

    async def capture(jobs: list[Job[int]]) -> list[object]:
        queued.extend(j.queued_s for j in jobs)
        return await rec(jobs)

    batcher._process = capture
    assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 2, 4, 6]
    assert seen == [1, 1, 1, 1]
    # With one batch at a time, each later item waited behind the ones before it.
    assert queued[-1] > queued[0]
    await batcher.close()


async def test_close_drains_queued_work_then_refuses_new() -> None:
    rec = Recorder(delay_s=0.01)
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=2, max_delay_s=0.01, max_concurrent=1)
    pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(p.done() for p in pending)
    assert [p.result() for p in pending] == [0, 2, 4, 6, 8, 10]
    with pytest.raises(ShuttingDown):
        await batcher.submit(1)


async def test_a_cancelled_caller_is_skipped() -> None:
    rec = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch_size=8, max_delay_s=0.05)
    gone = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    gone.cancel()
    assert await batcher.submit(2) == 4
    assert rec.batches == [[2]]
    await batcher.close()


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch_size=0, max_delay_s=0.01)


async def test_a_full_queue_sheds_new_work() -> None:
    rec = Recorder(delay_s=0.05)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        rec, max_batch_size=1, max_delay_s=0.0, max_concurrent=1, max_queued=3
    )
    first = asyncio.ensure_future(batcher.submit_many([1, 2, 3]))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await batcher.submit_many([4, 5, 6])
    assert await first == [2, 4, 6]
    assert await batcher.submit(7) == 14  # room again once the queue drained
    await batcher.close()
