"""The `piaa` ensemble in the real tritonserver against in-process ONNX Runtime on the same preprocessing."""

from __future__ import annotations

import io
import queue
import urllib.request
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from piaa_client import features as fs
from piaa_triton.imaging import preprocess
from piaa_triton.paths import repository_dir
from piaa_triton.server import TritonServer
from tests.fixtures.photos import Photo

TOLERANCE = 1e-4
OUTPUTS = [o.name for o in fs.HEAD_OUTPUTS]


class Reference:
    """The served ONNX files run in this process: preprocess → backbone → heads."""

    def __init__(self) -> None:
        root = repository_dir("cpu")
        self.backbone = ort.InferenceSession(
            str(root / "backbone/1/model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.heads = ort.InferenceSession(
            str(root / "heads/1/model.onnx"), providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        batch = np.stack([preprocess(data) for data in images])
        (feature,) = self.backbone.run(["feature"], {"image": batch})
        return dict(zip(OUTPUTS, self.heads.run(OUTPUTS, {"feature": feature}), strict=True))


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def client(triton_server: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton_server.grpc_url)


def request(images: Sequence[bytes]) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput(fs.ENSEMBLE_INPUT.name, [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data] for data in images], dtype=object))
    return [tensor]


def infer(client: grpcclient.InferenceServerClient, images: Sequence[bytes]) -> dict[str, np.ndarray]:
    result = client.infer("piaa", request(images))
    return {name: result.as_numpy(name) for name in OUTPUTS}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        assert got[name].shape == want[name].shape, name
        diff = float(np.max(np.abs(got[name] - want[name])))
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.2e} > {TOLERANCE}"


def reencode(data: bytes, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_ensemble_matches_onnx_runtime_on_shared_photos(
    client: grpcclient.InferenceServerClient, reference: Reference, photos: list[Photo]
) -> None:
    sample = [p.path.read_bytes() for p in photos[::50]]  # 16 photos across the classes
    for chunk in (sample[:1], sample[1:8], sample[8:]):  # single and multi-image requests
        assert_close(infer(client, chunk), reference(chunk))


def test_grayscale_and_cmyk_photos_work(
    client: grpcclient.InferenceServerClient, reference: Reference, photos: list[Photo]
) -> None:
    original = photos[7].path.read_bytes()
    for mode in ("L", "CMYK"):
        data = reencode(original, mode)
        assert Image.open(io.BytesIO(data)).mode == mode
        assert_close(infer(client, [data]), reference([data]))


def test_one_corrupt_image_fails_only_its_request(
    client: grpcclient.InferenceServerClient, reference: Reference, photos: list[Photo]
) -> None:
    images = [p.path.read_bytes() for p in photos[3:200:25]]  # 8 photos
    corrupt_at = 3
    images[corrupt_at] = images[corrupt_at][: len(images[corrupt_at]) // 3]  # truncated JPEG
    decoder = client.get_model_config("piaa").config.ensemble_scheduling.step[0].model_name  # either layout
    before = client.get_inference_statistics(decoder, as_json=True)["model_stats"][0]
    done: queue.Queue[tuple[int, object, object]] = queue.Queue()
    for i, data in enumerate(images):  # all in flight at once, so the batcher groups them
        client.async_infer("piaa", request([data]), lambda result, error, i=i: done.put((i, result, error)))
    results = dict((i, (r, e)) for i, r, e in (done.get(timeout=60) for _ in images))
    after = client.get_inference_statistics(decoder, as_json=True)["model_stats"][0]
    for i, data in enumerate(images):
        result, error = results[i]
        if i == corrupt_at:
            assert isinstance(error, InferenceServerException)
            assert error.status() == "StatusCode.INVALID_ARGUMENT"
            assert "cannot decode JPEG image" in error.message()
            continue
        assert error is None, f"request {i} failed: {error}"
        assert isinstance(result, grpcclient.InferResult)
        assert_close({name: result.as_numpy(name) for name in OUTPUTS}, reference([data]))
    # Triton's JSON leaves out counts that are still zero (a model that has run nothing yet).
    requests = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    batches = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    assert requests == len(images) and batches < requests, "the requests were never batched together"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: b"GIF89a" + b"\x00" * 100, r"unsupported image format \(GIF\): send JPEG, PNG or WebP"),
        (lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>", r"unsupported image format \(SVG\)"),
        (
            lambda: b"\xff\xd8\xff\xe0" + b"\x00" * (22 * 1024 * 1024),
            r"image is 23\.1 MB, over the 21\.0 MB limit",
        ),
    ],
    ids=["gif", "svg", "oversized-bytes"],
)
def test_unsupported_and_oversized_images_are_refused(
    client: grpcclient.InferenceServerClient, make: object, message: str
) -> None:
    assert callable(make)
    with pytest.raises(InferenceServerException, match=message) as caught:
        client.infer("piaa", request([make()]))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_too_many_pixels_are_refused(client: grpcclient.InferenceServerClient) -> None:
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # 64 MP in a few kB
    with pytest.raises(InferenceServerException, match=r"8000×8000 = 64 MP, over the 50 MP limit"):
        client.infer("piaa", request([buffer.getvalue()]))


def test_metrics_endpoint_serves_prometheus_text(triton_server: TritonServer) -> None:
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert 'nv_inference_request_success{model="piaa"' in text
