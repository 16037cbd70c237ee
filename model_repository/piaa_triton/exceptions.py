"""Errors of the Triton side, one tree: callers catch TritonSetupError or its kinds."""

from __future__ import annotations


class TritonSetupError(RuntimeError):
    """Base of every error raised while preparing or running tritonserver."""


class BackendNotFoundError(TritonSetupError):
    """The nvidia-pytriton wheel, its tritonserver or its Python backend stub is missing."""


class RepositoryError(TritonSetupError):
    """The model repository cannot be generated (missing ONNX inputs, bad description)."""


class ServerStartError(TritonSetupError):
    """tritonserver exited or did not become ready in time; the message carries the log's tail."""
