"""A load test's service-level objective as an exit code: p99 per RPC and error ratio, at a target rate.

benchmarks/locustfile.py reads Locust's statistics at the end of a run into Observed figures and exits
non-zero when breaches() names any. Pure functions, no Locust: unit-tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Slo:
    """The objective; None leaves a bound unchecked."""

    p99_ms: float | None = None
    """The largest p99 latency, milliseconds, of each RPC in `rpcs`."""
    max_error_ratio: float | None = None
    """The largest share of failed requests over all RPCs (0.001 = 0.1 %)."""
    min_rps: float | None = None
    """The rate the run must have reached, requests per second over all RPCs: an objective met at a lower
    load than the one it is meant for says nothing."""
    rpcs: tuple[str, ...] = ()
    """The RPCs whose p99 is checked (each must have requests); empty: every RPC that had requests."""

    def __post_init__(self) -> None:
        for name in ("p99_ms", "max_error_ratio", "min_rps"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def active(self) -> bool:
        """Whether any bound is set."""
        return any(v is not None for v in (self.p99_ms, self.max_error_ratio, self.min_rps))


@dataclass(frozen=True)
class Observed:
    """One RPC's figures over a run (or all RPCs')."""

    requests: int
    failures: int
    p99_ms: float

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def breaches(slo: Slo, per_rpc: Mapping[str, Observed], total: Observed, rps: float) -> list[str]:
    """What the run missed, one line each; empty when the objective is met (or none is set). A run without
    requests misses any objective."""
    if not slo.active:
        return []
    if total.requests == 0:
        return ["no requests were made"]
    out = []
    if slo.p99_ms is not None:
        for rpc in slo.rpcs or sorted(per_rpc):
            observed = per_rpc.get(rpc)
            if observed is None or observed.requests == 0:
                out.append(f"{rpc}: no requests (its p99 cannot be checked)")
            elif observed.p99_ms > slo.p99_ms:
                out.append(f"{rpc}: p99 {observed.p99_ms:g} ms > {slo.p99_ms:g} ms")
    if slo.max_error_ratio is not None and total.error_ratio > slo.max_error_ratio:
        failed = f"{total.failures} of {total.requests}"
        out.append(f"error ratio {total.error_ratio:.4f} ({failed}) > {slo.max_error_ratio:g}")
    if slo.min_rps is not None and rps < slo.min_rps:
        out.append(f"rate {rps:.2f} requests/s < {slo.min_rps:g}")
    return out
