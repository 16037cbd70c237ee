"""The load generator's statistics: percentiles, Poisson schedules, and one run's summary from its samples.

Pure functions on recorded timings (no I/O), so they are unit-tested on synthetic timings.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

QUANTILES = (50.0, 95.0, 99.0)


@dataclass(frozen=True)
class Sample:
    """One request as the load generator saw it (times in seconds on one monotonic clock).

    `scheduled` is when the request was due: the planned arrival in an open loop, the send time in a
    closed loop. Latency is measured from it, so time spent waiting for the sender is not hidden.
    """

    scheduled: float
    sent: float
    done: float
    images: int
    code: str = "OK"
    """The gRPC status name ("OK", "UNAVAILABLE", ...)."""
    stages: dict[str, float] = field(default_factory=dict)
    """Server-side milliseconds per stage (x-piaa-timing-ms), empty when the server sent none."""

    @property
    def latency(self) -> float:
        """Seconds from the scheduled send to the answer."""
        return self.done - self.scheduled


def percentiles(values: Iterable[float], qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """{"p50": ..., ...}: linear-interpolation percentiles (numpy's default); NaN for no values.

    Raises ValueError for a quantile outside [0, 100].
    """
    if any(not 0.0 <= q <= 100.0 for q in qs):
        raise ValueError(f"quantiles must be within [0, 100], got {list(qs)}")
    data = np.asarray(list(values), dtype=np.float64)
    keys = [f"p{q:g}" for q in qs]
    if data.size == 0:
        return {k: math.nan for k in keys}
    return {k: float(v) for k, v in zip(keys, np.percentile(data, list(qs)), strict=True)}


def poisson_schedule(rate: float, duration: float, rng: np.random.Generator) -> list[float]:
    """Arrival offsets (seconds from the start, ascending, < duration) of a Poisson process of `rate`/s.

    Exponential gaps with mean 1/rate: the arrivals a population of independent users makes, bursts
    included (a fixed-interval schedule would hide the queueing bursts cause). Raises ValueError for a
    rate or duration that is not positive.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate}, {duration}")
    # Draw enough gaps in one go (mean + 6 sigma of the count), then cut at the duration.
    expected = rate * duration
    n = int(expected + 6 * math.sqrt(expected) + 10)
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    while times[-1] < duration:  # astronomically rare; keep drawing rather than truncate the process
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return [float(t) for t in times[times < duration]]


@dataclass
class RunSummary:
    """What one load run measured; the JSON results hold these (times in milliseconds)."""

    requests: int
    ok: int
    images_ok: int
    elapsed_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    stages_ms: dict[str, float]
    """Median server-side milliseconds per stage over the successful requests."""
    send_lag_ms: dict[str, float]
    """How late requests left against their schedule (open loop: the generator's own lag)."""

    def to_json(self) -> dict[str, Any]:
        """A plain dict with floats rounded for the results file."""
        return rounded(asdict(self))


def summarize(samples: Sequence[Sample]) -> RunSummary:
    """Throughput, latency percentiles, errors by status and median stage timings of one run.

    Throughput counts only images of successful requests, over the span from the first scheduled send
    to the last answer. Raises ValueError for no samples.
    """
    if not samples:
        raise ValueError("no samples to summarize")
    start = min(s.scheduled for s in samples)
    end = max(s.done for s in samples)
    elapsed = max(end - start, 1e-9)
    ok = [s for s in samples if s.code == "OK"]
    images_ok = sum(s.images for s in ok)
    stage_names = sorted({k for s in ok for k in s.stages})
    stages = {k: statistics.median(s.stages[k] for s in ok if k in s.stages) for k in stage_names}
    return RunSummary(
        requests=len(samples),
        ok=len(ok),
        images_ok=images_ok,
        elapsed_s=elapsed,
        images_per_s=images_ok / elapsed,
        latency_ms=percentiles(s.latency * 1e3 for s in ok),
        errors=dict(sorted(Counter(s.code for s in samples if s.code != "OK").items())),
        stages_ms=stages,
        send_lag_ms=percentiles((s.sent - s.scheduled) * 1e3 for s in samples),
    )


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of per-round ratios: round i's numerator over round i's denominator.

    Rounds alternate the compared configurations, so a neighbour's load hits both sides of a ratio alike;
    the median then drops the rounds a burst distorted. Raises ValueError on unequal or empty rounds.
    """
    if not numerators or len(numerators) != len(denominators):
        raise ValueError(f"need equal, non-empty rounds, got {len(numerators)} and {len(denominators)}")
    return statistics.median(n / d if d else math.nan for n, d in zip(numerators, denominators, strict=True))


def rounded(value: Any) -> Any:
    """`value` with every float rounded to 3 decimals and NaN/inf as None (valid JSON), recursively."""
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value
