"""Throughput of the `piaa` ensemble in tritonserver against in-process ONNX Runtime, side by side in one run.

    python -m piaa_triton.bench --images 128 --batch 8 --concurrency 2 --rounds 3
    python -m piaa_triton.bench --images 256 --batch 1 --concurrency 8 --delays 0,2000,10000
    python -m piaa_triton.bench --url HOST:8001 --images 4096 --batch 64 --concurrency 4

Both paths start from encoded photo bytes and use the same preprocessing and the same ONNX files; only
the serving differs. The first form gives the ratios quoted in docs/triton.md: wall clock, and images per
CPU-second (tritonserver's whole process tree, stubs included, against this process's CPU time), which a
neighbour on a shared machine does not skew; the second measures the dynamic batcher's
max_queue_delay_microseconds (one tritonserver per delay, from a temporary repository); the third measures
the ensemble of a Triton already running (benchmarks/gpu/run.sh: the gpu profile). Machines here are
noisy: the comparison alternates the two paths and reports the median per-round ratio; compare numbers
from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from piaa_client import features as fs
from piaa_triton.imaging import preprocess
from piaa_triton.paths import REPO_ROOT, repository_dir
from piaa_triton.repository import CPU_BATCHING, write_repository
from piaa_triton.server import ServerOptions, TritonServer

DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "data" / "photos"
OUTPUTS = [o.name for o in fs.HEAD_OUTPUTS]


def load_images(folder: Path, count: int) -> list[bytes]:
    """`count` encoded photos from a folder (cycled when it holds fewer). Raises FileNotFoundError."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise FileNotFoundError(f"no photos in {folder}: pass --photos DIR")
    return [files[i % len(files)].read_bytes() for i in range(count)]


