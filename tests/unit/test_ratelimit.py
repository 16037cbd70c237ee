"""ratelimit.py: token buckets per tenant on an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from piaa_personalization.api.ratelimit import TenantRateLimiter, TokenBucket
from piaa_personalization.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_spends_refills_and_caps_at_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token comes every 1/rate s
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # refilled to burst, minus one


def test_a_tenant_over_its_rate_is_refused_and_others_are_not() -> None:
    clock = Clock()
    limiter = TenantRateLimiter(rate_per_s=10, burst=5, clock=clock)
    for _ in range(5):
        limiter.admit("acme")
    with pytest.raises(RateLimited, match=r"acme.*retry in 0\.10 s") as err:
        limiter.admit("acme")
    assert err.value.status == "RESOURCE_EXHAUSTED" and err.value.retryable
    for _ in range(5):
        limiter.admit("globex")  # a separate bucket
    clock.now += 0.1
    limiter.admit("acme")  # one token back after 1/rate s
    with pytest.raises(RateLimited):
        limiter.admit("acme")


def test_sustained_rate_matches_the_setting() -> None:
    clock = Clock()
    limiter = TenantRateLimiter(rate_per_s=50, burst=1, clock=clock)
    admitted = 0
    for _ in range(10_000):  # 10 s of calls every millisecond
        clock.now += 0.001
        try:
            limiter.admit("t")
            admitted += 1
        except RateLimited:
            pass
    assert 495 <= admitted <= 505


def test_forgotten_tenants_are_bounded() -> None:
    clock = Clock()
    limiter = TenantRateLimiter(rate_per_s=1, burst=1, max_tenants=3, clock=clock)
    for tenant in ("a", "b", "c", "d"):
        limiter.admit(tenant)
    assert len(limiter._buckets) == 3 and "a" not in limiter._buckets


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_bad_settings_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TenantRateLimiter(rate, burst)
