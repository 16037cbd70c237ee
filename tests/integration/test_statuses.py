"""Statuses that tell the caller's fault from ours, on the real stack: a Triton model that fails to run
is UNAVAILABLE (retryable, counted as ours), never INVALID_ARGUMENT for the image; an image the decoder
refuses is still INVALID_ARGUMENT for that request alone; the profile store's failures reach callers as
a generic message, their Redis text only the gateway's log."""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import redis
from PIL import Image

from piaa_client import features as fs
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_common.process import free_port
from piaa_personalization.store.format import Keys
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.repository import write_repository
from piaa_triton.server import ServerOptions, TritonServer
from tests.fixtures.gateway import GatewayProcess, start_gateway
from tests.fixtures.photos import Photo

STORE_DOWN = "the profile store is unavailable: retry later"
"""What a caller reads when the store cannot be reached (errors.StoreDown.public_message)."""
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def failing_heads(path: Path) -> None:
    """A heads file with the heads' input and output names whose every run fails in ONNX Runtime (a
    reshape that 1280 values cannot fill): Triton answers every request that reaches it INTERNAL."""
    feature = onnx.helper.make_tensor_value_info(fs.BACKBONE_FEATURE.name, onnx.TensorProto.FLOAT, ["n", "d"])
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [3], [-1, 7, 3])
    nodes = [onnx.helper.make_node("Reshape", [fs.BACKBONE_FEATURE.name, "shape"], ["bad"])]
    nodes += [onnx.helper.make_node("Identity", ["bad"], [o.name]) for o in fs.HEAD_OUTPUTS]
    outputs = [
        onnx.helper.make_tensor_value_info(o.name, onnx.TensorProto.FLOAT, None) for o in fs.HEAD_OUTPUTS
    ]
    graph = onnx.helper.make_graph(nodes, "failing_heads", [feature], outputs, [shape])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def failing_model(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[GatewayProcess]:
    """A gateway on a Triton whose piaa ensemble loads and reports ready but fails every image it decodes
    (the fused_heads backbone's heads replaced by failing_heads): a server-side failure of every call."""
    repository = tmp_path_factory.mktemp("failing") / "cpu"
    write_repository("cpu", repository, cores=2, layout="fused_heads")
    failing_heads(repository / "backbone" / "1" / "heads.onnx")
    with TritonServer(ServerOptions(repository=repository)) as triton:
        gateway = start_gateway(redis_server.url, triton.grpc_url)
        try:
            yield gateway
        finally:
            assert gateway.stop() == 0, gateway.output_tail()
            gateway.close()


def noise_jpeg() -> bytes:
    """A JPEG never seen before: no feature cache or memory has it, so Triton must run."""
    pixels = np.random.default_rng().integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _count(metrics: str, method: str, code: str) -> float:
    found = re.search(rf'piaa_requests_total{{code="{code}",method="{method}"}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def test_a_failing_model_is_unavailable_not_the_images_fault(
    failing_model: GatewayProcess, photos: list[Photo]
) -> None:
    good = [pb.Image(id=f"noise-{i}.jpg", data=noise_jpeg()) for i in range(3)]
    data = photos[700].path.read_bytes()
    truncated = pb.Image(id="broken.jpg", data=data[: len(data) // 3])
    with grpc.insecure_channel(failing_model.address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        for images in (good[:1], good):  # one image, and a batch that the gateway may split
            with pytest.raises(grpc.RpcError) as failed:
                stub.Score(pb.ScoreRequest(user_id="u", images=images), timeout=60)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            assert "onnxruntime" not in (failed.value.details() or ""), "Triton's text reached the caller"
        # In a stream, the request is answered UNAVAILABLE in place.
        (answer,) = stub.ScoreStream(iter([pb.ScoreRequest(user_id="u", images=good[1:2])]), timeout=60)
        assert answer.error.code == UNAVAILABLE, answer
        # An image the decoder refuses never reaches the failing heads: still the caller's fault, alone.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(pb.ScoreRequest(user_id="u", images=[truncated]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot decode JPEG image" in (refused.value.details() or "")

    # A unary call is counted after its status went out: wait for the counts, then check them exactly.
    def counts() -> tuple[float, float]:
        metrics = failing_model.metrics()
        return _count(metrics, "Score", "UNAVAILABLE"), _count(metrics, "Score", "INVALID_ARGUMENT")

    until = time.monotonic() + 30
    while counts() < (2, 1) and time.monotonic() < until:
        time.sleep(0.05)
    assert counts() == (2, 1)
    assert "onnxruntime failed on a batch" in failing_model.output(), "the detail belongs in the log"


def test_an_unreachable_store_is_reported_without_its_redis_text(
    triton_server: TritonServer, photos: list[Photo]
) -> None:
    port = free_port()  # nothing listens there
    gateway = start_gateway(f"redis://127.0.0.1:{port}/0", triton_server.grpc_url)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.PersonalizationStub(channel)
            image = pb.Image(data=photos[705].path.read_bytes())
            rating = pb.Rating(image=image, value=4, scale=pb.RATING_SCALE_STARS_1_5)
            calls = [
                lambda: stub.AddRatings(pb.AddRatingsRequest(user_id="u", ratings=[rating]), timeout=60),
                lambda: stub.GetProfile(pb.GetProfileRequest(user_id="u"), timeout=60),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as failed:
                    call()
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert failed.value.details() == STORE_DOWN
        assert f"127.0.0.1:{port}" in gateway.output(), "the store's own error belongs in the log"
    finally:
        assert gateway.stop() == 0
        gateway.close()


def test_a_store_error_of_ours_is_internal_without_its_redis_text(
    gateway: GatewayProcess, redis_server: RedisServer
) -> None:
    """A profile key of the wrong type (what a bug or an operator's hand could leave): Redis answers
    WRONGTYPE, the caller reads INTERNAL "internal error", the log has Redis's reply."""
    user = f"wrongtype-{uuid.uuid4().hex[:8]}"
    key = Keys("piaa").profile("default", user)
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(key, b"not a hash")
        try:
            with (
                grpc.insecure_channel(gateway.address) as channel,
                pytest.raises(grpc.RpcError) as failed,
            ):
                pb_grpc.PersonalizationStub(channel).GetProfile(
                    pb.GetProfileRequest(user_id=user), timeout=60
                )
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert failed.value.details() == "internal error"
            assert "WRONGTYPE" in gateway.output()
        finally:
            client.delete(key)
