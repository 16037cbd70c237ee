"""Triton Python model `heads` (cpu profile): ONNX Runtime over the dynamic batcher's requests."""

import triton_python_backend_utils as pb_utils

from piaa_triton.python_models import OnnxModel


class TritonPythonModel(OnnxModel):
    """The logic lives in piaa_triton.python_models (importable and tested without the stub)."""

    def __init__(self) -> None:
        super().__init__(pb_utils)
