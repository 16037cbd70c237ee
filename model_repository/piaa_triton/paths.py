"""Where the Triton side reads and writes, resolved in one place (environment overrides the defaults)."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout (piaa_triton is installed editable from model_repository/piaa_triton)."""

MODEL_SOURCES = REPO_ROOT / "model_repository" / "models"
"""The committed Python-backend sources, one folder per model."""


def build_dir() -> Path:
    """The build folder: $PIAA_BUILD_DIR if set, else <repo>/build."""
    return Path(os.environ.get("PIAA_BUILD_DIR", REPO_ROOT / "build"))


def onnx_dir() -> Path:
    """Where the exporter writes backbone.onnx and heads.onnx."""
    return build_dir() / "onnx"


BACKBONE_INT8_ONNX = "backbone.int8.onnx"
"""The backbone quantized with Q/DQ nodes (symmetric signed INT8), next to backbone.onnx in onnx_dir():
calibrated once on real photos, served by the INT8 CPU profile and parsed by TensorRT for INT8 engines."""


def backend_dir() -> Path:
    """The --backend-directory handed to tritonserver (holds python/)."""
    return build_dir() / "triton" / "backends"


def repository_dir(profile: str) -> Path:
    """The generated model repository of a profile."""
    return build_dir() / "model_repository" / profile


def plan_filename(cc: str) -> str:
    """A TensorRT engine's file name for a GPU compute capability: "8.6" → "model_sm86.plan".

    Engines are tied to the GPU kind, so one model folder carries one plan per compute capability and
    the config's cc_model_filenames picks the one for the GPU it runs on.
    """
    if not re.fullmatch(r"\d+\.\d+", cc):
        raise ValueError(f"compute capability must look like '8.6', got {cc!r}")
    return f"model_sm{cc.replace('.', '')}.plan"


BACKBONE_INT8_CPU_ONNX = "backbone.int8.cpu.onnx"
"""The same calibration encoded for ONNX Runtime on x86 (unsigned activations with zero points, signed
per-channel weights): what the cpu profile serves at precision int8. ONNX Runtime leaves the symmetric
file's clips and depthwise convolutions in float, so that one runs no faster than FP32 on a CPU."""
