"""The stack under test for the suite: one Redis, one CPU Triton and one gateway, plus the counters that
tell how many Redis round trips and Triton batches a load run cost."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from piaa_bench.gateway_batching import start_gateway
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.paths import repository_dir
from piaa_triton.server import ServerOptions, TritonServer


@dataclass
class Stack:
    """Addresses of the running services."""

    redis_url: str
    triton_url: str
    gateway: str
    metrics_url: str
    repository: Path
    pids: dict[str, int] = field(default_factory=dict)
    """Process ids of "redis", "triton" and "gateway" (their children are counted with them)."""

    def counters(self) -> dict[str, float]:
        """Redis reads processed (≈ round trips: one pipelined batch is one read event) and the gateway's
        micro-batch, Triton-call and request counts, to be differenced around a run."""
        with redis.Redis.from_url(self.redis_url) as client:
            reads = float(client.info("stats")["total_reads_processed"])
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()

        def total(name: str) -> float:
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

        return {
            **{f"cpu_{name}": cpu_seconds(pid) for name, pid in self.pids.items()},
            "client_cpu": time.process_time(),
            "redis_reads": reads,
            "batches": total("piaa_batch_images_count"),
            "triton_calls": total("piaa_triton_batch_images_count"),
            "triton_images": total("piaa_triton_images_total"),
        }


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants; empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """measure() summed over a process tree, skipping members that exit meanwhile (0 once it is gone)."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += measure(p)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far (0 once it is gone).

    On a machine shared with other jobs, wall-clock throughput measures the share of the CPU a process
    tree won; images per CPU-second measures what the work costs, whoever else runs.
    """
    return tree_sum(pid, lambda p: p.cpu_times().user + p.cpu_times().system)


def per_batch(before: dict[str, float], after: dict[str, float], images: int) -> dict[str, Any]:
    """Between two counter readings around a run of `images` successful images: Redis round trips per
    gateway micro-batch and per Triton call, and CPU seconds by process (servers, and this client)."""
    d = {k: after[k] - before[k] for k in before}
    d["redis_reads"] -= 1  # the INFO that took the `after` reading
    calls = d["triton_calls"] or float("nan")
    cpu: dict[str, float] = {k.removeprefix("cpu_"): v for k, v in d.items() if k.startswith("cpu_")}
    server_cpu = sum(cpu.values())
    return {
        "cpu_s": cpu,
        "client_cpu_s": round(d["client_cpu"], 3),
        "images_per_cpu_s": images / server_cpu if server_cpu else float("nan"),
        "redis_round_trips": d["redis_reads"],
        "micro_batches": d["batches"],
        "triton_calls": d["triton_calls"],
        "redis_per_micro_batch": d["redis_reads"] / d["batches"] if d["batches"] else float("nan"),
        "redis_per_triton_call": d["redis_reads"] / calls,
        "images_per_triton_call": d["triton_images"] / calls,
    }


@contextlib.contextmanager
def running_stack(repository: Path | None = None, gateway_flags: list[str] | None = None) -> Iterator[Stack]:
    """Starts Redis, Triton (CPU profile) and one gateway with its metrics endpoint; stops all on exit."""
    repository = repository or repository_dir("cpu")
    with (
        RedisServer() as rds,
        TritonServer(ServerOptions(repository=repository)) as triton,
        start_gateway(rds.url, triton.grpc_url, gateway_flags or [], metrics=True) as gateway,
    ):
        assert rds.process is not None and triton.process is not None and gateway.pid is not None
        pids = {"redis": rds.process.pid, "triton": triton.process.pid, "gateway": gateway.pid}
        yield Stack(rds.url, triton.grpc_url, gateway.address, gateway.metrics_url, repository, pids)
