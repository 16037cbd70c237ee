"""piaa_triton.python_models: batching across requests and per-request errors, outside the stub.

triton_python_backend_utils exists only inside the Python backend stub, so these tests hand the models a
small stand-in with the same surface; tests/integration/test_triton_ensemble.py runs them in the real stub.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from piaa_triton.imaging import ImageError, preprocess
from piaa_triton.python_models import (
    DecodeBackboneModel,
    OnnxModel,
    PreprocessModel,
    concat,
    preprocess_request,
    split,
)


@dataclass
class Tensor:
    name: str
    array: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.array


@dataclass
class Request:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] = ()

    def requested_output_names(self) -> list[str]:
        return list(self.outputs)


class TritonError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


@dataclass
class InferenceResponse:
    output_tensors: list[Tensor] = field(default_factory=list)
    error: TritonError | None = None


class StubUtils:
    """The part of triton_python_backend_utils the models use."""

    Tensor = Tensor
    TritonError = TritonError
    InferenceResponse = InferenceResponse

    @staticmethod
    def get_input_tensor_by_name(request: Request, name: str) -> Tensor:
        return Tensor(name, request.inputs[name])


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (300, 260)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def model_args(config: dict[str, Any], folder: Path | None = None) -> dict[str, str]:
    return {"model_config": json.dumps(config), "model_repository": str(folder or "."), "model_version": "1"}


def test_concat_and_split_are_inverse() -> None:
    parts = [np.full((n, 2), n, dtype=np.float32) for n in (1, 3, 2)]
    batch, counts = concat(parts)
    assert batch.shape == (6, 2) and counts == [1, 3, 2]
    for got, want in zip(split(batch, counts), parts, strict=True):
        np.testing.assert_array_equal(got, want)


def test_preprocess_request_names_the_failing_item() -> None:
    items = np.array([[jpeg((1, 2, 3))], [b"GIF89a..."]], dtype=object)
    with pytest.raises(ImageError, match=r"image 1: unsupported image format \(GIF\)"):
        preprocess_request(items, PreprocessModel(StubUtils).limits)


def test_preprocess_model_fails_only_the_bad_request() -> None:
    model = PreprocessModel(StubUtils)
    model.initialize(model_args({"parameters": {"decode_threads": {"string_value": "2"}}}))
    good = [jpeg((200, 10, 10)), jpeg((10, 200, 10), (640, 480))]
    requests = [
        Request({"image_bytes": np.array([[good[0]]], dtype=object)}),
        Request({"image_bytes": np.array([[b"\xff\xd8\xff\xe0broken"]], dtype=object)}),
        Request({"image_bytes": np.array([[good[1]], [good[0]]], dtype=object)}),
    ]
    responses = model.execute(requests)
    model.finalize()
    assert len(responses) == 3
    assert responses[1].error is not None and responses[1].error.code == TritonError.INVALID_ARG
    assert "cannot decode JPEG" in responses[1].error.message
    np.testing.assert_array_equal(responses[0].output_tensors[0].array, preprocess(good[0])[None])
    assert responses[0].output_tensors[0].name == "image"
    both = responses[2].output_tensors[0].array
    assert both.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(both[0], preprocess(good[1]))


def test_preprocess_model_reads_its_limits() -> None:
    model = PreprocessModel(StubUtils)
    model.initialize(model_args({"parameters": {"max_image_bytes": {"string_value": "1000"}}}))
    (response,) = model.execute([Request({"image_bytes": np.array([[jpeg((0, 0, 0))]], dtype=object)})])
    assert response.error is not None and "MB limit" in response.error.message


def tiny_onnx(folder: Path) -> None:
    """y = 2x + 1 and z = sum(x): two outputs over a dynamic batch, like the heads."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 1])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "one"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["z"], keepdims=1),
    ]
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y, z], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "1" / "model.onnx"))


def test_onnx_model_batches_requests_and_splits_outputs(tmp_path: Path) -> None:
    tiny_onnx(tmp_path)
    config = {
        "input": [{"name": "x"}],
        "output": [{"name": "y"}, {"name": "z"}],
        "parameters": {
            "onnx_file": {"string_value": "model.onnx"},
            "intra_op_threads": {"string_value": "1"},
        },
    }
    model = OnnxModel(StubUtils)
    model.initialize(model_args(config, tmp_path))
    inputs = [np.arange(3 * n, dtype=np.float32).reshape(n, 3) for n in (2, 1, 3)]
    responses = model.execute([Request({"x": x}) for x in inputs])
    assert len(responses) == 3
    for response, x in zip(responses, inputs, strict=True):
        y, z = response.output_tensors
        assert (y.name, z.name) == ("y", "z")
        np.testing.assert_allclose(y.array, 2 * x + 1)
        np.testing.assert_allclose(z.array, x.sum(axis=1, keepdims=True))


