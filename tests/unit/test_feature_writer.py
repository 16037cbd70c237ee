"""FeatureWriter: writes behind the answer, bounded, failures counted and never raised, drained on close."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from piaa_personalization.core.feature_writer import FeatureWriter


async def test_writes_land_in_order_and_are_visible_until_written() -> None:
    counts: Counter[str] = Counter()
    written: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def write(heads: dict[str, Any]) -> None:
        await gate.wait()
        written.append(heads)

    writer = FeatureWriter(4, lambda result, n: counts.update({result: n}))
    writer.submit("fs1", write, {"a": 1, "b": 2})
    writer.submit("fs1", write, {"c": 3})
    assert writer.get("fs1", "a") == 1 and writer.get("fs1", "c") == 3 and writer.get("fs2", "a") is None
    gate.set()
    await writer.close()
    assert written == [{"a": 1, "b": 2}, {"c": 3}] and counts == {"written": 3}
    assert writer.get("fs1", "a") is None


async def test_a_failed_write_is_counted_not_raised_and_a_full_queue_drops() -> None:
    counts: Counter[str] = Counter()
    gate = asyncio.Event()

    async def failing(heads: dict[str, Any]) -> None:
        await gate.wait()
        raise ConnectionError("redis down")

    writer = FeatureWriter(1, lambda result, n: counts.update({result: n}))
    writer.submit("fs1", failing, {"a": 1})
    await asyncio.sleep(0)  # the first write is taken off the queue and waits
    writer.submit("fs1", failing, {"b": 1, "c": 1})  # queued
    writer.submit("fs1", failing, {"d": 1})  # the queue is full
    assert counts == {"dropped": 1}
    gate.set()
    await writer.close()
    assert counts == {"dropped": 1, "failed": 3}
    writer.submit("fs1", failing, {"e": 1})  # closed: dropped
    assert counts["dropped"] == 2


async def test_close_gives_up_after_its_timeout() -> None:
    counts: Counter[str] = Counter()

    async def stuck(heads: dict[str, Any]) -> None:
        await asyncio.Event().wait()

    writer = FeatureWriter(4, lambda result, n: counts.update({result: n}))
    writer.submit("fs1", stuck, {"a": 1})
    writer.submit("fs1", stuck, {"b": 1, "c": 1})
    await asyncio.sleep(0)
    await writer.close(timeout_s=0.05)
    assert counts == {"dropped": 3}  # the one in flight (cancelled) and the queued one
