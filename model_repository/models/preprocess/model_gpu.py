"""Triton Python model `preprocess` (gpu profile): JPEGs decoded by nvJPEG through DALI, on the GPU."""

import triton_python_backend_utils as pb_utils

from piaa_triton.gpu_preprocess import GpuPreprocessModel


class TritonPythonModel(GpuPreprocessModel):
    """The logic lives in piaa_triton.gpu_preprocess (importable and tested without the stub)."""

    def __init__(self) -> None:
        super().__init__(pb_utils)
