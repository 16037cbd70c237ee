"""CPU cost per image of JPEG decode + preprocess vs the ONNX Runtime backbone, side by side, on this machine.

The sizing guide needs the ratio (how many decode cores feed one backbone core, and what is left for a GPU
to take over), not absolute speed: the two are measured alternately in the same run, on the same photos.
  .venv/bin/python deploy/cpu_costs.py --photos ../shared/data/photos [--images 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from piaa_triton.imaging import preprocess
from piaa_triton.paths import onnx_dir

BATCH = 16


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints ms per image for decode and for the backbone (one thread each) and their ratio."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=Path, required=True, help="a folder of JPEG photos")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    files = sorted(f for f in args.photos.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))[: args.images]
    if len(files) < BATCH:
        parser.error(f"need at least {BATCH} JPEGs in {args.photos}")
    blobs = [f.read_bytes() for f in files]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # per-core cost: compare one core of decode with one core of backbone
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(onnx_dir() / "backbone.onnx"), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    decode_ms, backbone_ms = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        images = np.stack([preprocess(b) for b in blobs])
        decode_ms.append((time.perf_counter() - start) * 1000 / len(blobs))
        start = time.perf_counter()
        for i in range(0, len(images) - BATCH + 1, BATCH):
            session.run(None, {name: images[i : i + BATCH]})
        backbone_ms.append((time.perf_counter() - start) * 1000 / (len(images) // BATCH * BATCH))
    decode, backbone = statistics.median(decode_ms), statistics.median(backbone_ms)
    mean_kb = sum(len(b) for b in blobs) / len(blobs) / 1024
    print(
        f"{len(blobs)} JPEGs (mean {mean_kb:.0f} KB), median of {args.rounds} alternating rounds, 1 thread:"
    )
    print(f"  decode + preprocess: {decode:.1f} ms/image")
    print(f"  backbone (ORT, batch {BATCH}): {backbone:.1f} ms/image")
    print(f"  backbone / decode: {backbone / decode:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
