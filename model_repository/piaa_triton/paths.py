"""Where the Triton side reads and writes, resolved in one place (environment overrides the defaults)."""

from __future__ import annotations

import os
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


def backend_dir() -> Path:
    """The --backend-directory handed to tritonserver (holds python/)."""
    return build_dir() / "triton" / "backends"


def repository_dir(profile: str) -> Path:
    """The generated model repository of a profile."""
    return build_dir() / "model_repository" / profile
