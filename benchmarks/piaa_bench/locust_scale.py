"""How much load Locust generates with N worker processes against one, and what a Locust worker costs per
request against our own load generator (loadgen.py), side by side against one gateway.

    python -m piaa_bench.locust_scale                  # its own stack; ~2 min on 2 cores
    python -m piaa_bench.locust_scale --processes 4 --rounds 3 --window 10

Every configuration sends the cheapest call there is, so the generator rather than the server is what gives
out first: one-image Score calls of photos the gateway has already seen (its feature cache, then its
in-process memory answer them), back to back (no think time). Rounds alternate the configurations: Locust
with one process and U users, Locust with --processes N and N x U users, and loadgen's closed loop with U
calls in flight. In a window after the warm-up, each run's rate is the gateway's own count of answered
calls, and its cost the CPU-seconds of the generator's process tree (Locust's master and workers, or
loadgen) per call; the gateway's CPU share in the window tells whether the server was the limit instead.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from piaa_bench.loadgen import load_photos
from piaa_bench.stack import Stack, cpu_seconds, running_stack

LOCUSTFILE = Path(__file__).resolve().parents[1] / "locustfile.py"
LOCUST = Path(sys.executable).parent / "locust"
POOL = 16
"""Photos both generators send in turn: all cached after the warm-up."""


@dataclass(frozen=True)
class ScaleConfig:
    """What compare() runs; the defaults take about 2 minutes."""

    processes: int = 2
    """Locust worker processes of the scaled-out configuration (against one)."""
    users: int = 8
    """Locust users per process, and loadgen's calls in flight."""
    rounds: int = 2
    warmup_s: float = 6.0
    """Seconds after the start before the window opens: imports, photos, spawning."""
    window_s: float = 8.0
    """Seconds measured per run."""
    photos: Path | None = None
    """Where the POOL photos come from (loadgen.load_photos: default ../shared/data/photos, else the demo
    album)."""


def answered(stack: Stack) -> float:
    """Calls the gateway has answered so far, any RPC and status (piaa_requests_total)."""
    text = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^piaa_requests_total\{[^}]*\} (\S+)$", text, re.M))


def locust_command(address: str, photos: Path, processes: int, users: int, run_s: float) -> list[str]:
    """A headless Locust run of one-image Score calls of the photos in `photos`, back to back."""
    command = [
        str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--loglevel", "WARNING",
        "-u", str(users), "-r", str(max(users, 10)), "-t", f"{run_s:.0f}s", "--host", address,
        "--tags", "score", "--piaa-think-s", "0", "--piaa-score-images", "1", "--piaa-repeat-share", "1",
        "--piaa-photos", str(photos), "--piaa-pool", str(POOL), "--piaa-popular", str(POOL),
        "--piaa-upload-px", "0",
    ]  # fmt: skip
    return [*command, "--processes", str(processes)] if processes > 1 else command


def loadgen_command(address: str, photos: Path, concurrency: int) -> list[str]:
    """loadgen's closed loop of one-image Score calls of the photos in `photos` (more than a window takes)."""
    return [
        sys.executable, "-m", "piaa_bench.loadgen", "--address", address, "--closed", str(concurrency),
        "--photos", str(photos),
        "--requests", "10000000", "--images-per-request", "1", "--cache-hits",
    ]  # fmt: skip


def measure(stack: Stack, command: list[str], cfg: ScaleConfig) -> dict[str, float]:
    """Runs `command` and measures the window: calls/s the gateway answered, the generator's CPU ms per
    call (its whole process tree) and the gateway's CPU share (cores). Raises RuntimeError when the
    generator exits early or nothing was answered."""
    gateway = stack.pids["gateway"]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nothing has to read it while it runs
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            time.sleep(cfg.warmup_s)
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[0]} exited early ({process.returncode}):\n{log.read()[-3000:]}")
            start = (time.perf_counter(), answered(stack), cpu_seconds(process.pid), cpu_seconds(gateway))
            time.sleep(cfg.window_s)
            end = (time.perf_counter(), answered(stack), cpu_seconds(process.pid), cpu_seconds(gateway))
        finally:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    seconds, calls, generator_cpu, gateway_cpu = (b - a for a, b in zip(start, end, strict=True))
    if calls <= 0:
        raise RuntimeError(f"the gateway answered no call in the window: {' '.join(command)}")
    return {
        "calls_per_s": calls / seconds,
        "generator_cpu_ms_per_call": generator_cpu / calls * 1e3,
        "generator_cores": generator_cpu / seconds,
        "gateway_cores": gateway_cpu / seconds,
    }


