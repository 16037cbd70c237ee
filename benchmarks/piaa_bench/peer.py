"""The gateway against the Ray Serve peer (ray_peer), side by side under the same closed-loop load.

    python -m piaa_bench.peer                    # needs requirements/bench-peer.txt; ~4 min on 2 cores
    python -m piaa_bench.peer --concurrency 2,4,8 --rounds 3 --images 96

Same photos, 8 images/request, 1,000 preloaded users, same ONNX files, same batch limits (16 images,
2 ms). Rounds alternate the two servers at each concurrency; results go to peer.json and peer.md under
--out. In a closed loop at equal concurrency, Little's law ties mean latency to concurrency/throughput,
so the comparison is also made at matched p99: the throughput each reaches at the largest p99 both meet.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from piaa_bench import ray_peer
from piaa_bench.loadgen import Workload, closed_loop, drive_closed, load_photos, user_ids
from piaa_bench.preload import preload_profiles
from piaa_bench.report import RESULTS
from piaa_bench.stack import cpu_seconds, running_stack
from piaa_bench.stats import Sample, median_ratio, rounded, summarize
from piaa_common.process import free_port

USERS = 1_000


async def _peer_run(url: str, workload: Workload, concurrency: int, requests: int) -> list[Sample]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await drive_closed(
            lambda due: ray_peer.http_send(session, url, workload, due), concurrency, requests
        )


def _cpu(pids: Any) -> float:
    """CPU seconds so far of processes and their descendants."""
    return sum(cpu_seconds(pid) for pid in pids)


def at_matched_p99(gateway: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput of each side at the largest p99 both reach (linear in p99 between sweep points)."""

    def curve(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
        return sorted((p["p99_ms"], p["images_per_s"]) for p in points)

    def rate_at(points: list[tuple[float, float]], p99: float) -> float:
        best = 0.0
        for (x0, y0), (x1, y1) in zip([(0.0, 0.0), *points], points, strict=False):
            if x0 <= p99 <= x1:
                best = max(best, y0 + (y1 - y0) * (p99 - x0) / ((x1 - x0) or 1.0))
            elif x1 <= p99:
                best = max(best, y1)
        return best

    g, p = curve(gateway), curve(peer)
    slo = min(g[-1][0], p[-1][0])
    gw, pr = rate_at(g, slo), rate_at(p, slo)
    return {"p99_ms": slo, "gateway_images_per_s": gw, "peer_images_per_s": pr, "ratio": gw / pr if pr else 0}


def main(argv: list[str] | None = None) -> int:
    """CLI: runs the comparison, writes peer.json and peer.md; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.peer", description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--concurrency", default="2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    photos = load_photos(args.photos)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with running_stack() as stack:
        preload_profiles(stack.redis_url, USERS)
        url = ray_peer.deploy(stack.repository, stack.redis_url, free_port())
        try:
            for r in range(args.rounds):
                for c in levels:
                    requests = max(2 * c, args.images // args.batch)
                    wl = Workload(photos, args.batch, user_ids(USERS), seed=r * 100 + c)
                    cpu0 = _cpu(stack.pids.values())
                    samples = asyncio.run(closed_loop(stack.gateway, wl, c, requests))
                    cpu1 = _cpu(stack.pids.values())
                    ray0 = _cpu(ray_peer.ray_pids(set(stack.pids.values())))
                    peer = asyncio.run(_peer_run(url, wl, c, requests))
                    ray1 = _cpu(ray_peer.ray_pids(set(stack.pids.values())))
                    used = {"gateway": cpu1 - cpu0, "ray_serve": ray1 - ray0}
                    for name, got in (("gateway", samples), ("ray_serve", peer)):
                        s = summarize(got).to_json()
                        row = {
                            "images_per_cpu_s": s["images_ok"] / used[name] if used[name] else None,
                            "images_per_s": s["images_per_s"],
                            "p99_ms": s["latency_ms"]["p99"],
                            "p50_ms": s["latency_ms"]["p50"],
                            "errors": s["errors"],
                            "load_avg": round(os.getloadavg()[0], 2),
                        }
                        rows.setdefault((name, c), []).append(row)
                    shown = f"gateway {rows['gateway', c][-1]} ray {rows['ray_serve', c][-1]}"
                    print(f"round {r + 1} c={c}: {shown}", flush=True)
        finally:
            ray_peer.shutdown()
    table = []
    for c in levels:
        g, p = rows["gateway", c], rows["ray_serve", c]
        table.append(
            {
                "concurrency": c,
                "gateway_images_per_s": statistics.median(x["images_per_s"] for x in g),
                "ray_images_per_s": statistics.median(x["images_per_s"] for x in p),
                "gateway_p99_ms": statistics.median(x["p99_ms"] for x in g),
                "ray_p99_ms": statistics.median(x["p99_ms"] for x in p),
                "throughput_ratio": median_ratio(
                    [x["images_per_s"] for x in g], [x["images_per_s"] for x in p]
                ),
                "per_cpu_ratio": median_ratio(
                    [x["images_per_cpu_s"] or math.nan for x in g],
                    [x["images_per_cpu_s"] or math.nan for x in p],
                ),
            }
        )
    matched = at_matched_p99(
        [{"p99_ms": t["gateway_p99_ms"], "images_per_s": t["gateway_images_per_s"]} for t in table],
        [{"p99_ms": t["ray_p99_ms"], "images_per_s": t["ray_images_per_s"]} for t in table],
    )
    result = rounded(
        {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python -m piaa_bench.peer " + " ".join(sys.argv[1:] if argv is None else argv),
            "cores": os.cpu_count(),
            "rounds": args.rounds,
            "batch": args.batch,
            "users": USERS,
            "table": table,
            "matched_p99": matched,
            "raw": {f"{k[0]}@{k[1]}": v for k, v in rows.items()},
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Gateway vs Ray Serve peer, {result['date']}",
        "",
        f"`{result['command'].strip()}`, "
        f"{result['cores']} cores, {args.rounds} alternating rounds, {args.batch} images/request, "
        f"{USERS} users (medians over rounds)",
        "",
        "| in flight | gateway img/s | Ray Serve img/s | ratio (median of rounds) | ratio per CPU-second "
        "| gateway p99 ms "
        "| Ray p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in result["table"]:
        lines.append(
            f"| {t['concurrency']} | {t['gateway_images_per_s']} | {t['ray_images_per_s']} | "
            f"{t['throughput_ratio']} | {t['per_cpu_ratio']} | {t['gateway_p99_ms']} | {t['ray_p99_ms']} |"
        )
    m = result["matched_p99"]
    lines += [
        "",
        f"At matched p99 = {m['p99_ms']} ms: gateway {m['gateway_images_per_s']} img/s, "
        f"Ray Serve {m['peer_images_per_s']} img/s, ratio {m['ratio']}.",
        "",
    ]
    (args.out / "peer.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
