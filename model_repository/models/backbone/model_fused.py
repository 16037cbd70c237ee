"""Triton Python model `backbone` (cpu profile, fused layout): image bytes → decode → ONNX Runtime."""

import triton_python_backend_utils as pb_utils

from piaa_triton.python_models import DecodeBackboneModel


class TritonPythonModel(DecodeBackboneModel):
    """The logic lives in piaa_triton.python_models (importable and tested without the stub)."""

    def __init__(self) -> None:
        super().__init__(pb_utils)
