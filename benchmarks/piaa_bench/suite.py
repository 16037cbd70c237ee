"""`make bench`: the CPU suite, every gateway figure next to its baselines from the same run.

    python -m piaa_bench.suite                       # ~5-8 min on 2 cores; writes benchmarks/results/
    python -m piaa_bench.suite --rounds 5 --images 128 --out /tmp/bench

One Redis, one CPU Triton and one gateway; profiles of 100,000 users preloaded. Then:
1. rounds: in-process limit, Triton ensemble direct, gateway generic-only, gateway personalized with 1,
   1,000 and 100,000 users, alternating within each round (the machine is shared: a neighbour's burst
   hits every configuration of a round alike); the targets are medians of per-round ratios;
2. a closed-loop concurrency sweep and an images-per-request sweep of the personalized gateway;
3. open loop: Poisson arrivals at fractions of the measured saturation rate, latency from the schedule;
4. the cluster configuration (cluster.py): the same gateway on a 3-primary Redis Cluster, side by side;
5. the cache-miss path's CPU per image by process (miss_path.py), from the rounds' 1,000-user points: the
   capacity model's gateway and tritonserver figures (docs/deployment.md);
6. with --peer (`make bench PEER=1`; needs requirements/bench-peer.txt): the Ray Serve peer (peer.py).
Results: results.json, throughput.png, latency.png and summary.md under --out (peer.json, peer.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from piaa_bench import baselines, cached, cluster, locust_scale, miss_path, report
from piaa_bench.loadgen import Workload, load_photos, open_loop, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.stack import Stack, per_batch, running_stack
from piaa_bench.stats import Sample, median_ratio, rounded, summarize
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_triton.paths import onnx_dir
from piaa_triton.repository import FUSED_HEADS_FILE


@dataclass
class SuiteConfig:
    """What the suite runs; the defaults fit `make bench` in about 4 minutes on 2 quiet cores (10 loaded).
    Rounds and images are what steadies the medians: with 3 rounds of 96 images the per-CPU ratios moved
    by ±0.1 from run to run here."""

    photos: Path | None = None
    """Photo folder; default ../shared/data/photos when present, else the demo album."""
    images: int = 192
    """Images per measured point of the rounds (each configuration sends this many)."""
    batch: int = 8
    """Images per request, and the in-process batch: the same batch size everywhere."""
    concurrency: int = 4
    """Requests in flight in the rounds (batch × concurrency images in flight: saturation on 2 cores)."""
    rounds: int = 5
    users: tuple[int, ...] = (1, 1_000, 100_000)
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16)
    per_request: tuple[int, ...] = (1, 8, 32)
    open_fractions: tuple[float, ...] = (0.5, 0.8, 1.0, 1.2)
    open_duration_s: float = 8.0
    out: Path = report.RESULTS
    command: str = "make bench"
    idle_s: float = 10.0
    """Seconds over which the stack's idle CPU rate is measured before the rounds (miss_path.idle_rate)."""
    peer: bool = False
    """Also run the Ray Serve peer (peer.py) after the suite, into the same --out."""
    extra: dict[str, Any] = field(default_factory=dict)


def _gateway_point(stack: Stack, workload: Workload, concurrency: int, requests: int) -> dict[str, Any]:
    return miss_path.point(stack, workload, concurrency, requests)  # with CPU by process (cpu_role_s)


def _check_personalized(stack: Stack, photo: bytes, user: str) -> None:
    """Fails loudly unless a preloaded user's score is personalized (a silent fallback would make every
    personalized figure a generic one)."""
    with grpc.insecure_channel(stack.gateway) as ch:
        reply = pb_grpc.PersonalizationStub(ch).Score(
            pb.ScoreRequest(user_id=user, images=[pb.Image(data=photo)]), timeout=120
        )
    if not reply.scores[0].personalized:
        raise RuntimeError(f"{user} was not personalized: fallback {reply.scores[0].fallback_reason}")


