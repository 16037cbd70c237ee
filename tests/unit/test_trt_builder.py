"""piaa_export.onnx2trt: importable without TensorRT, clear errors without TensorRT or a CUDA GPU, and
its pure helpers (plan names, cc_model_filenames, calibration batches, cosine check)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from piaa_export import cli, onnx2trt
from piaa_export.exceptions import TensorRTUnavailableError


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_module_imports_without_tensorrt() -> None:
    assert "tensorrt" not in vars(onnx2trt)
    assert onnx2trt.EngineConfig().precision == "fp16"


def test_missing_tensorrt_is_a_clear_error(no_tensorrt: None, tmp_path: Path) -> None:
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed") as err:
        onnx2trt.build_engine(tmp_path / "backbone.onnx", tmp_path / "model")
    assert "NGC Triton container" in str(err.value) and "docs/models.md" in str(err.value)


def test_cli_reports_missing_tensorrt(
    no_tensorrt: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["engines", str(tmp_path / "backbone.onnx"), str(tmp_path / "model")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


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


def test_plan_names_and_cc_model_filenames(tmp_path: Path) -> None:
    assert onnx2trt.plan_filename("8.6") == "model_sm86.plan"
    assert onnx2trt.plan_filename("9.0") == "model_sm90.plan"
    with pytest.raises(ValueError):
        onnx2trt.plan_filename("sm86")
    version = tmp_path / "backbone" / "1"
    version.mkdir(parents=True)
    for cc in ("8.6", "9.0"):
        plan = version / onnx2trt.plan_filename(cc)
        plan.write_bytes(b"engine")
        plan.with_suffix(".json").write_text(json.dumps({"compute_capability": cc, "tensorrt": "10.x"}))
    (version / "model_sm75.plan").write_bytes(b"no provenance")  # without its JSON: left out
    assert onnx2trt.cc_model_filenames(tmp_path / "backbone") == {
        "8.6": "model_sm86.plan",
        "9.0": "model_sm90.plan",
    }
    assert onnx2trt.cc_model_filenames(tmp_path / "absent") == {}


def test_calibration_batches_have_a_fixed_shape() -> None:
    images = np.arange(10 * 3 * 2 * 2, dtype=np.float64).reshape(10, 3, 2, 2)
    batches = list(onnx2trt.calibration_batches(images, 4))
    assert [b.shape for b in batches] == [(4, 3, 2, 2), (4, 3, 2, 2)]  # the partial tail is dropped
    assert all(b.dtype == np.float32 and b.flags["C_CONTIGUOUS"] for b in batches)
    np.testing.assert_array_equal(batches[1], images[4:8])


def test_min_row_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert onnx2trt.min_row_cosine(a, a * 3) == pytest.approx(1.0)
    assert onnx2trt.min_row_cosine(a, np.array([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(0.0)
    assert onnx2trt.INT8_MIN_COSINE < onnx2trt.FP16_MIN_COSINE < 1.0


def test_bad_config_is_refused_before_tensorrt_is_needed(no_tensorrt: None, tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    with pytest.raises(onnx2trt.ExportError, match="calibration-photos"):
        onnx2trt.build_engine(onnx, tmp_path / "model", onnx2trt.EngineConfig(precision="int8"))
    with pytest.raises(onnx2trt.ExportError, match="max_batch_size"):
        onnx2trt.build_engine(onnx, tmp_path / "model", onnx2trt.EngineConfig(max_batch_size=0))
    assert not (tmp_path / "model").exists()
