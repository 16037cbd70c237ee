"""Where the time goes under load: CPU seconds per process, and a py-spy profile of the gateway.

    python -m piaa_bench.profile --images 256 --out benchmarks/results

Runs the suite's personalized load (8 images/request, 4 in flight, 1,000 users) against one stack while
py-spy samples the gateway (non-blocking, so it does not slow it), then writes profile.md: the CPU
seconds of every process (tritonserver itself = the server and the ensemble's scheduling; each Python
backend stub by model: on the cpu profile's fused layout the backbone stubs decode and run ONNX Runtime,
the heads stub runs the heads; the gateway, Redis, this load generator) and the gateway's hottest functions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from piaa_bench.loadgen import Workload, closed_loop, load_photos, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.report import RESULTS
from piaa_bench.stack import running_stack
from piaa_bench.stats import summarize


def _tree_cpu(pid: int, label: str | None = None) -> dict[str, float]:
    """CPU seconds by process of a tree, keyed by "name [pid]" (stubs are told apart by their args; the
    root is called `label` when given)."""
    out: dict[str, float] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            # A Python backend stub's arguments start with its model's .../<model>/<version>/model.py.
            model = next((Path(a).parent.parent.name for a in p.cmdline() if a.endswith("model.py")), "")
            name = f"{p.name()} ({model})" if model else p.name()
            name = label if label and p.pid == pid else name
            out[f"{name} [{p.pid}]"] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return out


_IDLE = ("select (selectors.py", "_poll_wrapper", "serve_forever", "wait (")
"""Frames of threads waiting for work (the event loop's poll, gRPC's poller, the metrics server)."""


def hottest(raw: str, top: int = 15) -> list[tuple[str, float]]:
    """Share of samples per leaf frame of a py-spy raw (collapsed stacks) output, idle frames dropped."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if any(
            idle in stack for idle in ("select (selectors.py", "_poll_wrapper", "serve_forever", "wait (")
        ):
            continue
        counts[leaf] += int(n)
        total += int(n)
    return [(frame, n / total) for frame, n in counts.most_common(top)] if total else []


def main(argv: list[str] | None = None) -> int:
    """CLI: runs the profile and writes profile.md under --out."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    photos = load_photos()
    with running_stack() as stack, tempfile.TemporaryDirectory() as tmp:
        preload_profiles(stack.redis_url, 1_000)
        wl = Workload(photos, 8, user_ids(1_000))
        asyncio.run(closed_loop(stack.gateway, wl, 4, 4))  # warm
        pids = dict(stack.pids)
        before = {k: _tree_cpu(pid, k) for k, pid in pids.items()}
        raw = Path(tmp) / "gateway.txt"
        record = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pids["gateway"]),
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "250",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = time.process_time()
        summary = summarize(asyncio.run(closed_loop(stack.gateway, wl, 4, args.images // 8)))
        client = time.process_time() - client
        after = {k: _tree_cpu(pid, k) for k, pid in pids.items()}
        record.send_signal(2)
        record.wait(timeout=60)
        frames = hottest(raw.read_text()) if raw.exists() else []
    cpu = {name: after[k][name] - before[k].get(name, 0.0) for k in pids for name in after[k]}
    cpu[f"load generator (this process) [{psutil.Process().pid}]"] = client
    total = sum(cpu.values())
    lines = [
        "# Where the time goes (personalized, 8 images/request, 4 in flight, 1,000 users)",
        "",
        f"`python -m piaa_bench.profile --images {args.images}`: {summary.images_ok} images at "
        f"{summary.images_per_s:.1f} images/s (wall clock on the shared machine), "
        f"{summary.images_ok / (total - client):.2f} images per server CPU-second.",
        "",
        "| process | CPU s | share | CPU ms per image |",
        "|---|---|---|---|",
    ]
    for name, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if secs > 0.005:
            lines.append(
                f"| {name} | {secs:.2f} | {secs / total:.0%} | {1e3 * secs / max(summary.images_ok, 1):.1f} |"
            )
    lines += [
        "",
        "Gateway, py-spy (250 Hz, idle frames dropped): hottest leaf functions",
        "",
        "| function | share of busy samples |",
        "|---|---|",
    ]
    lines += [f"| `{frame}` | {share:.0%} |" for frame, share in frames]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