def test_onnx_model_reports_a_failed_run_on_every_request(tmp_path: Path) -> None:
    tiny_onnx(tmp_path)
    config = {"input": [{"name": "x"}], "output": [{"name": "y"}, {"name": "z"}]}
    model = OnnxModel(StubUtils)
    model.initialize(model_args(config, tmp_path))
    wrong = np.zeros((1, 5), dtype=np.float32)  # 5 columns where the graph wants 3
    responses = model.execute([Request({"x": wrong}), Request({"x": wrong})])
    assert all(r.error is not None and "onnxruntime failed" in r.error.message for r in responses)


def test_onnx_model_returns_only_the_requested_outputs(tmp_path: Path) -> None:
    tiny_onnx(tmp_path)
    config = {"input": [{"name": "x"}], "output": [{"name": "y"}, {"name": "z"}]}
    model = OnnxModel(StubUtils)
    model.initialize(model_args(config, tmp_path))
    x = np.ones((2, 3), dtype=np.float32)
    only_z, everything = model.execute([Request({"x": x}, ("z",)), Request({"x": x})])
    assert [t.name for t in only_z.output_tensors] == ["z"]
    assert [t.name for t in everything.output_tensors] == ["y", "z"]


def tiny_backbone(folder: Path) -> None:
    """uint8 image [n, 3, 224, 224] → feature = the channel means, logits = the channel maxima."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 3, 224, 224])
    feature = helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["n", 3])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["feature"], axes=[2, 3], keepdims=0),
        helper.make_node("ReduceMax", ["pixels"], ["logits"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny_backbone", [image], [feature, logits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (folder / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "1" / "model.onnx"))


class CountingSession:
    """An ONNX Runtime session that records the batch size of every run."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def decode_backbone(folder: Path, **params: str) -> tuple[DecodeBackboneModel, CountingSession]:
    tiny_backbone(folder)
    config = {
        "input": [{"name": "image_bytes"}],
        "output": [{"name": "feature"}, {"name": "logits"}],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }
    model = DecodeBackboneModel(StubUtils)
    model.initialize(model_args(config, folder))
    model.session = CountingSession(model.session)
    return model, model.session


def image_request(*images: bytes, outputs: tuple[str, ...] = ()) -> Request:
    return Request({"image_bytes": np.array([[d] for d in images], dtype=object)}, outputs)


def channel_means(data: bytes) -> np.ndarray:
    return preprocess(data).astype(np.float32).mean(axis=(1, 2))


def test_decode_backbone_runs_all_requests_as_one_batch(tmp_path: Path) -> None:
    model, session = decode_backbone(tmp_path, decode_threads="2")
    good = [jpeg((200, 10, 10)), jpeg((10, 200, 10), (640, 480)), jpeg((10, 10, 200), (260, 400))]
    requests = [image_request(good[0]), image_request(good[1], good[2]), image_request(good[2])]
    responses = model.execute(requests)
    model.finalize()
    assert session.batches == [4]
    for response, images in zip(responses, ([good[0]], good[1:], [good[2]]), strict=True):
        assert response.error is None
        feature, logits = response.output_tensors
        assert (feature.name, logits.name) == ("feature", "logits")
        np.testing.assert_allclose(feature.array, [channel_means(d) for d in images], rtol=1e-5)
        assert logits.array.shape == (len(images), 3)