def run(cfg: SuiteConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the suite and returns the results (also written under cfg.out)."""
    started = time.time()
    photos = load_photos(cfg.photos)
    requests = max(1, cfg.images // cfg.batch)
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": cfg.command,
        "machine": {
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "images_per_point": cfg.images,
            "batch": cfg.batch,
            "concurrency": cfg.concurrency,
            "rounds": cfg.rounds,
            "photos": len(photos),
            "mean_photo_kib": round(sum(map(len, photos)) / len(photos) / 1024, 1),
        },
    }
    with running_stack() as stack:
        out["config"]["cpu_layout"] = served_layout(stack.repository)
        out["preload_s"] = round(preload_profiles(stack.redis_url, max(cfg.users)), 2)
        log(f"preloaded {max(cfg.users)} profiles in {out['preload_s']} s")
        _check_personalized(stack, photos[0], user_ids(1)[0])
        model = baselines.load_in_process(stack.repository)
        model.run(photos[: cfg.batch])  # the first run of a session allocates its arenas
        precisions = baselines.precision_pair(stack.repository, onnx_dir())
        for pipeline in precisions.values():
            pipeline.run(photos[: cfg.batch])
        workloads: dict[str, Workload] = {
            "gateway_generic": Workload(photos, cfg.batch, user_ids(1), generic_only=True),
            **{
                f"gateway_personalized_{n}": Workload(photos, cfg.batch, user_ids(n), seed=n)
                for n in cfg.users
            },
        }
        # Warm every path once (Triton's Python stubs, ORT arenas, the gateway's channels).
        _gateway_point(stack, workloads["gateway_generic"], cfg.concurrency, cfg.concurrency)
        time.sleep(1)  # the warm-up's writes behind its answers, then the stack's idle CPU rate
        idle = miss_path.idle_rate(stack, cfg.idle_s)
        rounds: dict[str, list[dict[str, Any]]] = {}
        for r in range(cfg.rounds):
            load = os.getloadavg()[0]
            limit = baselines.in_process_pipelined(model, photos, cfg.batch, cfg.images)
            rounds.setdefault("in_process", []).append({**rounded(limit), "load_avg": load})
            serial = baselines.in_process(model, photos, cfg.batch, cfg.images)
            rounds.setdefault("in_process_serial", []).append({**rounded(serial), "load_avg": load})
            for precision, pipeline in precisions.items():  # the cpu profile's backbones, back to back
                measured = baselines.in_process(pipeline, photos, cfg.batch, cfg.images)
                rounds.setdefault(f"in_process_{precision}", []).append(
                    {**rounded(measured), "load_avg": load}
                )
            before = stack.counters()
            triton = summarize(
                asyncio.run(
                    baselines.triton_direct(stack.triton_url, photos, cfg.batch, cfg.concurrency, cfg.images)
                )
            )
            used = per_batch(before, stack.counters(), triton.images_ok)
            cpu = used["cpu_s"]["triton"]
            extra = {"cpu_s": cpu, "images_per_cpu_s": triton.images_ok / cpu if cpu else math.nan}
            rounds.setdefault("triton_direct", []).append(
                {**triton.to_json(), **rounded(extra), "load_avg": load}
            )
            for name, workload in workloads.items():
                point = _gateway_point(stack, workload, cfg.concurrency, requests)
                rounds.setdefault(name, []).append({**point, "load_avg": load})
            shown = ", ".join(f"{k}={v[-1]['images_per_s']:.1f}" for k, v in rounds.items())
            log(f"round {r + 1}/{cfg.rounds}: {shown} img/s (load {load:.1f})")
        out["rounds"] = rounds
        out["ratios"] = _ratios(rounds, cfg.users)
        if f"gateway_personalized_{miss_path.USERS}" in rounds:
            out["miss_path"] = miss_path.summarize_points(
                rounds[f"gateway_personalized_{miss_path.USERS}"], idle
            )
            out["ratios"].update(miss_path.ratios(out["miss_path"]))
        log(f"ratios: {out['ratios']}")

        personalized = Workload(photos, cfg.batch, user_ids(1_000), seed=7)
        out["sweep_concurrency"] = []
        for c in cfg.sweep:
            point = _gateway_point(stack, personalized, c, max(requests, 2 * c))
            out["sweep_concurrency"].append({"concurrency": c, **point})
            log(f"concurrency {c}: {point['images_per_s']:.1f} img/s p99 {point['latency_ms']['p99']} ms")
        out["sweep_images_per_request"] = []
        in_flight = cfg.batch * cfg.concurrency
        for k in cfg.per_request:
            c = max(1, in_flight // k)
            wl = Workload(photos, k, user_ids(1_000), seed=k)
            point = _gateway_point(stack, wl, c, max(2 * c, cfg.images // k))
            out["sweep_images_per_request"].append({"images_per_request": k, "concurrency": c, **point})
            log(f"{k} images/request x {c}: {point['images_per_s']:.1f} img/s")

        # The feature-cached path: the same photos again (cached.py), next to a bare grpc.aio server.
        out["cached"] = cached.compare({"gateway": stack}, photos, cfg.rounds, log)
        out["ratios"].update(_cached_ratios(out["cached"]))

        # The cluster configuration: a second gateway on a 3-primary Redis Cluster, same Triton (cluster.py).
        # The two differ by a few percent of the CPU: 4x the images per point resolve that against the
        # 10 ms CPU tick.
        with cluster.cluster_stack(stack) as clustered:
            out["cluster"] = cluster.compare(
                {"standalone": stack, "cluster": clustered}, photos, rounds=cfg.rounds,
                images=4 * cfg.images, batch=cfg.batch, concurrency=cfg.concurrency, log=log,
            )  # fmt: skip
        out["ratios"].update(out["cluster"]["ratios"])

        first = rounds[f"gateway_personalized_{cfg.users[0]}"]
        saturation = statistics.median([p["images_per_s"] for p in first])
        out["open_loop"] = []
        latencies: dict[str, list[float]] = {}
        for frac in cfg.open_fractions:
            rate = frac * saturation / cfg.batch
            samples: list[Sample] = asyncio.run(
                open_loop(stack.gateway, personalized, rate, cfg.open_duration_s, seed=int(frac * 100))
            )
            s = summarize(samples).to_json()
            out["open_loop"].append({"fraction_of_saturation": frac, "requests_per_s": round(rate, 3), **s})
            latencies[f"{frac:.0%} of saturation ({rate:.2f} req/s)"] = [
                x.latency * 1e3 for x in samples if x.code == "OK"
            ]
            log(f"open loop {frac:.0%}: p50 {s['latency_ms']['p50']} p99 {s['latency_ms']['p99']} ms")

        # Load generation (locust_scale.py): Locust with N worker processes against one, and a Locust
        # process's CPU per call against loadgen's, side by side against this gateway on the cached path.
        out["locust"] = locust_scale.compare(stack, locust_scale.ScaleConfig(photos=cfg.photos), log)
        out["ratios"].update(locust_scale.ratios(out["locust"]))
    if cfg.peer:
        from piaa_bench import peer  # needs requirements/bench-peer.txt (ray)

        peer.main(["--out", str(cfg.out)])
        out["peer"] = json.loads((cfg.out / "peer.json").read_text())["matched_p99"]
    out["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["wall_s"] = round(time.time() - started, 1)
    report.write(out, latencies, cfg.out)
    log(f"wrote {cfg.out} in {out['wall_s']} s")
    return out


def served_layout(repository: Path) -> str:
    """The cpu layout (piaa_triton.repository.CPU_LAYOUTS) of a written repository: split when a preprocess
    model decodes for the backbone, fused_heads when the backbone also holds the heads, else fused."""
    if (repository / "preprocess" / "config.pbtxt").is_file():
        return "split"
    return "fused_heads" if (repository / "backbone" / "1" / FUSED_HEADS_FILE).is_file() else "fused"


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


def _cached_ratios(results: dict[str, Any]) -> dict[str, float]:
    """The cached path's figures by point ("8x1" = 8 images/request, 1 user): serving CPU ms per image
    of the gateway's tree and of the bare grpc.aio server, and the median per-round ratio of the two."""
    out = {}
    for point, ms in results["median_cpu_ms_per_image"]["gateway"].items():
        out[f"cpu_cached_ms_per_image_{point}"] = round(ms, 3)
        out[f"cpu_grpc_floor_ms_per_image_{point}"] = round(
            results["median_cpu_ms_per_image"]["grpc_floor"][point], 3
        )
        out[f"cpu_cached_vs_grpc_floor_{point}"] = round(results["vs_floor"]["gateway"][point], 2)
    return out


def _overhead(extra: list[float], base: list[float], total: list[float]) -> float:
    """Median over rounds of (extra - base) / total."""
    return statistics.median((a - b) / c for a, b, c in zip(extra, base, total, strict=True))


def _ratios(rounds: dict[str, list[dict[str, Any]]], users: tuple[int, ...]) -> dict[str, float]:
    """The targets' ratios, each the median over rounds of that round's ratio.

    The in-process limit of a round is the better of its serial and pipelined runs (the harder bar).
    The CPU overheads compare what personalization adds to the gateway and Redis (the only processes it
    touches) with the whole pipeline's CPU per image, so Triton's own noise does not drown them.
    """

    def rate(name: str, key: str = "images_per_s") -> list[float]:
        return [p[key] if p.get(key) is not None else math.nan for p in rounds[name]]

    def limit(key: str) -> list[float]:
        return [
            max(a, b) for a, b in zip(rate("in_process", key), rate("in_process_serial", key), strict=True)
        ]

    def front_cpu(name: str) -> list[float]:
        return [(p["cpu_s"]["gateway"] + p["cpu_s"]["redis"]) / p["images_ok"] for p in rounds[name]]

    def all_cpu(name: str) -> list[float]:
        return [sum(p["cpu_s"].values()) / p["images_ok"] for p in rounds[name]]

    first, last = f"gateway_personalized_{users[0]}", f"gateway_personalized_{users[-1]}"
    generic = "gateway_generic"
    pc = "images_per_cpu_s"
    ratios = {
        "personalized_vs_in_process": median_ratio(rate(first), limit("images_per_s")),
        "triton_direct_vs_in_process": median_ratio(rate("triton_direct"), limit("images_per_s")),
        "generic_vs_triton_direct": median_ratio(rate(generic), rate("triton_direct")),
        "personalized_vs_generic": median_ratio(rate(first), rate(generic)),
        f"users_{users[-1]}_vs_{users[0]}": median_ratio(rate(last), rate(first)),
        "cpu_personalized_vs_in_process": median_ratio(rate(first, pc), limit(pc)),
        "cpu_triton_direct_vs_in_process": median_ratio(rate("triton_direct", pc), limit(pc)),
        "cpu_int8_vs_fp32": median_ratio(rate("in_process_int8", pc), rate("in_process_fp32", pc)),
        "int8_vs_fp32": median_ratio(rate("in_process_int8"), rate("in_process_fp32")),
        "cpu_generic_vs_triton_direct": median_ratio(rate(generic, pc), rate("triton_direct", pc)),
        "cpu_personalized_vs_generic": median_ratio(rate(first, pc), rate(generic, pc)),
        f"cpu_users_{users[-1]}_vs_{users[0]}": median_ratio(rate(last, pc), rate(first, pc)),
        "cpu_overhead_personalized": statistics.median(
            (a - b) / c
            for a, b, c in zip(front_cpu(first), front_cpu(generic), all_cpu(generic), strict=True)
        ),
        f"cpu_overhead_users_{users[-1]}": statistics.median(
            (a - b) / c for a, b, c in zip(front_cpu(last), front_cpu(first), all_cpu(first), strict=True)
        ),
    }
    for n in users:
        trips = [p["redis_per_triton_call"] for p in rounds[f"gateway_personalized_{n}"]]
        ratios[f"redis_round_trips_per_triton_call_{n}_users"] = statistics.median(trips)
    return {k: round(v, 3) for k, v in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    """CLI: runs the suite; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--images", type=int, default=SuiteConfig.images)
    parser.add_argument("--rounds", type=int, default=SuiteConfig.rounds)
    parser.add_argument("--open-duration", type=float, default=SuiteConfig.open_duration_s)
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("--peer", action="store_true", help="also run the Ray Serve peer (peer.py) after")
    args = parser.parse_args(argv)
    if args.peer and importlib.util.find_spec("ray") is None:
        parser.error(
            "--peer needs Ray Serve: .venv/bin/pip install -r requirements/bench-peer.txt "
            "-c requirements/constraints.txt (make bench PEER=1 does)"
        )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m piaa_bench.suite", *given]) if given else "make bench"
    cfg = SuiteConfig(
        photos=args.photos,
        images=args.images,
        rounds=args.rounds,
        open_duration_s=args.open_duration,
        out=args.out,
        command=command,
        peer=args.peer,
    )
    run(cfg, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
