"""Triton direct against the in-process limit for each cpu layout of decode and backbone, in one run.

    python -m piaa_bench.layouts --rounds 5 --images 192
    python -m piaa_bench.layouts --variants split,fused,fused_one --rounds 3

One tritonserver per variant, each from its own repository written by piaa_triton.repository (same ONNX
files, same batching) and all running at once; every round measures the in-process limit (serial and
pipelined, baselines.py) and then each variant's `piaa` ensemble over gRPC, in turn, so a neighbour's burst
hits all of a round alike. Images per CPU-second count the whole tritonserver tree (stubs included). The
ratios are medians over rounds of variant / limit, the limit being the better of serial and pipelined.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from piaa_bench import baselines
from piaa_bench.loadgen import load_photos
from piaa_bench.stack import cpu_seconds, process_tree
from piaa_bench.stats import median_ratio, rounded, summarize
from piaa_triton.config import GENERATED_HEADER, parse
from piaa_triton.repository import write_repository
from piaa_triton.server import ServerOptions, TritonServer


@dataclass(frozen=True)
class Variant:
    """One way to serve decode + backbone: a layout and changes to the generated backbone config."""

    layout: str
    instances: int = 0
    """Backbone instances (0: the cpu plan's)."""
    parameters: dict[str, str] = field(default_factory=dict)
    """Backbone config parameters set over the plan's (decode_threads, intra_op_threads)."""


VARIANTS = {
    "split": Variant("split"),
    "fused": Variant("fused"),
    "fused_one": Variant("fused", instances=1, parameters={"intra_op_threads": str(os.cpu_count() or 1)}),
    "fused_wide": Variant("fused", parameters={"intra_op_threads": str(os.cpu_count() or 1)}),
    "fused_heads": Variant("fused_heads"),
}
"""split, fused and fused_heads are the layouts piaa_triton.repository writes (fused: two instances, half the
cores each; fused_heads, the default: fused with the heads run inside the backbone stub, `piaa` one step);
fused_one is one fused instance with every core, decoding and inferring in turn; fused_wide is two instances
with every core each (a lone request gets all cores, two at once oversubscribe them)."""
DEFAULT_VARIANTS = ("split", "fused", "fused_heads")


def cpu_by_model(pid: int) -> dict[str, float]:
    """CPU seconds so far of a tritonserver tree by role: "tritonserver" (gRPC, ensemble scheduler, batchers)
    and each model's Python stubs, named from the model.py path each stub is started with."""
    out: dict[str, float] = {}
    for process in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            args = process.cmdline()
            model = Path(args[1]).parent.parent.name if len(args) > 1 and args[1].endswith(".py") else ""
            name = model if process.pid != pid and model else "tritonserver"
            times = process.cpu_times()
            out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def write_variant(variant: Variant, out: Path) -> Path:
    """Writes the cpu repository of `variant` to `out` (the exporter's build/onnx); returns `out`."""
    write_repository("cpu", out, layout=variant.layout)
    config_path = out / "backbone" / "config.pbtxt"
    config = parse(config_path.read_text())
    if variant.instances:
        config.instance_group[0].count = variant.instances
    for key, value in variant.parameters.items():
        config.parameters[key].string_value = value
    from google.protobuf import text_format

    config_path.write_text(GENERATED_HEADER + text_format.MessageToString(config))
    return out


def measure(
    names: Sequence[str],
    photos: Sequence[bytes],
    *,
    rounds: int,
    images: int,
    batch: int,
    concurrency: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the rounds; returns per-round figures, CPU ms per image and the median ratios to the limit."""
    per_round: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="piaa-layouts-") as tmp, contextlib.ExitStack() as stack:
        servers: dict[str, TritonServer] = {}
        for name in names:
            repository = write_variant(VARIANTS[name], Path(tmp) / name)
            servers[name] = stack.enter_context(TritonServer(ServerOptions(repository=repository)))
        model = baselines.load_in_process(Path(tmp) / names[0])
        model.run(photos[:batch])
        # The in-process pipeline with one ORT thread: a second, easier-to-beat reference, reported apart,
        # because a backbone instance with one thread wastes less CPU than one with two.
        one_thread = baselines.Pipeline(Path(tmp) / names[0], backbone_threads=1)
        one_thread.run(photos[:batch])
        for server in servers.values():  # every stub loaded and its arenas allocated
            asyncio.run(baselines.triton_direct(server.grpc_url, photos, batch, 1, batch))
        for r in range(rounds):
            load = os.getloadavg()[0]
            limits = {"in_process": baselines.in_process_pipelined, "serial": baselines.in_process}
            for key, run in limits.items():
                per_round.setdefault(key, []).append({**run(model, photos, batch, images), "load_avg": load})
            alone = baselines.in_process(one_thread, photos, batch, images)
            per_round.setdefault("serial_one_thread", []).append({**alone, "load_avg": load})
            for name, server in servers.items():
                assert server.process is not None
                pid = server.process.pid
                before, parts = cpu_seconds(pid), cpu_by_model(pid)
                direct = baselines.triton_direct(server.grpc_url, photos, batch, concurrency, images)
                samples = asyncio.run(direct)
                cpu = cpu_seconds(pid) - before
                summary = summarize(samples)
                ms = {
                    k: 1e3 * (v - parts.get(k, 0.0)) / summary.images_ok for k, v in cpu_by_model(pid).items()
                }
                per_round.setdefault(name, []).append(
                    {
                        "images_per_s": summary.images_per_s,
                        "images_ok": summary.images_ok,
                        "cpu_s": cpu,
                        "images_per_cpu_s": summary.images_ok / cpu,
                        "cpu_ms_per_image_by_process": ms,
                        "load_avg": load,
                    }
                )
            shown = ", ".join(
                f"{k} {v[-1]['images_per_s']:.1f}/s {v[-1]['images_per_cpu_s']:.1f}/cpu-s"
                for k, v in per_round.items()
            )
            log(f"round {r + 1}/{rounds} (load {load:.1f}): {shown}")
    return {"rounds": rounded(per_round), **summarize_rounds(per_round, names)}


def summarize_rounds(per_round: dict[str, list[dict[str, Any]]], names: Sequence[str]) -> dict[str, Any]:
    """Median CPU ms per image of each path (in all and by process), and each variant's median per-round
    ratio to the limit (the better of the serial and pipelined in-process runs of its round) and to the
    first variant, per CPU and on the wall clock."""

    def rate(name: str, key: str) -> list[float]:
        return [p[key] for p in per_round[name]]

    def limit(key: str) -> list[float]:
        return [max(a, b) for a, b in zip(rate("in_process", key), rate("serial", key), strict=True)]

    cpu_ms = {
        name: round(statistics.median(1e3 / x for x in rate(name, "images_per_cpu_s")), 3)
        for name in ("in_process", "serial", "serial_one_thread", *names)
    }
    ratios = {
        name: {
            "per_cpu": round(median_ratio(rate(name, "images_per_cpu_s"), limit("images_per_cpu_s")), 3),
            "wall": round(median_ratio(rate(name, "images_per_s"), limit("images_per_s")), 3),
        }
        for name in names
    }
    by_process = {
        name: {
            part: round(
                statistics.median(p["cpu_ms_per_image_by_process"].get(part, 0.0) for p in per_round[name]), 3
            )
            for part in per_round[name][0]["cpu_ms_per_image_by_process"]
        }
        for name in names
    }

    def against(name: str, other: str) -> dict[str, float]:
        keys = {"per_cpu": "images_per_cpu_s", "wall": "images_per_s"}
        return {k: round(median_ratio(rate(name, key), rate(other, key)), 3) for k, key in keys.items()}

    first = {name: against(name, names[0]) for name in names[1:]}
    one = rate("serial_one_thread", "images_per_cpu_s")
    per_cpu_one = {name: round(median_ratio(rate(name, "images_per_cpu_s"), one), 3) for name in names}
    return {
        "cpu_ms_per_image": cpu_ms,
        "cpu_ms_per_image_by_process": by_process,
        "vs_in_process": ratios,
        f"vs_{names[0]}": first,
        "per_cpu_vs_one_thread": per_cpu_one,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: prints the results as JSON (and writes them to --out when given)."""
    parser = argparse.ArgumentParser(prog="python -m piaa_bench.layouts", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=96, help="images per variant per round")
    parser.add_argument("--batch", type=int, default=8, help="images per request and in-process batch")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight to Triton")
    parser.add_argument("--photos", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    photos = load_photos(args.photos)
    start_load = [round(x, 2) for x in os.getloadavg()]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = measure(
        names, photos, rounds=args.rounds, images=args.images, batch=args.batch,
        concurrency=args.concurrency, log=log,
    )  # fmt: skip
    report = {
        "command": " ".join(["python -m piaa_bench.layouts", *(argv if argv is not None else sys.argv[1:])]),
        "cores": os.cpu_count(),
        "load_avg_start": start_load,
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "config": {"images": args.images, "batch": args.batch, "concurrency": args.concurrency},
        **results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
