"""The stack under test for the suite: Redis (one server or a cluster), one CPU Triton and one gateway, plus
the counters that tell how many Redis round trips and Triton batches a load run cost."""

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
    redis_pids: list[int] = field(default_factory=list)
    """Every redis-server of a Redis Cluster, primaries and replicas: their CPU together is "redis"."""

    def counters(self) -> dict[str, float]:
        """CPU seconds by process, the gateway's Redis round trips by operation and node (`rt|op|node`,
        from its metric piaa_redis_round_trips_total), and its micro-batch, Triton-call and image counts,
        to be differenced around a run."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()

        def total(name: str) -> float:
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

        cpu = {f"cpu_{name}": cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.redis_pids:
            cpu["cpu_redis"] = sum(cpu_seconds(pid) for pid in self.redis_pids)
        return {
            **cpu,
            "client_cpu": time.process_time(),
            **round_trips(text),
            "batches": total("piaa_batch_images_count"),
            "triton_calls": total("piaa_triton_batch_images_count"),
            "triton_images": total("piaa_triton_images_total"),
        }


ROUND_TRIPS = "piaa_redis_round_trips_total"
BEHIND_THE_ANSWER = frozenset({"feature_write", "profiles"})
"""Store operations of Score that no answer waits for: new features written after the answer
(core/feature_writer.py) and the background reread of profiles near the end of their LRU life."""


def round_trips(metrics: str) -> dict[str, float]:
    """`rt|<op>|<node>` -> requests so far, from a gateway's Prometheus text."""
    out = {}
    for labels, value in re.findall(rf"^{ROUND_TRIPS}{{([^}}]*)}} (\S+)$", metrics, re.M):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[f"rt|{named['op']}|{named['node']}"] = float(value)
    return out


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
    """Between two counter readings around a run of `images` successful images: CPU seconds by process
    (servers, and this client), and the Redis round trips the answers waited for per gateway micro-batch
    (in all and by node: a cluster's batch read is one request per node, in parallel) and per Triton
    call; the requests behind the answer (BEHIND_THE_ANSWER) per micro-batch apart."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in before.keys() | after.keys()}
    batches = d["batches"] or float("nan")
    calls = d["triton_calls"] or float("nan")
    cpu: dict[str, float] = {k.removeprefix("cpu_"): v for k, v in d.items() if k.startswith("cpu_")}
    server_cpu = sum(cpu.values())
    answer: dict[str, float] = {}
    behind = 0.0
    for key, n in d.items():
        if key.startswith("rt|"):
            _, op, node = key.split("|", 2)
            if op in BEHIND_THE_ANSWER:
                behind += n
            else:
                answer[node] = answer.get(node, 0.0) + n
    trips = sum(answer.values())
    return {
        "cpu_s": cpu,
        "client_cpu_s": round(d["client_cpu"], 3),
        "images_per_cpu_s": images / server_cpu if server_cpu else float("nan"),
        "redis_round_trips": trips,
        "micro_batches": d["batches"],
        "triton_calls": d["triton_calls"],
        "redis_per_micro_batch": trips / batches,
        "redis_per_micro_batch_by_node": {node: n / batches for node, n in sorted(answer.items()) if n},
        "redis_behind_per_micro_batch": behind / batches,
        "redis_per_triton_call": trips / calls,
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
