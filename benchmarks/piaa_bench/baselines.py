"""The baselines every gateway figure is divided by: the in-process limit and the Triton ensemble alone.

Both start from the same encoded photos, the same preprocessing (piaa_triton.imaging) and the same ONNX
files as the gateway path; only the serving differs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from piaa_bench.stats import Sample
from piaa_client import features as fs
from piaa_triton.bench import OUTPUTS, batches
from piaa_triton.imaging import preprocess


def _measured(images: int, wall: float, cpu: float) -> dict[str, float]:
    return {
        "images_per_s": images / wall,
        "cpu_s": cpu,
        "images_per_cpu_s": images / cpu if cpu else math.nan,
    }


def in_process(model: Pipeline, photos: Sequence[bytes], batch: int, images: int) -> dict[str, float]:
    """Decode + ONNX Runtime backbone and heads in this process, `batch` images at a time, one after the
    other: images/s, CPU seconds of this process and images per CPU-second.

    `model` (load_in_process) is built once and warmed by the caller; `images` photos are taken in turn
    from `photos`.
    """
    todo = [photos[i % len(photos)] for i in range(images)]
    start, cpu = time.perf_counter(), time.process_time()
    for chunk in batches(todo, batch):
        model.run(chunk)
    return _measured(images, time.perf_counter() - start, time.process_time() - cpu)


def in_process_pipelined(
    model: Pipeline, photos: Sequence[bytes], batch: int, images: int
) -> dict[str, float]:
    """in_process's figures for the same pipeline with decoding of batch k+1 (one thread) overlapping
    ONNX Runtime on batch k: what one process can get out of this machine, the limit the servers are
    measured against.

    Pillow and ONNX Runtime both release the GIL, as Triton's separate preprocess and backbone models
    overlap; without the overlap the in-process figure would understate the limit.
    """
    todo = [photos[i % len(photos)] for i in range(images)]
    chunks = list(batches(todo, batch))

    def decode(chunk: Sequence[bytes]) -> np.ndarray:
        return np.stack([preprocess(d) for d in chunk])

    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode, chunks[0])
        for i in range(len(chunks)):
            pixels = pending.result()
            if i + 1 < len(chunks):
                pending = pool.submit(decode, chunks[i + 1])
            (feature,) = model.backbone.run(["feature"], {"image": pixels})
            model.heads.run(OUTPUTS, {"feature": feature})
    return _measured(images, time.perf_counter() - start, time.process_time() - cpu)


class Pipeline:
    """Decode + backbone + heads in this process with the CPU profile's thread settings (backbone 2
    intra-op threads, heads 1, idle threads sleep rather than spin), from a Triton repository's ONNX files."""

    def __init__(
        self,
        repository: Path,
        backbone_threads: int = 2,
        heads_threads: int = 1,
        backbone: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        def session(path: Path, threads: int) -> ort.InferenceSession:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # As in piaa_triton.python_models: spinning idle threads would burn the cores decoding needs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            return ort.InferenceSession(str(path), options)

        self.backbone = session(backbone or repository / "backbone/1/model.onnx", backbone_threads)
        self.heads = session(repository / "heads/1/model.onnx", heads_threads)

    def run(self, chunk: Sequence[bytes]) -> None:
        """One batch, decode then inference."""
        (feature,) = self.backbone.run(["feature"], {"image": np.stack([preprocess(d) for d in chunk])})
        self.heads.run(OUTPUTS, {"feature": feature})


def precision_pair(repository: Path, onnx: Path) -> dict[str, Pipeline]:
    """The in-process pipeline with the FP32 and with the INT8 backbone of the exporter's folder `onnx`
    (heads from the repository): the cpu profile's two precisions, side by side."""
    from piaa_triton.repository import backbone_onnx

    return {p: Pipeline(repository, backbone=backbone_onnx(onnx, p)) for p in ("fp32", "int8")}


def load_in_process(repository: Path) -> Pipeline:
    """The in-process pipeline on the ONNX files of a Triton repository (backbone/1, heads/1)."""
    return Pipeline(repository)


async def triton_direct(
    grpc_url: str, photos: Sequence[bytes], batch: int, concurrency: int, images: int, *, model: str = "piaa"
) -> list[Sample]:
    """The ensemble over gRPC (tritonclient aio), no gateway: `batch` images a request, `concurrency`
    requests in flight, closed loop; one Sample per request (code = the error's status, else OK)."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.utils import InferenceServerException

    todo = [photos[i % len(photos)] for i in range(images)]
    chunks = list(batches(todo, batch))
    client = triton_aio.InferenceServerClient(grpc_url)
    outputs = [triton_aio.InferRequestedOutput(o.name) for o in fs.HEAD_OUTPUTS]

    def inputs(chunk: Sequence[bytes]) -> list[triton_aio.InferInput]:
        tensor = triton_aio.InferInput(fs.ENSEMBLE_INPUT.name, [len(chunk), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[d] for d in chunk], dtype=object))
        return [tensor]

    samples: list[Sample] = []
    left = iter(chunks)

    async def caller() -> None:
        for chunk in left:
            sent = time.perf_counter()
            code = "OK"
            try:
                await client.infer(model, inputs(chunk), outputs=outputs, client_timeout=60)
            except InferenceServerException as e:
                code = str(e.status() or "UNKNOWN").removeprefix("StatusCode.")
            samples.append(Sample(sent, sent, time.perf_counter(), len(chunk), code))

    try:
        await client.infer(model, inputs(chunks[0]), outputs=outputs)  # warm-up
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    finally:
        await client.close()
    return samples
