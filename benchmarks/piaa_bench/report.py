"""Writes a suite's results: results.json, throughput.png, latency.png and summary.md (kept small)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results"
"""Where the benchmarks write their results unless told --out (benchmarks/results, committed)."""

TARGETS: dict[str, tuple[str, str, float]] = {
    # ratio key (the per-CPU-second twin is "cpu_" + key): (what it is, comparison, target)
    "personalized_vs_in_process": ("personalized end-to-end / in-process limit", ">=", 0.80),
    "personalized_vs_generic": ("personalized / generic-only (overhead <= 3%)", ">=", 0.97),
    "users_100000_vs_1": ("100,000 users / 1 user (within 5%)", ">=", 0.95),
    "redis_round_trips_per_triton_call_100000_users": ("Redis round trips per Triton call", "<=", 1.0),
    "cluster_vs_standalone": (
        "personalized, gateway on a 3-primary Redis Cluster / on one Redis (1,000 users)",
        ">=",
        0.95,
    ),
    "cpu_overhead_personalized": ("personalization's extra gateway+Redis CPU / pipeline CPU", "<=", 0.03),
    "cpu_overhead_users_100000": ("100,000 users' extra gateway+Redis CPU / pipeline CPU", "<=", 0.05),
    "cpu_cached_ms_per_image_8x1": (
        "cached path, ms of serving CPU per image: 8 images/request, 1 user",
        "<=",
        0.15,
    ),
    "cpu_cached_ms_per_image_1x1": (
        "cached path, ms of serving CPU per image: 1 image/request, 1 user",
        "<=",
        0.40,
    ),
    "cpu_cached_ms_per_image_8x1000": (
        "cached path, ms per image: 8 images/request, 1,000 users",
        "<=",
        0.15,
    ),
    "cpu_cached_ms_per_image_1x1000": ("cached path, ms per image: 1 image/request, 1,000 users", "<=", 0.40),
    "cpu_cached_ms_per_image_8x1d": (
        "cached path, ms per image: 8 images/request sent by digest, 1 user",
        "",
        0.0,
    ),
    "cpu_cached_ms_per_image_1x1d": (
        "cached path, ms per image: 1 image/request sent by digest, 1 user",
        "",
        0.0,
    ),
    "cpu_cached_ms_per_image_8x1s": (
        "cached path, ms per image: 8 images/request on open ScoreStreams, 1 user",
        "<=",
        0.15,
    ),
    "cpu_cached_ms_per_image_1x1s": (
        "cached path, ms per image: 1 image/request on open ScoreStreams, 1 user",
        "<=",
        0.40,
    ),
    "cpu_grpc_floor_ms_per_image_8x1": (
        "bare grpc.aio server, same load, ms per image: 8 images/request",
        "",
        0.0,
    ),
    "cpu_grpc_floor_ms_per_image_1x1": (
        "bare grpc.aio server, same load, ms per image: 1 image/request",
        "",
        0.0,
    ),
    "cpu_grpc_floor_ms_per_image_8x1s": (
        "bare grpc.aio server, same load on open streams, ms per image: 8 images/request",
        "",
        0.0,
    ),
    "cpu_grpc_floor_ms_per_image_1x1s": (
        "bare grpc.aio server, same load on open streams, ms per image: 1 image/request",
        "",
        0.0,
    ),
    "cpu_miss_gateway_ms_per_image": (
        "cache-miss path, gateway CPU ms per image net of its idle CPU: 8 unique images/request, 4 in "
        "flight, 1,000 users (the capacity model's gateway figure, docs/deployment.md)",
        "",
        0.0,
    ),
    "cpu_miss_tritonserver_ms_per_image": (
        "cache-miss path, same load: tritonserver's own process, CPU ms per image (its Python stubs apart)",
        "",
        0.0,
    ),
    "cpu_miss_triton_stubs_ms_per_image": (
        "cache-miss path, same load: Triton's Python stubs (decode + ONNX Runtime here), CPU ms per image",
        "",
        0.0,
    ),
    "int8_vs_fp32": ("INT8 backbone / FP32 backbone, decode + backbone + heads in process", ">=", 1.3),
    "triton_direct_vs_in_process": ("Triton ensemble direct / in-process limit", ">=", 0.95),
    "generic_vs_triton_direct": ("gateway generic-only / Triton direct", "", 0.0),
}


def verdict(key: str, value: float | None) -> str:
    """'met' or 'missed by X' for a ratio with a target; '' for one without."""
    if key not in TARGETS or value is None or not TARGETS[key][1]:
        return ""
    _, op, target = TARGETS[key]
    ok = value >= target if op == ">=" else value <= target
    if ok:
        return "met"
    gap = target - value if op == ">=" else value - target
    return f"missed by {gap:.2g}" + (f" ({gap / target:.1%})" if op == ">=" else "")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def write(results: dict[str, Any], latencies: dict[str, list[float]], out: Path) -> None:
    """Writes the four files into `out` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, latencies, out)
    (out / "summary.md").write_text(summary(results))


