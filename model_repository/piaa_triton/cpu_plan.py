"""The cpu profile's choices: backbone precision, decode/backbone layout, and the cores each stub gets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from piaa_triton.exceptions import RepositoryError
from piaa_triton.paths import BACKBONE_INT8_CPU_ONNX

# --- the CPU backbone's precision -------------------------------------------------------------------
CPU_PRECISIONS = ("fp32", "int8")
DEFAULT_CPU_PRECISION = "int8"
"""int8 serves paths.BACKBONE_INT8_CPU_ONNX (piaa_export.quantize): within 0.3 points of FP32's ImageNet top-1
on the shared photos and ~2x the images per CPU-second of the FP32 backbone here (docs/models.md)."""
PRECISION_ENV = "PIAA_CPU_PRECISION"


def cpu_precision(precision: str | None = None) -> str:
    """The cpu profile's backbone precision: `precision` if given, else $PIAA_CPU_PRECISION, else int8.

    Raises RepositoryError for a value not in CPU_PRECISIONS.
    """
    return _chosen("precision", precision, PRECISION_ENV, DEFAULT_CPU_PRECISION, CPU_PRECISIONS)


def backbone_onnx(onnx: Path, precision: str) -> Path:
    """The backbone file the cpu profile serves at `precision` from the exporter's folder."""
    return onnx / (BACKBONE_INT8_CPU_ONNX if precision == "int8" else "backbone.onnx")


# --- the CPU layout: decode and backbone in one stub or two ------------------------------------------
CPU_LAYOUTS = ("fused_heads", "fused", "split")
DEFAULT_CPU_LAYOUT = "fused_heads"
"""fused: model `backbone` takes the image bytes and decodes them itself (python_models.DecodeBackboneModel);
fused_heads: fused, and `backbone` also serves the heads' outputs, so that `piaa` is one step (the `heads`
model stays, for the side-by-side spaces and for re-scoring stored features; the ensemble names it);
split: a `preprocess` model decodes and hands uint8 pixels to `backbone`. The ensembles' names, inputs and
outputs are the same in all; fused_heads costs the least CPU per image and split the most (docs/triton.md,
"Decode and backbone in one stub")."""
LAYOUT_ENV = "PIAA_CPU_LAYOUT"


def cpu_layout(layout: str | None = None) -> str:
    """The cpu profile's layout: `layout` if given, else $PIAA_CPU_LAYOUT, else DEFAULT_CPU_LAYOUT.

    Raises RepositoryError for a value not in CPU_LAYOUTS.
    """
    return _chosen("layout", layout, LAYOUT_ENV, DEFAULT_CPU_LAYOUT, CPU_LAYOUTS)


def _chosen(what: str, given: str | None, env: str, default: str, allowed: tuple[str, ...]) -> str:
    chosen = given or os.environ.get(env) or default
    if chosen not in allowed:
        raise RepositoryError(f"unknown cpu {what} {chosen!r}: choose one of {', '.join(allowed)}")
    return chosen


# --- the CPU plan: who gets which cores --------------------------------------------------------------
@dataclass(frozen=True)
class CpuPlan:
    """Instance counts and thread counts for a machine with `cores` cores."""

    cores: int
    preprocess_instances: int
    decode_threads: int
    backbone_instances: int
    backbone_intra_op_threads: int
    heads_intra_op_threads: int
    fused_instances: int
    """Instances of the fused layout's backbone (decode + ONNX Runtime)."""
    fused_intra_op_threads: int
    fused_decode_threads: int


def cpu_plan(cores: int) -> CpuPlan:
    """Splits the cores so that the stubs do not fight over them.

    Split layout: the backbone is ~90% of the work: one instance with all cores as ORT intra-op threads (ORT
    parallelizes a batch better than two sessions time-share the cores). Decoding runs in parallel with it;
    it gets a thread per two cores. The heads are a few matrix products: one thread. Above 8 cores a second
    backbone instance overlaps one batch's tail with the next batch's start.
    Fused layout: two instances with half the cores each, so that one decodes while the other runs ONNX
    Runtime (measured on 2 cores only: docs/triton.md); each decodes with a thread per two of its cores.
    """
    cores = max(1, cores)
    backbone_instances = 2 if cores > 8 else 1
    fused_instances = 2 if cores > 1 else 1
    fused_threads = max(1, cores // fused_instances)
    return CpuPlan(
        cores=cores,
        preprocess_instances=1,
        decode_threads=max(1, cores // 2),
        backbone_instances=backbone_instances,
        backbone_intra_op_threads=max(1, cores // backbone_instances),
        heads_intra_op_threads=1,
        fused_instances=fused_instances,
        fused_intra_op_threads=fused_threads,
        fused_decode_threads=max(1, fused_threads // 2),
    )
