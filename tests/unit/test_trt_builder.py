"""piaa_export.onnx2trt and onnx_precision: everything of the engine build a machine without a GPU can run.

Build settings from the generated gpu config, clear errors without TensorRT or a CUDA GPU, the FP16 ONNX
(converted and compared with FP32 on real photos, on the CPU), the Q/DQ check of the INT8 source, and
the parity inputs. tests/integration/test_triton_image.py checks the TensorRT names against the bindings.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from piaa_export import cli, onnx2trt
from piaa_export.exceptions import ExportError, ParityError, TensorRTUnavailableError
from piaa_export.onnx_precision import FP16_ONNX_MIN_COSINE, check_qdq, compare, min_row_cosine, run_onnx
from piaa_triton.paths import onnx_dir
from piaa_triton.repository import GPU_BATCHING, GPU_PRECISION, write_repository
from tests.fixtures.photos import Photo


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


@pytest.fixture(scope="module")
def gpu_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu")
    write_repository("gpu", out)
    return out


@pytest.fixture(scope="module")
def onnx_models() -> Path:
    folder = onnx_dir()
    for name in ("backbone.onnx", "heads.onnx"):
        assert (folder / name).is_file(), f"{folder / name} is missing: run make setup"
    return folder


def test_module_imports_without_tensorrt() -> None:
    assert "tensorrt" not in vars(onnx2trt)


def test_build_settings_come_from_the_gpu_config(gpu_repository: Path) -> None:
    backbone = onnx2trt.EngineConfig.from_model_config(gpu_repository / "backbone" / "config.pbtxt")
    heads = onnx2trt.EngineConfig.from_model_config(gpu_repository / "heads" / "config.pbtxt")
    top = GPU_BATCHING.max_batch_size
    assert (backbone.max_batch_size, heads.max_batch_size) == (top, top)
    assert (backbone.precision, heads.precision) == (GPU_PRECISION["backbone"], GPU_PRECISION["heads"])
    assert backbone.profile_shapes() == {
        "image": ((1, 3, 224, 224), (top // 2, 3, 224, 224), (top, 3, 224, 224))
    }
    assert heads.profile_shapes() == {"feature": ((1, 1280), (top // 2, 1280), (top, 1280))}


def test_models_that_are_no_engines_are_refused(gpu_repository: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a tensorrt_plan"):
        onnx2trt.EngineConfig.from_model_config(gpu_repository / "preprocess" / "config.pbtxt")
    with pytest.raises(ExportError, match="is missing"):
        onnx2trt.EngineConfig.from_model_config(tmp_path / "config.pbtxt")
    config = tmp_path / "config.pbtxt"
    config.write_text((gpu_repository / "heads" / "config.pbtxt").read_text().replace('"fp16"', '"fp8"'))
    with pytest.raises(ExportError, match="precision"):
        onnx2trt.EngineConfig.from_model_config(config)


def test_missing_tensorrt_is_a_clear_error(
    no_tensorrt: None, gpu_repository: Path, onnx_models: Path
) -> None:
    config = onnx2trt.EngineConfig.from_model_config(gpu_repository / "heads" / "config.pbtxt")
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed") as err:
        onnx2trt.build_engine(onnx_models / "heads.onnx", gpu_repository / "heads", config)
    assert "NGC Triton image" in str(err.value) and "docs/deployment.md" in str(err.value)


def test_cli_reads_the_model_config_and_reports_missing_tensorrt(
    no_tensorrt: None, gpu_repository: Path, onnx_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["engines", str(onnx_models / "heads.onnx"), str(gpu_repository / "heads")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert cli.main(["engines", str(onnx_models / "heads.onnx"), str(gpu_repository / "absent")]) == 2
    assert "config.pbtxt is missing" in capsys.readouterr().err


def fake_runtime(count: int, err: int = 0) -> types.SimpleNamespace:
    attrs = types.SimpleNamespace(
        cudaDevAttrComputeCapabilityMajor="major", cudaDevAttrComputeCapabilityMinor="minor"
    )
    return types.SimpleNamespace(
        cudaGetDeviceCount=lambda: (err, count),
        cudaDeviceAttr=attrs,
        cudaDeviceGetAttribute=lambda attr, device: (0, 8 if attr == "major" else 6),
    )


def test_no_cuda_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx2trt, "_cudart", lambda: fake_runtime(0))
    with pytest.raises(TensorRTUnavailableError, match="no CUDA GPU"):
        onnx2trt.compute_capability()
    monkeypatch.setattr(onnx2trt, "_cudart", lambda: fake_runtime(0, err=100))
    with pytest.raises(TensorRTUnavailableError, match="no CUDA GPU"):
        onnx2trt.compute_capability()
    monkeypatch.setattr(onnx2trt, "_cudart", lambda: fake_runtime(1))
    assert onnx2trt.compute_capability() == "8.6"


def test_missing_cuda_bindings_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TensorRTUnavailableError, match="cuda-python"):
        onnx2trt.compute_capability()


def test_bad_settings_are_refused_before_tensorrt_is_needed(no_tensorrt: None, tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    int8 = onnx2trt.EngineConfig(precision="int8", max_batch_size=8, input_dims={"image": (3, 224, 224)})
    with pytest.raises(ExportError, match="int8-onnx"):
        onnx2trt.build_engine(onnx, tmp_path / "model", int8)
    empty = onnx2trt.EngineConfig(precision="fp16", max_batch_size=0, input_dims={"image": (3, 224, 224)})
    with pytest.raises(ExportError, match="max_batch_size"):
        onnx2trt.build_engine(onnx, tmp_path / "model", empty)
    assert not (tmp_path / "model").exists()


def test_min_row_cosine_and_compare() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert min_row_cosine(a, a * 3) == pytest.approx(1.0)
    assert min_row_cosine(a, np.array([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(0.0)
    assert onnx2trt.INT8_MIN_COSINE < onnx2trt.FP16_MIN_COSINE < 1.0
    assert compare({"x": a}, {"x": a * 2}, 0.999)["outputs"]["x"]["min_cosine"] == pytest.approx(1.0)
    with pytest.raises(ParityError, match="cosine below"):
        compare({"x": a}, {"x": a[::-1]}, 0.999)
    with pytest.raises(ParityError, match="missing"):
        compare({"x": a}, {"y": a}, 0.999)


def test_parity_inputs_are_real_photos_and_their_backbone_features(
    gpu_repository: Path, onnx_models: Path, photos: list[Photo]
) -> None:
    files = [p.path for p in photos[:20]]
    backbone = onnx2trt.EngineConfig.from_model_config(gpu_repository / "backbone" / "config.pbtxt")
    heads = onnx2trt.EngineConfig.from_model_config(gpu_repository / "heads" / "config.pbtxt")
    images = onnx2trt.parity_inputs(onnx_models / "backbone.onnx", backbone, files)["image"]
    assert images.shape == (onnx2trt.PARITY_BATCH, 3, 224, 224) and images.dtype == np.uint8
    features = onnx2trt.parity_inputs(onnx_models / "heads.onnx", heads, files)["feature"]
    expected = run_onnx(onnx_models / "backbone.onnx", {"image": images})["feature"]
    np.testing.assert_array_equal(features, expected)


@pytest.mark.parametrize("model", ["heads", "backbone"])
def test_the_fp16_network_source_matches_fp32_on_real_photos(
    model: str, gpu_repository: Path, onnx_models: Path, photos: list[Photo], tmp_path: Path
) -> None:
    config = onnx2trt.EngineConfig.from_model_config(gpu_repository / model / "config.pbtxt")
    inputs = onnx2trt.parity_inputs(onnx_models / f"{model}.onnx", config, [p.path for p in photos[::50]])
    source, checks = onnx2trt.network_source(onnx_models / f"{model}.onnx", config, tmp_path, inputs, None)
    converted = onnx.load(str(source))
    assert any(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer), "weights are FP16"
    source_model = onnx.load(str(onnx_models / f"{model}.onnx"))
    for io, was in zip(  # the source's I/O types (uint8 pixels, FP32 features and outputs): what Triton feeds
        (*converted.graph.input, *converted.graph.output),
        (*source_model.graph.input, *source_model.graph.output),
        strict=True,
    ):
        assert io.type.tensor_type.elem_type == was.type.tensor_type.elem_type, io.name
    if model == "backbone":
        assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    report = checks["fp16_onnx_vs_fp32"]
    assert report["cosine_floor"] == FP16_ONNX_MIN_COSINE
    assert min(o["min_cosine"] for o in report["outputs"].values()) >= FP16_ONNX_MIN_COSINE


def tiny_model(path: Path) -> Path:
    """A 1x1 convolution + ReLU on a 4-channel image: small enough to quantize in a test."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 4, 1, 1], rng.standard_normal(32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, 8])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def quantize(source: Path, target: Path, symmetric: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.batches = iter(
                [{"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    options = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8, extra_options=options,
    )  # fmt: skip
    return target


def test_the_int8_source_must_be_symmetric_signed_qdq(tmp_path: Path) -> None:
    fp32 = tiny_model(tmp_path / "tiny.onnx")
    good = quantize(fp32, tmp_path / "tiny.int8.onnx", symmetric=True)
    assert check_qdq(good) >= 2  # the input and the convolution's output at least
    config = onnx2trt.EngineConfig(precision="int8", max_batch_size=4, input_dims={"x": (4, 8, 8)})
    source, checks = onnx2trt.network_source(fp32, config, tmp_path, {}, good)
    assert source == good and checks["qdq_nodes"] >= 2
    with pytest.raises(ExportError, match="symmetric signed INT8"):
        check_qdq(quantize(fp32, tmp_path / "tiny.uint8.onnx", symmetric=False))  # ONNX Runtime's default
    with pytest.raises(ExportError, match="no QuantizeLinear"):
        check_qdq(fp32)
    with pytest.raises(ExportError, match="no Q/DQ model"):
        check_qdq(tmp_path / "absent.onnx")
