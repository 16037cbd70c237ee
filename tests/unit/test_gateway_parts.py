"""Small gateway parts without a network: the profile LRU, stage timings, the status mapping."""

from __future__ import annotations

import time

import grpc
import pytest

from piaa_personalization import errors
from piaa_personalization.core.metrics import Metrics, Timings, parse_timings, stage
from piaa_personalization.core.profile_cache import ProfileCache


def test_profile_cache_is_an_lru_with_a_ttl() -> None:
    cache: ProfileCache[str] = ProfileCache(size=2, ttl_s=60)
    cache.put("a", "A")
    cache.put("b", None)  # "known to have no profile" is cached too
    assert cache.get("a") == "A"  # refreshes a
    cache.put("c", "C")  # evicts b, the least recently used
    assert cache.get("b") is ProfileCache.MISS
    assert cache.get("c") == "C" and len(cache) == 2
    short: ProfileCache[str] = ProfileCache(size=10, ttl_s=0.01)
    short.put("a", "A")
    time.sleep(0.03)
    assert short.get("a") is ProfileCache.MISS


def test_change_messages_invalidate_their_user() -> None:
    cache: ProfileCache[str] = ProfileCache(size=10, ttl_s=60)
    cache.put("t:default:u:alice", "A")
    cache.put("t:default:u:bob", "B")
    cache.handle(b"t:default:u:alice 7")
    assert cache.get("t:default:u:alice") is ProfileCache.MISS
    assert cache.get("t:default:u:bob") == "B"
    cache.handle("t:default:u:bob -1")  # a delete
    assert cache.get("t:default:u:bob") is ProfileCache.MISS


def test_disabled_cache_stores_nothing() -> None:
    cache: ProfileCache[str] = ProfileCache(size=0, ttl_s=60)
    cache.put("a", "A")
    assert cache.get("a") is ProfileCache.MISS


def test_timings_header_round_trips_and_stages_are_observed() -> None:
    metrics = Metrics()
    t1, t2 = Timings(), Timings()
    with stage(metrics, "triton", [t1, t2]):
        time.sleep(0.002)
    t1.add("queue", 0.0015)
    header = t1.header()
    assert header.split(",")[0].startswith("queue=1.5")
    parsed = parse_timings(header)
    assert set(parsed) == {"queue", "triton", "redis", "personalize"}
    assert parsed["triton"] >= 2.0 and parsed["redis"] == 0.0
    assert t2.ms["triton"] == pytest.approx(t1.ms["triton"])
    assert b'piaa_stage_seconds_count{stage="triton"} 1.0' in metrics.expose()


def test_two_gateways_in_one_process_keep_separate_metrics() -> None:
    a, b = Metrics(), Metrics()
    a.triton_images.inc(3)
    assert b"piaa_triton_images_total 3.0" in a.expose()
    assert b"piaa_triton_images_total 0.0" in b.expose()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ImageRejected, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.TritonUnavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.StoreDown, grpc.StatusCode.UNAVAILABLE),
        (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ServiceError, grpc.StatusCode.INTERNAL),
    ],
)
def test_every_service_error_names_a_real_status(
    error: type[errors.ServiceError], code: grpc.StatusCode
) -> None:
    assert grpc.StatusCode[error.status] is code
