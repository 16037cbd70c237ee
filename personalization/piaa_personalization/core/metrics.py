"""Prometheus metrics of the gateway and the per-request stage timings sent back as trailing metadata."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

STAGES = ("queue", "triton", "redis", "personalize")
"""The stages a scoring request goes through, in order; each has a latency histogram."""

TIMING_METADATA_KEY = "x-piaa-timing-ms"
"""Trailing metadata key: "queue=0.41,triton=12.3,redis=0.8,personalize=0.05" (milliseconds)."""
TIMING_REQUEST_KEY = "x-piaa-timing"
"""Request metadata key: a call that carries it (any value) gets TIMING_METADATA_KEY in its trailers.
Opt-in because a trailer costs about a fifth of a small call's CPU on the feature-cached path."""

REDIS_ERROR_KINDS = ("unavailable", "error")
"""piaa_redis_errors_total{kind}: `unavailable` (unreachable, timeout, no primary for a slot, no free
connection), `error` (any other Redis error). Both exist from the start at 0: their rate is 0, not absent."""

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _RememberedLabels:
    """labels() that remembers each child: prometheus_client validates the values and takes a lock on
    every call, which the hot path pays several times per request. Children are never removed here."""

    def labels(self, *values: Any, **by_name: Any) -> Any:
        if by_name:
            return super().labels(*values, **by_name)  # type: ignore[misc]
        children: dict[tuple[Any, ...], Any] = self.__dict__.setdefault("_children_by_values", {})
        child = children.get(values)
        if child is None:
            child = children[values] = super().labels(*values)  # type: ignore[misc]
        return child


class _Counter(_RememberedLabels, Counter):
    pass


class _Histogram(_RememberedLabels, Histogram):
    pass


class Metrics:
    """The gateway's metrics, in their own registry so several gateways can live in one process (tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_seconds = _Histogram(
            "piaa_stage_seconds",
            "Latency of one stage of a batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = _Histogram(
            "piaa_batch_images",
            "Images per micro-batch handed to the pipeline",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.triton_batch_images = _Histogram(
            "piaa_triton_batch_images", "Images per Triton call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.triton_images = _Counter("piaa_triton_images", "Images sent through Triton", registry=r)
        self.feature_cache = _Counter(
            "piaa_feature_cache_lookups", "Feature cache lookups by image digest", ["result"], registry=r
        )
        self.profile_cache = _Counter(
            "piaa_profile_cache_lookups", "In-process profile LRU lookups", ["result"], registry=r
        )
        self.fallbacks = _Counter(
            "piaa_fallbacks", "Generic scores served instead of personal ones", ["reason"], registry=r
        )
        self.requests = _Counter("piaa_requests", "RPCs finished", ["method", "code"], registry=r)
        self.request_seconds = _Histogram(
            "piaa_request_seconds", "Latency of whole RPCs", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.refits = _Counter("piaa_refits", "Stale profiles refit from stored ratings", registry=r)
        self.refits_dropped = _Counter(
            "piaa_refits_dropped",
            "Refits of stale profiles not queued because the refit queue was full (the next stale read asks "
            "again)",
            registry=r,
        )
        self.refits_skipped = _Counter(
            "piaa_refits_skipped",
            "Refits of stale profiles left undone because the deployment refits to another gateway's layout",
            registry=r,
        )
        self.refits_failed = _Counter(
            "piaa_refits_failed", "Refits of stale profiles that failed", registry=r
        )
        self.redis_round_trips = _Counter(
            "piaa_redis_round_trips",
            "Requests sent to Redis, by store operation and node (one per node a batch read touches)",
            ["op", "node"],
            registry=r,
        )
        self.feature_writes = _Counter(
            "piaa_feature_cache_writes",
            "Images whose head outputs were written to the feature cache behind the answer, by result "
            "(written, failed, dropped)",
            ["result"],
            registry=r,
        )
        self.memory_images = _Counter(
            "piaa_memory_images",
            "Images answered from the worker's memory (features, profile) without Redis or the batcher",
            registry=r,
        )
        self.personalized = _Counter(
            "piaa_personalized_scores",
            "Scores served personalized (one per image and user); with piaa_fallbacks_total, the "
            "personalized share",
            registry=r,
        )
        self.redis_errors = _Counter(
            "piaa_redis_errors",
            "Store operations that failed, by kind (unavailable, error): after the client's retries",
            ["kind"],
            registry=r,
        )
        for kind in REDIS_ERROR_KINDS:
            self.redis_errors.labels(kind)
        # process_start_time_seconds (restarts), process_cpu_seconds_total, resident memory, open fds: read
        # from /proc at scrape time only.
        ProcessCollector(registry=r)

    def round_trip(self, op: str, node: str) -> None:
        """The store's on_round_trip hook: counts one request of `op` to `node`."""
        self.redis_round_trips.labels(op, node).inc()

    def redis_error(self, kind: str) -> None:
        """The store's on_error hook: counts one failed operation of `kind` (REDIS_ERROR_KINDS)."""
        self.redis_errors.labels(kind).inc()

    def expose(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        """Serves /metrics on `port` from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)


@dataclass
class Timings:
    """Milliseconds spent per stage on behalf of one request (a batch's stage time counts fully for each)."""

    ms: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        """Adds `seconds` to `stage`."""
        self.ms[stage] = self.ms.get(stage, 0.0) + seconds * 1000.0

    def merge(self, other: Timings) -> None:
        """Adds another request part's timings (the stages ran one after the other)."""
        for stage, ms in other.ms.items():
            self.ms[stage] = self.ms.get(stage, 0.0) + ms

    def header(self) -> str:
        """The trailing-metadata value, stages in pipeline order, 0 for stages not run."""
        return ",".join(f"{s}={self.ms.get(s, 0.0):.3f}" for s in STAGES)


def parse_timings(header: str) -> dict[str, float]:
    """The stage → milliseconds mapping of a TIMING_METADATA_KEY value (for clients and benchmarks)."""
    out = {}
    for part in header.split(","):
        name, _, value = part.partition("=")
        if name:
            out[name.strip()] = float(value)
    return out


@contextmanager
def stage(metrics: Metrics, name: str, timings: list[Timings] | None = None) -> Iterator[None]:
    """Times a block: observes the stage histogram and adds the time to each request's Timings."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        metrics.stage_seconds.labels(name).observe(elapsed)
        for t in timings or ():
            t.add(name, elapsed)