def test_decode_backbone_fails_only_the_request_with_a_bad_image(tmp_path: Path) -> None:
    model, session = decode_backbone(tmp_path)
    good = [jpeg((200, 10, 10)), jpeg((10, 200, 10))]
    broken = good[1][: len(good[1]) // 3]  # a truncated JPEG
    responses = model.execute(
        [image_request(good[0]), image_request(good[1], broken), image_request(good[1], good[0])]
    )
    assert session.batches == [3], "the refused request's images never reach ONNX Runtime"
    refused = responses[1].error
    assert refused is not None and refused.code == TritonError.INVALID_ARG
    # The preprocess model's message for the same request, word for word.
    with pytest.raises(ImageError) as caught:
        preprocess_request(image_request(good[1], broken).inputs["image_bytes"], model.limits)
    assert refused.message == str(caught.value) and refused.message.startswith("image 1: ")
    np.testing.assert_allclose(responses[0].output_tensors[0].array, [channel_means(good[0])], rtol=1e-5)
    np.testing.assert_allclose(
        responses[2].output_tensors[0].array, [channel_means(d) for d in (good[1], good[0])], rtol=1e-5
    )


def test_decode_backbone_runs_nothing_when_every_request_is_refused(tmp_path: Path) -> None:
    model, session = decode_backbone(tmp_path, max_image_bytes="1000")
    responses = model.execute([image_request(jpeg((0, 0, 0))), image_request(b"GIF89a...")])
    assert session.batches == []
    assert "MB limit" in responses[0].error.message
    assert "unsupported image format (GIF)" in responses[1].error.message


def test_decode_backbone_returns_only_the_requested_outputs(tmp_path: Path) -> None:
    model, _ = decode_backbone(tmp_path)
    data = jpeg((90, 90, 90))
    only_feature, everything = model.execute([image_request(data, outputs=("feature",)), image_request(data)])
    assert [t.name for t in only_feature.output_tensors] == ["feature"]
    assert [t.name for t in everything.output_tensors] == ["feature", "logits"]


def tiny_heads(path: Path) -> None:
    """feature [n, 3] → score = the feature's sum, twice = 2 × the feature: two outputs, like the heads."""
    feature = helper.make_tensor_value_info("feature", TensorProto.FLOAT, ["n", 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 1])
    twice = helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("ReduceSum", ["feature", "axes"], ["score"], keepdims=1),
        helper.make_node("Mul", ["feature", "two"], ["twice"]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
    ]
    graph = helper.make_graph(nodes, "tiny_heads", [feature], [score, twice], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def decode_backbone_with_heads(folder: Path) -> tuple[DecodeBackboneModel, CountingSession, CountingSession]:
    tiny_backbone(folder)
    tiny_heads(folder / "1" / "heads.onnx")
    params = {"heads_onnx_file": "heads.onnx", "heads_intra_op_threads": "1"}
    config = {
        "input": [{"name": "image_bytes"}],
        "output": [{"name": n} for n in ("feature", "logits", "score", "twice")],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }
    model = DecodeBackboneModel(StubUtils)
    model.initialize(model_args(config, folder))
    model.session, model.heads = CountingSession(model.session), CountingSession(model.heads)
    return model, model.session, model.heads


def test_decode_backbone_runs_the_heads_on_the_batchs_features_only_when_asked(tmp_path: Path) -> None:
    model, backbone, heads = decode_backbone_with_heads(tmp_path)
    red, green, blue = jpeg((200, 10, 10)), jpeg((10, 200, 10), (640, 480)), jpeg((10, 10, 200))
    only_feature = model.execute([image_request(red, outputs=("feature",))])
    assert (backbone.batches, heads.batches) == ([1], []), "a request for the feature alone runs no heads"
    assert [t.name for t in only_feature[0].output_tensors] == ["feature"]
    scored = model.execute(
        [
            image_request(red, outputs=("score", "twice")),
            image_request(green, blue, outputs=("feature", "score")),
        ]
    )
    assert (backbone.batches, heads.batches) == ([1, 3], [3]), "one heads run over the whole batch"
    assert [t.name for t in scored[0].output_tensors] == ["score", "twice"]
    assert [t.name for t in scored[1].output_tensors] == ["feature", "score"]
    means = np.array([channel_means(d) for d in (red, green, blue)])
    np.testing.assert_allclose(
        scored[0].output_tensors[0].array, means[:1].sum(axis=1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_allclose(scored[0].output_tensors[1].array, 2 * means[:1], rtol=1e-5)
    np.testing.assert_allclose(scored[1].output_tensors[0].array, means[1:], rtol=1e-5)
    # The heads' outputs are the heads session's on the backbone's feature, bit for bit.
    feature = scored[1].output_tensors[0].array
    (want,) = model.heads.session.run(["score"], {"feature": feature})
    np.testing.assert_array_equal(scored[1].output_tensors[1].array, want)
    everything = model.execute([image_request(red)])
    assert [t.name for t in everything[0].output_tensors] == ["feature", "logits", "score", "twice"]


def test_decode_backbone_reports_a_failed_heads_run_on_every_decoded_request(tmp_path: Path) -> None:
    model, _, _ = decode_backbone_with_heads(tmp_path)
    model.heads = CountingSession(FailingSession())
    responses = model.execute(
        [image_request(jpeg((1, 2, 3)), outputs=("score",)), image_request(b"GIF89a...")]
    )
    assert (
        responses[0].error is not None
        and "onnxruntime failed on a batch of 1: heads broke" in responses[0].error.message
    )
    assert "unsupported image format (GIF)" in responses[1].error.message


class FailingSession:
    """A heads session whose every run fails, as ONNX Runtime does on a bad input."""

    def get_inputs(self) -> Any:
        return [type("Input", (), {"name": "feature"})()]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        raise RuntimeError("heads broke")
