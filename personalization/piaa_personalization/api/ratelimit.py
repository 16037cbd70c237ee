"""Per-tenant token buckets: a tenant over its request rate gets RESOURCE_EXHAUSTED, the others do not notice.

Each gateway process keeps its own buckets (no Redis round trip per call), so with `workers=N` a tenant
can reach N times the configured rate; set `rate_limit_per_s` per worker accordingly.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from piaa_personalization.errors import RateLimited


class TokenBucket:
    """`rate` tokens per second up to `burst`; take() spends one or says how long until one is there."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spends `cost` tokens and returns 0, or spends nothing and returns the seconds to wait."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost - 1e-9:  # float refill (e.g. 0.1 s × 10/s) must not miss a whole token
            self.tokens = max(0.0, self.tokens - cost)
            return 0.0
        return (cost - self.tokens) / self.rate


class TenantRateLimiter:
    """One TokenBucket per tenant (the least recently seen are forgotten past `max_tenants`, which only
    ever gives a forgotten tenant a full bucket again). Call `admit(tenant)` once per request."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        max_tenants: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_tenants < 1:
            raise ValueError("rate_per_s must be > 0, burst >= 1 and max_tenants >= 1")
        self.rate = rate_per_s
        self.burst = burst
        self.max_tenants = max_tenants
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, tenant: str) -> None:
        """Returns when `tenant` may make a request now; raises RateLimited (RESOURCE_EXHAUSTED) if not."""
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_tenants:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(tenant)
        wait = bucket.take(now)
        if wait > 0:
            raise RateLimited(f"tenant {tenant!r} is over its rate limit; retry in {wait:.2f} s")
