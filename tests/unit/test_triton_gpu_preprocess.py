"""piaa_triton.gpu_preprocess: the gpu profile's preprocess with its real DALI pipeline, run on the CPU.

DALI 2.4 runs CPU-only pipelines with device_id=None, so everything but nvJPEG itself runs here: feeding
one request per run, batches of several requests, a corrupt JPEG mid-stream (the pipeline is rebuilt and
only that request fails), the same refusals as the CPU path, and outputs within a stated tolerance of the
CPU preprocess on real photos. The pb_utils stand-in is the one of test_triton_python_models.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from piaa_triton.gpu_preprocess import GpuPreprocessModel, takes_gpu_path
from piaa_triton.imaging import ImageError, preprocess, read_header
from piaa_triton.python_models import preprocess_request
from piaa_triton.repository import gpu_models
from tests.fixtures.photos import Photo
from tests.unit.test_triton_python_models import Request, StubUtils

MEAN_ABS_TOLERANCE = 0.64
"""Mean |DALI - CPU| over all pixels of the photos, in grey levels (both give uint8 RGB 0..255)."""
IMAGE_MEAN_ABS_TOLERANCE = 3.84
"""The same per photo, for the worst photo (≈ 4 grey levels: Pillow's draft decoding of large JPEGs)."""
PIXEL_TOLERANCE = 51
"""Largest |DALI - CPU| of one pixel after a rebuilt pipeline (both decoders, one photo)."""


def model_args(max_batch_size: int = 8, params: dict[str, str] | None = None) -> dict[str, str]:
    (preprocess_config,) = [m for m in gpu_models() if m.name == "preprocess"]
    parameters = dict(preprocess_config.parameters) | (params or {})
    config = {
        "max_batch_size": max_batch_size,
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }
    return {"model_config": json.dumps(config), "model_instance_kind": "CPU", "model_instance_device_id": "0"}


@pytest.fixture
def model() -> GpuPreprocessModel:
    instance = GpuPreprocessModel(StubUtils())
    instance.initialize(model_args(params={"decode_threads": "1"}))
    return instance


def request(*blobs: bytes) -> Request:
    return Request({"image_bytes": np.array([[b] for b in blobs], dtype=object)})


def outcome(response: Any) -> np.ndarray | str:
    if response.error is not None:
        return response.error.message
    (tensor,) = response.output_tensors
    return tensor.array


def jpeg(size: tuple[int, int], mode: str = "RGB", exif_orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    image = Image.new(mode, size, 128 if mode in ("L", "CMYK") else (200, 100, 50))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_the_pipeline_is_built_for_feed_per_request(model: GpuPreprocessModel) -> None:
    assert model.dali is not None
    pipe = model.dali.pipe
    assert pipe.prefetch_queue_depth == 1
    assert (pipe.exec_pipelined, pipe.exec_async) == (False, False)
    assert pipe.max_batch_size == 8


def test_batches_of_requests_match_the_cpu_preprocess(model: GpuPreprocessModel, photos: list[Photo]) -> None:
    candidates = [p.path.read_bytes() for p in photos[:120]]
    blobs = [b for b in candidates if takes_gpu_path(read_header(b)[0])][:96]
    assert len(blobs) == 96, "most shared photos are upright RGB JPEGs: the GPU path's case"
    sizes = [8, 1, 5, 8, 3, 8, 2, 7, 8, 6, 8, 4, 8, 8, 6, 6]  # several requests per execute, uneven
    requests, start = [], 0
    for n in sizes:
        requests.append(request(*blobs[start : start + n]))
        start += n
    got = [outcome(r) for r in model.execute(requests[:8])] + [
        outcome(r) for r in model.execute(requests[8:])
    ]
    assert all(isinstance(g, np.ndarray) and g.dtype == np.uint8 for g in got), got
    assert [len(g) for g in got] == sizes  # each request answered with its own images
    dali = np.concatenate(got).astype(np.int16)  # signed: uint8 differences would wrap around
    cpu = np.stack([preprocess(b) for b in blobs[: len(dali)]]).astype(np.int16)
    per_image = np.abs(dali - cpu).reshape(len(dali), -1).mean(axis=1)
    assert per_image.mean() < MEAN_ABS_TOLERANCE, per_image.mean()
    assert per_image.max() < IMAGE_MEAN_ABS_TOLERANCE, per_image.max()
    assert model.fallbacks == 0 and model.dali is not None and model.dali.builds == 1


def test_a_corrupt_jpeg_fails_only_its_request_and_the_pipeline_lives_on(
    model: GpuPreprocessModel, photos: list[Photo]
) -> None:
    good = [p.path.read_bytes() for p in photos[:4]]
    truncated = good[0][: len(good[0]) // 3]  # a valid header: it reaches DALI, which refuses it
    responses = model.execute([request(good[1], good[2]), request(good[3], truncated), request(good[0])])
    first, bad, last = (outcome(r) for r in responses)
    assert isinstance(first, np.ndarray) and isinstance(last, np.ndarray)
    assert isinstance(bad, str) and bad.startswith("image 1: cannot decode JPEG image")
    assert responses[1].error.code == StubUtils.TritonError.INVALID_ARG
    assert model.dali is not None and model.dali.builds == 2 and model.fallbacks == 1  # rebuilt once
    again = outcome(model.execute([request(*good)])[0])  # the rebuilt pipeline serves the next request
    assert isinstance(again, np.ndarray) and model.fallbacks == 1
    np.testing.assert_allclose(
        again[0].astype(np.int16), preprocess(good[0]).astype(np.int16), atol=PIXEL_TOLERANCE
    )


def refusals() -> dict[str, bytes]:
    png = io.BytesIO()
    Image.new("RGB", (40000, 1)).save(png, format="PNG")
    return {
        "empty": b"",
        "gif": b"GIF89a" + b"\0" * 32,
        "not an image": b"\xff\xd8\xff" + b"\0" * 64,
        "65500x13 JPEG (aspect ratio)": jpeg((65500, 13)),
        "40000x1 PNG (aspect ratio)": png.getvalue(),
        "over the configured pixel limit": jpeg((3000, 2000)),
    }


@pytest.mark.parametrize("case", list(refusals()))
def test_refusals_are_the_cpu_paths_word_for_word(case: str) -> None:
    params = {"max_image_pixels": "5000000", "decode_threads": "1"}
    model = GpuPreprocessModel(StubUtils())
    model.initialize(model_args(params=params))
    blob = refusals()[case]
    items = np.array([[jpeg((300, 300))], [blob]], dtype=object)
    with pytest.raises(ImageError) as cpu:
        preprocess_request(items, model.limits)
    (response,) = model.execute([Request({"image_bytes": items})])
    assert outcome(response) == str(cpu.value)
    assert response.error.code == StubUtils.TritonError.INVALID_ARG
    assert model.dali is not None and model.dali.builds == 1  # refused from the header: DALI never saw it


@pytest.mark.parametrize(
    ("name", "blob"),
    [
        ("grayscale", jpeg((300, 260), "L")),
        ("CMYK", jpeg((300, 260), "CMYK")),
        ("EXIF-rotated", jpeg((300, 260), exif_orientation=6)),
    ],
)
def test_jpegs_dali_would_treat_differently_take_the_cpu_path(
    model: GpuPreprocessModel, name: str, blob: bytes
) -> None:
    assert not takes_gpu_path(read_header(blob)[0]), name
    got = outcome(model.execute([request(blob)])[0])
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got[0], preprocess(blob))


def test_the_thin_model_file_is_the_tested_class() -> None:
    source = (
        Path(__file__).resolve().parents[2] / "model_repository" / "models" / "preprocess" / "model_gpu.py"
    )
    text = source.read_text()
    assert "class TritonPythonModel(GpuPreprocessModel)" in text and "nvidia.dali" not in text
