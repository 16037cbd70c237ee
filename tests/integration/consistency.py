"""Helpers of the consistency tests: real PersonalizationService instances on the real redis-server.

The services run in the test's event loop against a Triton address nobody listens on: every image is
scored by digest from head rows the test puts into the Redis feature cache, so no image goes through
Triton (the profile cache and refits, which these tests are about, never touch it). Events are ordered
with barriers on the store adapter's own methods, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from piaa_common.process import free_port
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core import personalizer
from piaa_personalization.core.service import Call, ImageRef, PersonalizationService, RatingIn
from piaa_personalization.model.residual import PACKED_DIM

TENANT = "default"
STARS = "RATING_SCALE_STARS_1_5"


def config(redis_url: str, prefix: str, **settings: Any) -> GatewayConfig:
    """A gateway config on `redis_url` under key prefix `prefix`, Triton unreachable (nothing listens)."""
    return GatewayConfig(
        redis_url=redis_url,
        redis_key_prefix=prefix,
        triton_url=f"127.0.0.1:{free_port()}",
        **settings,
    )


def new_prefix() -> str:
    """A key prefix of the test's own (the rollout and layout keys are per prefix)."""
    return f"t{uuid.uuid4().hex[:10]}"


def call() -> Call:
    return Call(TENANT, deadline=time.monotonic() + 60)


def heads(n: int, seed: int) -> dict[str, personalizer.Head]:
    """`n` made-up images: digest → head row (generic score mid-range, so personalization shows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        digest = hashlib.sha256(f"image {seed} {i}".encode()).hexdigest()
        packed = rng.uniform(0.05, 0.95, PACKED_DIM).astype(np.float32)
        packed[0] = 0.5
        out[digest] = personalizer.Head(packed)
    return out


async def cache_features(store: personalizer.StoreAdapter, rows: dict[str, personalizer.Head]) -> None:
    """Puts head rows into the Redis feature cache, so scoring and rating them by digest need no Triton."""
    await store.put_features(rows)


async def rate(
    service: PersonalizationService, user: str, rows: dict[str, personalizer.Head], values: list[float]
) -> None:
    """Rates images (by digest) through the service: AddRatings as the servicer calls it."""
    ratings = [RatingIn(ImageRef(digest=d), v, STARS) for d, v in zip(rows, values, strict=True)]
    await service.add_ratings(call(), user, ratings)


async def subscribed(redis_url: str, channel: str, listeners: int = 1) -> None:
    """Returns once `listeners` connections are subscribed to `channel` (the services' change listeners)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            ((_, count),) = await client.pubsub_numsub(channel)
            if count >= listeners:
                return
            assert time.monotonic() < deadline, f"{count} of {listeners} listeners subscribed in 30 s"
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    """Waits for a condition that must come true (polls it; fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


class RefitTap:
    """Wraps one store adapter's `refit`: counts the calls, optionally holds each at a gate until
    `release()`, and lets the test wait for every call made so far (`settle`)."""

    def __init__(self, store: personalizer.StoreAdapter, hold: bool = False) -> None:
        self._original = store.refit
        self.entered = 0
        self.calls: list[asyncio.Future[None]] = []
        self._gate = asyncio.Event()
        if not hold:
            self._gate.set()
        self._entered_changed = asyncio.Event()
        store.refit = self._refit  # type: ignore[method-assign]

    async def _refit(self, *args: Any, **kwargs: Any) -> Any:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls.append(done)
        self.entered += 1
        self._entered_changed.set()
        try:
            await self._gate.wait()
            return await self._original(*args, **kwargs)
        finally:
            done.set_result(None)

    async def entered_at_least(self, n: int) -> None:
        """Returns once `n` refits have entered (fails after 30 s)."""
        async with asyncio.timeout(30):
            while self.entered < n:
                self._entered_changed.clear()
                await self._entered_changed.wait()

    def release(self) -> None:
        self._gate.set()

    @contextlib.contextmanager
    def released_at_exit(self) -> Iterator[None]:
        """Releases the held refits when the block ends, also when an assertion in it failed (closing
        the service waits for the refits it runs)."""
        try:
            yield
        finally:
            self.release()

    async def settle(self) -> None:
        """Waits until every refit that entered so far has returned."""
        await asyncio.gather(*self.calls)