def batches(images: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    return [images[i : i + size] for i in range(0, len(images), size)]


class InProcess:
    """preprocess + ONNX Runtime backbone and heads in this process, batch by batch, all cores to ORT, idle
    threads sleeping as in the Triton models (spinning would bill this side CPU the work does not need)."""

    def __init__(self, repository: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.backbone = ort.InferenceSession(str(repository / "backbone/1/model.onnx"), options)
        self.heads = ort.InferenceSession(str(repository / "heads/1/model.onnx"), options)

    def run(self, chunk: Sequence[bytes]) -> None:
        pixels = np.stack([preprocess(d) for d in chunk])
        (feature,) = self.backbone.run([fs.BACKBONE_FEATURE.name], {fs.BACKBONE_INPUT.name: pixels})
        self.heads.run(OUTPUTS, {fs.BACKBONE_FEATURE.name: feature})

    def throughput(self, images: Sequence[bytes], batch: int) -> tuple[float, float]:
        """(images per second, images per CPU-second of this process) over all images, after a warm-up."""
        self.run(images[:batch])
        start, cpu = time.perf_counter(), time.process_time()
        for chunk in batches(images, batch):
            self.run(chunk)
        return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far (Triton's stubs are its children)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def through_triton(images: Sequence[bytes], batch: int, concurrency: int, grpc_url: str) -> float:
    """Images per second through the ensemble over gRPC: `batch` images a request, `concurrency` in flight."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)

    def inputs(chunk: Sequence[bytes]) -> list[grpcclient.InferInput]:
        tensor = grpcclient.InferInput(fs.ENSEMBLE_INPUT.name, [len(chunk), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[d] for d in chunk], dtype=object))
        return [tensor]

    chunks = batches(images, batch)
    client.infer("piaa", inputs(chunks[0]))  # warm-up
    slots = threading.Semaphore(concurrency)
    errors: list[object] = []
    finished = threading.Event()
    remaining = [len(chunks)]
    lock = threading.Lock()

    def done(result: object, error: object) -> None:
        if error is not None:
            errors.append(error)
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.set()

    start = time.perf_counter()
    for chunk in chunks:
        slots.acquire()
        client.async_infer("piaa", inputs(chunk), done)
    finished.wait()
    elapsed = time.perf_counter() - start
    client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    return len(images) / elapsed


def compare(
    images: Sequence[bytes], batch: int, concurrency: int, repository: Path, rounds: int = 3
) -> dict[str, object]:
    """Both paths, alternating for `rounds` rounds so a noisy neighbour hits both alike.

    Returns per-round rates (images per second and per CPU-second; Triton's CPU is its process tree's) and
    the medians of the per-round ratios ensemble / in-process: `median_ratio` (wall clock) and
    `median_ratio_per_cpu`.
    """
    local = InProcess(repository)
    per_round = []
    with TritonServer(ServerOptions(repository=repository)) as server:
        assert server.process is not None, "started by the context manager"
        pid = server.process.pid
        through_triton(images[:batch], batch, 1, server.grpc_url)  # every stub loaded and warm
        for _ in range(rounds):
            cpu = tree_cpu_seconds(pid)
            triton = through_triton(images, batch, concurrency, server.grpc_url)
            triton_cpu = len(images) / (tree_cpu_seconds(pid) - cpu)
            in_proc, in_proc_cpu = local.throughput(images, batch)
            per_round.append(
                {
                    "triton_img_s": round(triton, 1),
                    "in_process_img_s": round(in_proc, 1),
                    "triton_img_per_cpu_s": round(triton_cpu, 2),
                    "in_process_img_per_cpu_s": round(in_proc_cpu, 2),
                }
            )
    ratios = [r["triton_img_s"] / r["in_process_img_s"] for r in per_round]
    per_cpu = [r["triton_img_per_cpu_s"] / r["in_process_img_per_cpu_s"] for r in per_round]
    return {
        "rounds": per_round,
        "median_ratio": round(float(np.median(ratios)), 3),
        "median_ratio_per_cpu": round(float(np.median(per_cpu)), 3),
    }


def sweep_delays(
    images: Sequence[bytes], batch: int, concurrency: int, delays: Sequence[int]
) -> dict[str, float]:
    """Ensemble throughput for each max_queue_delay_microseconds, each from its own temporary repository
    written from the exporter's build/onnx (the precision: repository.cpu_precision's default)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="piaa-bench-") as tmp:
        for delay in delays:
            out = Path(tmp) / f"delay{delay}"
            write_repository("cpu", out, policy=replace(CPU_BATCHING, max_queue_delay_us=delay))
            with TritonServer(ServerOptions(repository=out)) as server:
                results[f"delay_{delay}us_img_s"] = through_triton(
                    images, batch, concurrency, server.grpc_url
                )
    return results


def parser() -> argparse.ArgumentParser:
    """The CLI's flags (benchmarks/gpu/run.sh calls it; a unit test parses that script's calls with it)."""
    p = argparse.ArgumentParser(prog="python -m piaa_triton.bench", description=__doc__)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="images per request, and per in-process batch")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight to Triton")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--repository", type=Path, default=repository_dir("cpu"))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both paths")
    p.add_argument("--delays", default="", help="comma-separated µs: sweep the batcher's delay instead")
    p.add_argument(
        "--url",
        default="",
        help="host:port of a running Triton's gRPC: measure its `piaa` ensemble alone (the gpu check)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI: prints one JSON object with the measured rates and the arguments that produced them."""
    args = parser().parse_args(argv)
    images = load_images(args.photos, args.images)
    report: dict[str, object] = {
        "images": args.images,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "cores": os.cpu_count(),
    }
    if args.url:
        through_triton(images[: args.batch], args.batch, 1, args.url)  # warm: engines, DALI, stubs
        report["triton_img_s"] = round(through_triton(images, args.batch, args.concurrency, args.url), 1)
    elif args.delays:
        report.update(
            sweep_delays(images, args.batch, args.concurrency, [int(d) for d in args.delays.split(",")])
        )
    else:
        report.update(compare(images, args.batch, args.concurrency, args.repository, args.rounds))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
