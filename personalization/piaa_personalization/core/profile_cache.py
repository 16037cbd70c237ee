"""In-process LRU of user profiles, invalidated on update through Redis pub/sub (TTL as a safety net).

Every worker keeps its own LRU, keyed by the store's tag of the user. The store publishes
"<tag> <version>" on its changes channel in the same atomic step that changes a profile (AddRatings,
a refit, DeleteProfile); every worker's listener drops that user. Pub/sub is at-most-once, so entries
also expire after a short TTL, and a lost subscription clears the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

V = TypeVar("V")
_MISSING = object()


class ProfileCache(Generic[V]):
    """LRU of user tag → profile (or None for "no profile"), each entry trusted for `ttl_s`."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, V | None]] = OrderedDict()
        self._listener: asyncio.Task[None] | None = None

    def get(self, key: str) -> Any:
        """The cached profile (possibly None = known to have none), or ProfileCache.MISS."""
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        stored_at, value = entry
        if time.monotonic() - stored_at > self.ttl_s:
            del self._entries[key]
            return _MISSING
        self._entries.move_to_end(key)
        return value

    MISS = _MISSING

    def put(self, key: str, value: V | None) -> None:
        """Caches `value` (None records that the user has no profile)."""
        if self.size <= 0 or self.ttl_s <= 0:
            return
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def expires_within(self, key: str, seconds: float) -> bool:
        """Whether `key` is cached and its entry expires within `seconds` (time to refresh it ahead)."""
        entry = self._entries.get(key)
        return entry is not None and time.monotonic() - entry[0] > self.ttl_s - seconds

    def invalidate(self, key: str) -> None:
        """Drops one user's entry."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Drops every entry (the gateway switched to another feature space)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def handle(self, payload: bytes | str) -> None:
        """Applies one change message "<tag> <version>" (the tag may itself hold spaces)."""
        text = payload.decode() if isinstance(payload, bytes) else payload
        self.invalidate(text.rsplit(" ", 1)[0])

    async def listen(self, redis: Any, channel: str) -> None:
        """Subscribes `redis` (redis.asyncio.Redis) to `channel` and applies its messages until
        cancelled; on a lost connection it clears the cache and resubscribes."""
        while True:
            try:
                pubsub = redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(channel)
                try:
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.handle(message["data"])
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # missed messages are possible: forget everything, retry
                log.warning("profile invalidation listener lost redis (%s); retrying", err)
                self._entries.clear()
                await asyncio.sleep(1.0)

    def start_listening(self, redis: Any, channel: str) -> None:
        """Runs listen() in the background."""
        self._listener = asyncio.get_running_loop().create_task(self.listen(redis, channel))

    async def stop_listening(self) -> None:
        """Cancels the listener."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
