"""Triton Python model `preprocess`: encoded JPEG/PNG/WebP bytes → the normalized 224×224 tensor."""

import triton_python_backend_utils as pb_utils

from piaa_triton.python_models import PreprocessModel


class TritonPythonModel(PreprocessModel):
    """The logic lives in piaa_triton.python_models (importable and tested without the stub)."""

    def __init__(self) -> None:
        super().__init__(pb_utils)
