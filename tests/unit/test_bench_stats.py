"""The load generator's statistics on synthetic timings: percentiles, Poisson schedules, open and closed
loop scheduling, and aggregation of a run's samples."""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import numpy as np
import pytest

from piaa_bench.loadgen import drive_closed, drive_open
from piaa_bench.stats import Sample, median_ratio, percentiles, poisson_schedule, summarize

pytestmark = pytest.mark.unit


def test_percentiles_interpolate_linearly() -> None:
    values = list(range(1, 101))  # 1..100
    p = percentiles(values)
    assert p == {"p50": 50.5, "p95": pytest.approx(95.05), "p99": pytest.approx(99.01)}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}
    assert percentiles([3, 1, 2], qs=(0, 100)) == {"p0": 1.0, "p100": 3.0}


def test_percentiles_of_nothing_are_nan_and_bad_quantiles_refused() -> None:
    assert all(math.isnan(v) for v in percentiles([]).values())
    with pytest.raises(ValueError):
        percentiles([1.0], qs=(101,))


def test_poisson_schedule_has_the_rate_and_exponential_gaps() -> None:
    rate, duration = 50.0, 200.0
    t = np.array(poisson_schedule(rate, duration, np.random.default_rng(1)))
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < duration
    # Count ~ Poisson(10,000): within 4 sigma (sigma = 100).
    assert abs(len(t) - rate * duration) < 400
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    # Exponential gaps: coefficient of variation 1 (a fixed-interval schedule would give 0) and
    # P(gap > mean) = 1/e.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.mean(gaps > 1 / rate) == pytest.approx(math.exp(-1), abs=0.02)
    # Arrivals per 1-second window: Poisson, so variance ≈ mean.
    counts = np.bincount(t.astype(int), minlength=int(duration))
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.25)


def test_poisson_schedule_is_reproducible_and_validated() -> None:
    a = poisson_schedule(5, 10, np.random.default_rng(3))
    assert a == poisson_schedule(5, 10, np.random.default_rng(3))
    assert a != poisson_schedule(5, 10, np.random.default_rng(4))
    with pytest.raises(ValueError):
        poisson_schedule(0, 10, np.random.default_rng(0))


def test_latency_counts_from_the_scheduled_time() -> None:
    # Due at 1.0, left late at 1.5 (a busy sender), answered at 1.7: 700 ms, not 200 ms.
    s = Sample(scheduled=1.0, sent=1.5, done=1.7, images=1)
    assert s.latency == pytest.approx(0.7)
    summary = summarize([s])
    assert summary.latency_ms["p50"] == pytest.approx(700)
    assert summary.send_lag_ms["p50"] == pytest.approx(500)