def plot(results: dict[str, Any], latencies: dict[str, list[float]], out: Path) -> None:
    """throughput.png (images/s against concurrency, with the baselines) and latency.png (CDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    sweep = results["sweep_concurrency"]
    ax.plot(
        [p["concurrency"] for p in sweep],
        [p["images_per_s"] for p in sweep],
        "o-",
        label=f"gateway, personalized ({results['config']['batch']} images/request)",
    )
    for name, style in (("in_process", "--"), ("triton_direct", ":")):
        rates = [p["images_per_s"] for p in results["rounds"][name]]
        ax.axhline(float(np.median(rates)), linestyle=style, color="gray", label=f"{name} (median of rounds)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("requests in flight (closed loop)")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"PIAA on {results['machine']['cores']} CPU cores, {results['date'][:10]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for label, values in latencies.items():
        if values:
            v = np.sort(values)
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("latency from scheduled send (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Open loop, Poisson arrivals, personalized")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    plt.close(fig)


def _median(points: list[dict[str, Any]], key: str = "images_per_s") -> float:
    values = sorted(p[key] for p in points if p.get(key) is not None)
    if not values:
        return float("nan")
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _cluster_line(cluster: dict[str, Any]) -> str:
    """Round trips per micro-batch that the answers waited for, per configuration and node."""
    parts = []
    for name, m in cluster["medians"].items():
        nodes = m["redis_per_micro_batch_by_node"]
        by_node = ", ".join(_fmt(v) for v in nodes.values())
        parts.append(
            f"{name} {_fmt(m['redis_per_micro_batch'])} ({len(nodes)} node{'s' * (len(nodes) > 1)}: "
            f"{by_node}; {_fmt(m['redis_behind_per_micro_batch'])} behind the answer), gateway + Redis "
            f"CPU {_fmt(m['front_cpu_ms_per_image'])} ms/image"
        )
    return "Cluster configuration, Redis round trips per micro-batch (medians): " + "; ".join(parts) + "."


def summary(r: dict[str, Any]) -> str:
    """The Markdown summary: targets, baselines, sweeps, open loop; ratios first, absolutes for context."""
    m, c = r["machine"], r["config"]
    lines = [
        f"# PIAA benchmark, {r['date']}",
        "",
        f"`{r['command']}` on {m['cores']} CPU cores ({m['cpu']}), no GPU; load average "
        f"{m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end (the machine is shared: "
        f"compare ratios, not absolutes). {c['rounds']} alternating rounds of {c['images_per_point']} images "
        f"per configuration, {c['batch']} images/request, {c['concurrency']} requests in flight; "
        f"{c['photos']} photos, mean {c['mean_photo_kib']} KiB; suite wall time {r['wall_s']} s."
        + (f" Triton's cpu layout: {c['cpu_layout']}." if "cpu_layout" in c else ""),
        "",
        "## Targets (medians of per-round ratios)",
        "",
        "Wall clock: images/s side by side. Per CPU-second: images per CPU-second of the serving processes "
        "(Redis + Triton and its stubs + gateway; the in-process limit's own process), which does not "
        "depend on the share of the cores a process tree wins from the other jobs on the machine.",
        "",
        "| ratio | wall clock | per CPU-second | target |",
        "|---|---|---|---|",
    ]
    ratios = r["ratios"]
    for key, (what, op, target) in TARGETS.items():
        if key not in ratios:
            continue
        wall, cpu = ratios[key], ratios.get("cpu_" + key)
        if key.startswith("cpu_"):  # a CPU-only figure
            wall, cpu = None, ratios[key]
        goal = f"{op} {target}: " + " / ".join(verdict(key, v) for v in (wall, cpu) if v is not None)
        goal = goal if op else "-"
        lines.append(f"| {what} | {_fmt(wall)} | {_fmt(cpu)} | {goal} |")
    trips = [k for k in ratios if k.startswith("redis_round_trips") and k not in TARGETS]
    lines.append("")
    lines.append(
        "Redis round trips per Triton call by users: "
        + ", ".join(f"{k.rsplit('_', 2)[1]}: {_fmt(ratios[k])}" for k in trips)
        + "."
    )
    if "cluster" in r:
        lines += ["", _cluster_line(r["cluster"])]
    if "locust" in r:
        from piaa_bench.locust_scale import summary_line  # imported here: it pulls in the stack's modules

        lines += ["", summary_line(r["locust"])]
    lines += [
        "",
        "## Rounds (medians over rounds)",
        "",
        "| configuration | images/s | images/CPU-s | p99 ms | CPU s: redis / triton / gateway / client |",
        "|---|---|---|---|---|",
    ]
    for name, points in r["rounds"].items():
        p99 = [p["latency_ms"]["p99"] for p in points if p.get("latency_ms", {}).get("p99") is not None]
        split = "-"
        if isinstance(points[0].get("cpu_s"), dict):
            parts = [
                _median([{"v": p["cpu_s"].get(k, 0.0)} for p in points], "v")
                for k in ("redis", "triton", "gateway")
            ]
            client = _median(points, "client_cpu_s")
            split = " / ".join(f"{v:.1f}" for v in [*parts, client])
        elif points[0].get("cpu_s") is not None:
            where = "Triton" if name == "triton_direct" else "this process"
            split = f"{_median(points, 'cpu_s'):.1f} ({where})"
        lines.append(
            f"| {name} | {_median(points):.1f} | {_fmt(_median(points, 'images_per_cpu_s'))} | "
            f"{_fmt(_median([{'v': v} for v in p99], 'v') if p99 else None)} | {split} |"
        )
    lines += [
        "",
        "## Closed loop, personalized (1,000 users)",
        "",
        "| in flight | images/request | images/s | images/CPU-s | p50 ms | p99 ms | errors "
        "| Redis/Triton call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["sweep_concurrency"] + r["sweep_images_per_request"]:
        lines.append(
            f"| {p['concurrency']} | {p.get('images_per_request', c['batch'])} | {p['images_per_s']:.1f} | "
            f"{_fmt(p.get('images_per_cpu_s'))} | {_fmt(p['latency_ms']['p50'])} | "
            f"{_fmt(p['latency_ms']['p99'])} | {p['errors'] or '-'} | {_fmt(p['redis_per_triton_call'])} |"
        )
    lines += [
        "",
        "## Open loop (Poisson arrivals; latency from the scheduled send)",
        "",
        "| load | requests/s | images/s | p50 ms | p95 ms | p99 ms | errors | stages ms (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["open_loop"]:
        lat = p["latency_ms"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in p["stages_ms"].items())
        lines.append(
            f"| {p['fraction_of_saturation']:.0%} | {_fmt(p['requests_per_s'])} | {p['images_per_s']:.1f} | "
            f"{_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | {p['errors'] or '-'} "
            f"| {stages} |"
        )
    lines += ["", "![throughput](throughput.png) ![latency](latency.png)", ""]
    return "\n".join(lines)
