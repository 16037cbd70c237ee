"""The ONNX Runtime session factory every export step uses (feature extraction, parity checks, engines)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def session(path: Path, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    """A CPU ONNX Runtime session for the model at `path` (threads=0: ONNX Runtime's default; optimize=False:
    no graph optimization, so Q/DQ pairs run as written instead of fused into integer kernels)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
