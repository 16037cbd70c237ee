"""The exporter's errors: one small tree, so the CLI can print a clear message and exit non-zero."""

from __future__ import annotations


class ExportError(Exception):
    """Base of every error raised by piaa_export."""


class WeightsError(ExportError):
    """Weights are missing, do not load strictly, or were built for another feature space."""


class ParityError(ExportError):
    """A converted model disagrees with its source beyond the tolerance written in the code."""


class DatasetError(ExportError):
    """A photo folder or a dataset (AADB, FLICKR-AES) is missing or malformed."""


class TensorRTUnavailableError(ExportError):
    """TensorRT or a CUDA GPU is not available on this machine, so engines cannot be built here."""