def compare(
    stack: Stack, cfg: ScaleConfig = ScaleConfig(), log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The rounds and their medians (see the module's docstring)."""
    run_s = cfg.warmup_s + cfg.window_s + 4
    rounds: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="piaa-locust-scale-") as tmp:
        photos = Path(tmp)
        for k, data in enumerate(load_photos(cfg.photos, limit=POOL)):  # both generators send these
            (photos / f"{k:02d}.jpg").write_bytes(data)
        n, u = cfg.processes, cfg.users
        configurations = {
            "locust_1": locust_command(stack.gateway, photos, 1, u, run_s),
            f"locust_{n}": locust_command(stack.gateway, photos, n, n * u, run_s),
            "loadgen": loadgen_command(stack.gateway, photos, u),
        }
        for r in range(cfg.rounds):
            for name, command in configurations.items():
                rounds.setdefault(name, []).append(measure(stack, command, cfg))
            shown = ", ".join(f"{k}={v[-1]['calls_per_s']:.0f}/s" for k, v in rounds.items())
            log(f"load generation round {r + 1}/{cfg.rounds}: {shown}")
    medians = {
        name: {key: statistics.median(p[key] for p in points) for key in points[0]}
        for name, points in rounds.items()
    }
    return {
        "config": {**asdict(cfg), "photos": str(cfg.photos or "default")},
        "rounds": rounds,
        "medians": medians,
    }


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The figures make bench publishes: N workers' calls/s over one's (median of per-round ratios), and the
    generator CPU ms per call of a Locust worker process and of loadgen."""
    n = results["config"]["processes"]
    one, many = results["rounds"]["locust_1"], results["rounds"][f"locust_{n}"]
    per_round = [b["calls_per_s"] / a["calls_per_s"] for a, b in zip(one, many, strict=True)]
    medians = results["medians"]
    return {
        f"locust_{n}_workers_vs_1": round(statistics.median(per_round), 3),
        "locust_cpu_ms_per_call": round(medians["locust_1"]["generator_cpu_ms_per_call"], 3),
        "loadgen_cpu_ms_per_call": round(medians["loadgen"]["generator_cpu_ms_per_call"], 3),
    }


def summary_line(results: dict[str, Any]) -> str:
    """One Markdown paragraph for make bench's summary."""
    n = results["config"]["processes"]
    m = results["medians"]
    r = ratios(results)
    return (
        f"Load generation (locust_scale.py, one-image Score calls of cached photos, back to back): Locust "
        f"with {n} worker processes made {r[f'locust_{n}_workers_vs_1']:.2f}x the calls/s of one "
        f"({m[f'locust_{n}']['calls_per_s']:.0f} vs {m['locust_1']['calls_per_s']:.0f}/s; the gateway used "
        f"{m[f'locust_{n}']['gateway_cores']:.2f} vs {m['locust_1']['gateway_cores']:.2f} cores); a Locust "
        f"process spends {r['locust_cpu_ms_per_call']:.2f} ms of CPU per call, loadgen "
        f"{r['loadgen_cpu_ms_per_call']:.2f} ms ({m['loadgen']['calls_per_s']:.0f} calls/s)."
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: starts its own stack, prints the results as JSON and the summary line."""
    parser = argparse.ArgumentParser(
        prog="python -m piaa_bench.locust_scale", description=__doc__.split("\n")[0]
    )
    defaults = ScaleConfig()
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s)
    parser.add_argument("--window", type=float, default=defaults.window_s)
    parser.add_argument("--photos", type=Path, default=None, help="default: shared photos or demo album")
    args = parser.parse_args(argv)
    cfg = ScaleConfig(args.processes, args.users, args.rounds, args.warmup, args.window, args.photos)
    with running_stack() as stack:
        results = compare(stack, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({**results, "ratios": ratios(results)}, indent=1))
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
