"""The soak: peak throughput, then a long open-loop run at a fraction of it, watching errors and the
resident memory (RSS) of the gateway and of Triton (server + Python stubs) window by window.

    python -m piaa_bench.soak --duration 600 --fraction 0.7 --out build/soak.json

Passes when no request failed and each process's RSS grew by less than `--max-growth` (10%) from the end
of warm-up (`--warmup` seconds) to the end of the run. Run by hand (it takes the whole duration); its
result goes in docs/reliability.md. Every image is unique (feature-cache misses), so Triton runs for each
request, and users are drawn from preloaded profiles, so the personalization path runs too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from piaa_bench.loadgen import Workload, _call, channel, closed_loop, load_photos, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.stack import running_stack, tree_sum
from piaa_bench.stats import Sample, poisson_schedule, summarize
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    return int(tree_sum(pid, lambda p: p.memory_info().rss))


@dataclass
class Window:
    """One window of the soak: what was sent, what failed, and the RSS at its end (MiB)."""

    end_s: float
    requests: int
    errors: dict[str, int]
    images_per_s: float
    p99_ms: float
    rss_mib: dict[str, float]


def growth(windows: list[Window], warmup_s: float) -> dict[str, float]:
    """RSS growth per process from the first window ending after `warmup_s` to the last, as a fraction.

    Raises ValueError when no window ends after warm-up."""
    after = [w for w in windows if w.end_s >= warmup_s]
    if not after:
        raise ValueError("the run is shorter than its warm-up")
    first, last = after[0], windows[-1]
    return {name: last.rss_mib[name] / first.rss_mib[name] - 1.0 for name in first.rss_mib}


async def soak(
    address: str, workload: Workload, rate: float, duration: float, *, window_s: float, pids: dict[str, int]
) -> list[Window]:
    """Poisson arrivals at `rate`/s for `duration` s, summarized every `window_s` s: RSS is read at each
    window's end, and its requests (those scheduled in it) are summarized once answered, without ever
    holding back the next window's arrivals."""
    offsets = poisson_schedule(rate, duration, np.random.default_rng(1))
    pending: list[asyncio.Future[Sample]] = []

    async def summarize_window(
        end_s: float, calls: list[asyncio.Future[Sample]], rss: dict[str, float]
    ) -> Window:
        samples = list(await asyncio.gather(*calls))
        summary = summarize(samples) if samples else None
        window = Window(
            end_s=round(end_s, 1),
            requests=len(samples),
            errors=summary.errors if summary else {},
            images_per_s=round(summary.images_per_s, 2) if summary else 0.0,
            p99_ms=round(summary.latency_ms["p99"], 1) if summary else 0.0,
            rss_mib=rss,
        )
        print(json.dumps(asdict(window)), flush=True)
        return window

    closing: list[asyncio.Task[Window]] = []

    def close(end_s: float) -> None:
        rss = {n: round(tree_rss(pid) / 2**20, 1) for n, pid in pids.items()}
        closing.append(asyncio.create_task(summarize_window(end_s, list(pending), rss)))
        pending.clear()

    async with channel(address) as ch:
        stub = pb_grpc.PersonalizationStub(ch)
        start = time.perf_counter() + 0.05
        edge = window_s
        for offset in offsets:
            while offset >= edge:
                close(edge)
                edge += window_s
            due = start + offset
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.append(asyncio.ensure_future(_call(stub, workload, due, 30.0)))
        await asyncio.sleep(max(0.0, start + duration - time.perf_counter()))
        close(duration)
        return list(await asyncio.gather(*closing))


def main(argv: list[str] | None = None) -> int:
    """CLI: starts Redis, Triton (CPU) and a gateway, measures peak, soaks; exit 1 when it did not pass."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    parser.add_argument("--fraction", type=float, default=0.7, help="share of the measured peak to send")
    parser.add_argument("--peak-requests", type=int, default=300, help="requests of the peak measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="callers of the peak measurement")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before RSS is compared")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--users", type=int, default=1000, help="preloaded profiles to draw users from")
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("build/soak.json"))
    args = parser.parse_args(argv)
    photos = load_photos(args.photos, limit=200)
    with running_stack() as stack:
        preload_profiles(stack.redis_url, args.users)
        workload = Workload(photos, users=user_ids(args.users), seed=2)
        asyncio.run(closed_loop(stack.gateway, workload, args.concurrency, 50))  # warm Triton and caches
        peak_run = summarize(
            asyncio.run(closed_loop(stack.gateway, workload, args.concurrency, args.peak_requests))
        )
        rate = peak_run.images_per_s * args.fraction
        print(f"peak {peak_run.images_per_s:.1f} images/s (closed loop, {args.concurrency} callers); "
              f"soaking at {rate:.1f}/s for {args.duration:.0f} s", flush=True)  # fmt: skip
        pids = {"gateway": stack.pids["gateway"], "triton": stack.pids["triton"]}
        windows = asyncio.run(
            soak(stack.gateway, workload, rate, args.duration, window_s=args.window, pids=pids)
        )
    errors: dict[str, int] = {}
    for w in windows:
        for code, n in w.errors.items():
            errors[code] = errors.get(code, 0) + n
    grew = growth(windows, args.warmup)
    passed = not errors and all(g < args.max_growth for g in grew.values())
    result = {
        "command": "python -m piaa_bench.soak " + " ".join(sys.argv[1:] if argv is None else argv),
        "peak_images_per_s": round(peak_run.images_per_s, 2),
        "rate_per_s": round(rate, 2),
        "requests": sum(w.requests for w in windows),
        "errors": errors,
        "rss_growth_after_warmup": {k: round(v, 4) for k, v in grew.items()},
        "passed": passed,
        "windows": [asdict(w) for w in windows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