def test_summarize_aggregates_throughput_errors_and_stages() -> None:
    samples = [
        Sample(0.0, 0.0, 1.0, 8, "OK", {"queue": 1.0, "triton": 900.0}),
        Sample(0.5, 0.5, 2.0, 8, "OK", {"queue": 3.0, "triton": 1100.0, "redis": 2.0}),
        Sample(1.0, 1.0, 1.2, 8, "UNAVAILABLE"),
        Sample(1.0, 1.0, 4.0, 8, "DEADLINE_EXCEEDED"),
        Sample(1.5, 1.5, 1.6, 8, "UNAVAILABLE"),
    ]
    s = summarize(samples)
    assert (s.requests, s.ok, s.images_ok) == (5, 2, 16)
    # Only successful images count, over first schedule (0.0) to last answer (4.0).
    assert s.elapsed_s == pytest.approx(4.0)
    assert s.images_per_s == pytest.approx(4.0)
    assert s.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert s.stages_ms == {"queue": 2.0, "redis": 2.0, "triton": 1000.0}
    assert s.latency_ms["p50"] == pytest.approx(1250)  # OK latencies 1000 and 1500 ms
    j = s.to_json()
    assert j["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2} and j["images_per_s"] == 4.0
    with pytest.raises(ValueError):
        summarize([])


def test_summary_json_has_no_nan() -> None:
    s = summarize([Sample(0.0, 0.0, 1.0, 1, "INTERNAL")])
    assert s.ok == 0 and s.images_per_s == 0
    assert s.to_json()["latency_ms"] == {"p50": None, "p95": None, "p99": None}


def test_median_ratio_pairs_rounds() -> None:
    # Round 2 was hit by a neighbour's burst on both sides: the per-round ratio stays ~0.5.
    assert median_ratio([10, 2, 12], [20, 4, 22]) == pytest.approx(0.5)
    assert median_ratio([1, 3], [2, 2]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        median_ratio([1, 2], [1])


def _single_server(service_s: float) -> tuple[asyncio.Lock, object]:
    lock = asyncio.Lock()

    async def send(due: float) -> Sample:
        sent = time.perf_counter()
        async with lock:  # one request served at a time: later arrivals queue
            await asyncio.sleep(service_s)
        return Sample(due, sent, time.perf_counter(), 1)

    return lock, send


def test_open_loop_sends_on_schedule_and_queueing_shows_in_latency() -> None:
    async def run() -> list[Sample]:
        _, send = _single_server(0.1)
        # 8 arrivals 10 ms apart into a server that takes 100 ms each: the queue grows by 90 ms a request.
        return await drive_open(send, [i * 0.01 for i in range(8)])  # type: ignore[arg-type]

    samples = sorted(asyncio.run(run()), key=lambda s: s.scheduled)
    due = [s.scheduled - samples[0].scheduled for s in samples]
    assert due == pytest.approx([i * 0.01 for i in range(8)], abs=1e-9)
    # Sent without waiting for answers: the sends are in order and not spaced by the service time ...
    first_answer = min(s.done for s in samples)
    assert sum(s.sent < first_answer for s in samples) >= 2
    # ... and the k-th request's latency includes the k requests queued ahead of it (≈ 100 + 90 k ms).
    latencies = [s.latency for s in samples]
    assert all(b > a for a, b in itertools.pairwise(latencies))
    assert latencies[-1] > 4 * latencies[0]


def test_closed_loop_keeps_concurrency_requests_in_flight() -> None:
    in_flight = 0
    peak = 0

    async def send(due: float) -> Sample:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return Sample(due, due, time.perf_counter(), 2)

    samples = asyncio.run(drive_closed(send, concurrency=3, requests=10))
    assert len(samples) == 10 and peak == 3
    # Closed loop: latency is the call itself (no schedule to fall behind).
    assert all(s.sent == s.scheduled for s in samples)


def test_workload_nonces_defeat_the_feature_cache_without_changing_pixels() -> None:
    import io

    from PIL import Image

    from piaa_bench.loadgen import Workload
    from piaa_triton.imaging import preprocess

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, "JPEG")
    photo = buf.getvalue()
    wl = Workload([photo], images_per_request=3, users=["a", "b"], generic_only=False)
    first, second = wl.request(), wl.request()
    datas = [im.data for im in [*first.images, *second.images]]
    assert len(set(datas)) == 6 and all(d.startswith(photo) for d in datas)  # every image a cache miss
    assert np.array_equal(preprocess(datas[0]), preprocess(photo))  # ... with the photo's own pixels
    assert {first.user_id, second.user_id} <= {"a", "b"} and not first.generic_only
    cached = Workload([photo], images_per_request=2, unique=False).request()
    assert [im.data for im in cached.images] == [photo, photo]


def test_workload_by_digest_sends_each_photos_sha256_instead_of_its_bytes() -> None:
    import hashlib

    from piaa_bench.loadgen import Workload

    photos = [b"photo one", b"photo two"]
    request = Workload(photos, images_per_request=3, unique=False, by_digest=True).request()
    assert [im.WhichOneof("source") for im in request.images] == ["digest"] * 3
    assert [im.digest for im in request.images] == [
        hashlib.sha256(p).hexdigest() for p in [*photos, photos[0]]
    ]
    with pytest.raises(ValueError, match="unique=False"):
        Workload(photos, by_digest=True)
