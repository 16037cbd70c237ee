"""In-process LRU of user profiles, invalidated on update through Redis pub/sub (TTL as a safety net).

Every worker keeps its own LRU, keyed by the store's tag of the user. The store publishes
"<tag> <version>" on its changes channel in the same atomic step that changes a profile (AddRatings,
a refit, DeleteProfile: version -1); every worker's listener applies it. Pub/sub is at-most-once, so
entries also expire after a short TTL, and a lost subscription clears the cache.

Versions keep a read that raced a change from putting the old profile back. A reader takes `mark()`
before it sends its Redis read and hands it to `put`; every change (a message, or this worker's own
write) is recorded with the version it announced, so a read that started before a change may only
cache a profile at least that new. A delete (or a change of unknown version) admits no earlier read.
An entry is never replaced by an older version. The record of changes is bounded: a read older than
the oldest change forgotten is not cached at all (it is still answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import OrderedDict
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

V = TypeVar("V")
_MISSING = object()

DELETED = sys.maxsize
"""The version a delete (or a change whose version is unknown) records: no earlier read is cached."""

_MIN_HISTORY = 1024
"""Changes remembered at least (more with a larger cache): far more than one read's duration brings."""


def _version(value: Any) -> int:
    """A cached value's version: the profile's `version`; 0 for "no profile" (and for values without)."""
    return 0 if value is None else int(getattr(value, "version", 0))


class ProfileCache(Generic[V]):
    """LRU of user tag → profile (or None for "no profile"), each entry trusted for `ttl_s`; the values'
    `version` attribute orders them (see the module's docstring)."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, V | None, int]] = OrderedDict()
        self._changes: OrderedDict[str, tuple[int, int]] = OrderedDict()
        """Recent changes: tag → (sequence number, version announced), oldest first."""
        self._history = max(size, _MIN_HISTORY)
        self._seq = 0
        self._forgotten = 0
        """The newest sequence number dropped from _changes (or cleared): reads marked before it are
        not cached."""
        self._listener: asyncio.Task[None] | None = None

    def get(self, key: str) -> Any:
        """The cached profile (possibly None = known to have none), or ProfileCache.MISS."""
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        if time.monotonic() - entry[0] > self.ttl_s:
            del self._entries[key]
            return _MISSING
        self._entries.move_to_end(key)
        return entry[1]

    MISS = _MISSING

    def mark(self) -> int:
        """What a reader takes just before it sends its read, to pass to put()."""
        return self._seq

    def put(self, key: str, value: V | None, since: int | None = None) -> bool:
        """Caches `value` (None records that the user has no profile), read after mark() gave `since`
        (None: not from a read that a change could have overtaken). Refused (False) when a change
        recorded since then announced a newer version, when the change record no longer reaches back to
        `since`, or when the cached entry is newer."""
        if self.size <= 0 or self.ttl_s <= 0:
            return False
        version = _version(value)
        if since is not None and since < self._seq:  # changes came in while the read was out
            if since < self._forgotten:
                return False
            change = self._changes.get(key)
            if change is not None and change[0] > since and version < change[1]:
                return False
        entry = self._entries.get(key)
        if entry is not None and entry[2] > version:
            return False
        self._entries[key] = (time.monotonic(), value, version)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return True

    def expires_within(self, key: str, seconds: float) -> bool:
        """Whether `key` is cached and its entry expires within `seconds` (time to refresh it ahead)."""
        entry = self._entries.get(key)
        return entry is not None and time.monotonic() - entry[0] > self.ttl_s - seconds

    def changed(self, key: str, version: int) -> None:
        """Records that the user's profile changed to `version` (-1: deleted): drops an older entry, and
        keeps reads that started before now from caching anything older."""
        version = DELETED if version < 0 else version
        self._seq += 1
        self._changes[key] = (self._seq, version)
        self._changes.move_to_end(key)
        while len(self._changes) > self._history:
            _, (seq, _) = self._changes.popitem(last=False)
            self._forgotten = seq
        entry = self._entries.get(key)
        if entry is not None and (version == DELETED or entry[2] < version):
            del self._entries[key]

    def invalidate(self, key: str) -> None:
        """Drops one user's entry after a change of unknown version (no read from before is cached)."""
        self.changed(key, DELETED)

    def clear(self) -> None:
        """Drops every entry, and keeps reads in flight from caching (another feature space, or change
        messages may have been missed)."""
        self._entries.clear()
        self._changes.clear()
        self._seq += 1
        self._forgotten = self._seq

    def __len__(self) -> int:
        return len(self._entries)

    def handle(self, payload: bytes | str) -> None:
        """Applies one change message "<tag> <version>" (the tag may itself hold spaces)."""
        text = payload.decode() if isinstance(payload, bytes) else payload
        tag, _, version = text.rpartition(" ")
        try:
            self.changed(tag, int(version))
        except ValueError:  # not ours to parse: forget the user whatever the version
            log.warning("profile change message without a version: %r", text[:200])
            self.invalidate(tag or text)

    async def listen(self, redis: Any, channel: str) -> None:
        """Subscribes `redis` (redis.asyncio.Redis) to `channel` and applies its messages until
        cancelled; on a lost connection it clears the cache and resubscribes (and clears it again once
        subscribed: what changed in between was not heard)."""
        while True:
            try:
                pubsub = redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(channel)
                self.clear()  # changes published while unsubscribed were missed
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
                self.clear()
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
