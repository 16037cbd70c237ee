"""Throughput of the `piaa` ensemble in tritonserver against in-process ONNX Runtime, side by side in one run.

    python -m piaa_triton.bench --images 128 --batch 8 --concurrency 2 --rounds 3
    python -m piaa_triton.bench --images 256 --batch 1 --concurrency 8 --delays 0,2000,10000

Both paths start from encoded photo bytes and use the same preprocessing and the same ONNX files; only
the serving differs. The first form gives the ratio quoted in docs/triton.md; the second measures the
dynamic batcher's max_queue_delay_microseconds (one tritonserver per delay, from a temporary repository).
Machines here are noisy: the comparison alternates the two paths and reports the median per-round ratio;
compare numbers from one run only.
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
    """preprocess + ONNX Runtime backbone and heads in this process, batch by batch, all cores to ORT."""

    def __init__(self, repository: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.backbone = ort.InferenceSession(str(repository / "backbone/1/model.onnx"), options)
        self.heads = ort.InferenceSession(str(repository / "heads/1/model.onnx"), options)

    def run(self, chunk: Sequence[bytes]) -> None:
        (feature,) = self.backbone.run(["feature"], {"image": np.stack([preprocess(d) for d in chunk])})
        self.heads.run(OUTPUTS, {"feature": feature})

    def throughput(self, images: Sequence[bytes], batch: int) -> float:
        """Images per second over all images (after one warm-up batch)."""
        self.run(images[:batch])
        start = time.perf_counter()
        for chunk in batches(images, batch):
            self.run(chunk)
        return len(images) / (time.perf_counter() - start)


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

    Returns per-round rates and the median of the per-round ratios (ensemble / in-process).
    """
    local = InProcess(repository)
    per_round = []
    with TritonServer(ServerOptions(repository=repository)) as server:
        for _ in range(rounds):
            triton = through_triton(images, batch, concurrency, server.grpc_url)
            in_proc = local.throughput(images, batch)
            per_round.append({"triton_img_s": round(triton, 1), "in_process_img_s": round(in_proc, 1)})
    ratios = [r["triton_img_s"] / r["in_process_img_s"] for r in per_round]
    return {"rounds": per_round, "median_ratio": round(float(np.median(ratios)), 3)}


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


def main(argv: list[str] | None = None) -> int:
    """CLI: prints one JSON object with the measured rates and the arguments that produced them."""
    parser = argparse.ArgumentParser(prog="python -m piaa_triton.bench", description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="images per request, and per in-process batch")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight to Triton")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--repository", type=Path, default=repository_dir("cpu"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both paths")
    parser.add_argument("--delays", default="", help="comma-separated µs: sweep the batcher's delay instead")
    args = parser.parse_args(argv)
    images = load_images(args.photos, args.images)
    report: dict[str, object] = {
        "images": args.images,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "cores": os.cpu_count(),
    }
    if args.delays:
        report.update(
            sweep_delays(images, args.batch, args.concurrency, [int(d) for d in args.delays.split(",")])
        )
    else:
        report.update(compare(images, args.batch, args.concurrency, args.repository, args.rounds))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
