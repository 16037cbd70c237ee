"""piaa_export.quantize: the INT8 backbones calibrated on real photos, their accuracy bar, idempotence.

Two real runs: on the 800 shared photos (the acceptance bar: top-1 within a point of FP32) and on the
product's bundled sample photos (a clone without the shared data). Both quantize the FP32 export this
session builds into a temporary folder, never build/.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scipy.stats import spearmanr

from piaa_export import build as build_mod
from piaa_export import quantize
from piaa_export.exceptions import DatasetError
from piaa_export.onnx_precision import check_qdq
from piaa_triton.paths import BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX
from tests.fixtures.photos import SHARED_PHOTOS


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = tmp_path_factory.getbasetemp() / "piaa-onnx"
    build_mod.build(built)  # shared with the export tests' session build, idempotent
    return built


def _fresh(fp32_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("backbone.onnx", "heads.onnx"):
        shutil.copyfile(fp32_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def shared_run(fp32_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> quantize.QuantizeResult:
    out = _fresh(fp32_dir, tmp_path_factory.mktemp("int8-shared") / "onnx")
    return quantize.quantize_backbone(out, photos=SHARED_PHOTOS)


def _zero_point_types(path: Path) -> set[str]:
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    return {
        str(numpy_helper.to_array(initializers[n.input[2]]).dtype)
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2
    }


def test_spearman_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    b = a + rng.normal(scale=0.5, size=a.shape)
    ours = quantize.spearman(a, b)
    assert np.allclose(ours, [spearmanr(a[:, k], b[:, k]).statistic for k in range(3)], atol=1e-12)
    assert quantize.spearman(a[:, 0], -a[:, 0])[0] == pytest.approx(-1.0)


def test_calibration_photos_spread_over_the_folder() -> None:
    files = [Path(f"{i:03d}.jpg") for i in range(800)]
    chosen = quantize.calibration_subset(files, 96)
    assert len(chosen) == len(set(chosen)) == 96
    assert chosen[0] == files[0] and chosen[-1].name >= "790"
    assert quantize.calibration_subset(files[:10], 96) == files[:10]


def test_each_tolerance_is_enforced() -> None:
    good = quantize.Int8Check(
        file="x", photos=10, top1_fp32=0.89, top1_int8=0.885, top1_heldout_fp32=0.89,
        top1_heldout_int8=0.885, generic_spearman=0.99, attribute_spearman_min=0.99,
        content_mean_max_abs_diff=0.01, content_max_abs_diff=0.2, feature_cosine_median=0.995,
        feature_cosine_min=0.95,
    )  # fmt: skip
    assert good.failures() == []
    for change, word in [
        ({"top1_int8": 0.875}, "top-1"),
        ({"generic_spearman": 0.97}, "generic"),
        ({"attribute_spearman_min": 0.9}, "attribute"),
        ({"content_mean_max_abs_diff": 0.05}, "content"),
        ({"feature_cosine_median": 0.9}, "cosine"),
    ]:
        (failure,) = dataclasses.replace(good, **change).failures()
        assert word in failure
    unlabelled = dataclasses.replace(good, top1_fp32=None, top1_int8=None, attribute_spearman_min=0.9)
    assert unlabelled.bar() == quantize.SAMPLE_BAR and unlabelled.failures() == []


def test_photos_come_from_the_shared_folder_else_the_bundled_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, labels = quantize.list_photos(SHARED_PHOTOS)
    assert len(files) == len(labels) == 800
    assert quantize.default_photos() == SHARED_PHOTOS
    monkeypatch.setattr(quantize, "SHARED_PHOTOS", tmp_path / "absent")
    samples = quantize.default_photos()
    files, labels = quantize.list_photos(samples)
    assert [f.name for f in files] == list(quantize.SAMPLE_PHOTO_FILES) and labels == {}
    with pytest.raises(DatasetError, match="no JPEG"):
        quantize.list_photos(tmp_path)


def test_int8_meets_the_bar_on_the_shared_photos(shared_run: quantize.QuantizeResult) -> None:
    checks = {c["file"]: c for c in shared_run.manifest["checks"]}
    assert set(checks) == {BACKBONE_INT8_CPU_ONNX, BACKBONE_INT8_ONNX}
    for check in checks.values():
        assert check["photos"] == 800
        assert quantize.Int8Check(**check).bar() == quantize.PHOTO_BAR
        assert check["top1_fp32"] - check["top1_int8"] <= 0.01  # the bar: one point
        assert check["top1_heldout_fp32"] - check["top1_heldout_int8"] <= 0.01
        assert check["generic_spearman"] >= quantize.PHOTO_BAR.generic_min_spearman
        assert check["attribute_spearman_min"] >= quantize.PHOTO_BAR.attribute_min_spearman
        assert check["feature_cosine_median"] >= quantize.PHOTO_BAR.feature_min_median_cosine
    assert shared_run.manifest["calibration_photos"] == quantize.CALIBRATION_PHOTOS


def test_the_two_files_are_the_forms_onnx_runtime_and_tensorrt_take(
    shared_run: quantize.QuantizeResult,
) -> None:
    out = shared_run.out
    assert _zero_point_types(out / BACKBONE_INT8_CPU_ONNX) == {"uint8"}
    assert check_qdq(out / BACKBONE_INT8_ONNX) > 40  # symmetric signed INT8 throughout
    kept = shared_run.manifest["calibration"]["float_nodes"]
    nodes = {n.name: n.op_type for n in onnx.load(str(out / "backbone.onnx")).graph.node}
    # The uint8 input's normalization (Cast, Sub, Div and their constants), the stem Conv, the first block's
    # two convolutions, the classifier.
    early = ["Conv"] * (1 + quantize.FLOAT_CONVS_AFTER_STEM)
    assert [nodes[k] for k in kept if nodes[k] != "Constant"] == ["Cast", "Sub", "Div", *early, "Gemm"]
    assert (out / quantize.CALIBRATION_FILE).is_file()


def _largest_weight_per_conv(path: Path) -> dict[str, tuple[int, int]]:
    """Each quantized Conv of the file: (group, largest |quantized weight|)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    found = {}
    for node in model.graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            found[node.name] = (group, int(np.abs(inits[dq.input[0]].astype(np.int32)).max()))
    return found


def test_the_cpu_file_cannot_overflow_int16_pair_sums(shared_run: quantize.QuantizeResult) -> None:
    """x86 without VNNI sums u8·s8 pairs in int16: 2 x 255 x 64 fits, 2 x 255 x 127 does not."""
    cpu = _largest_weight_per_conv(shared_run.out / BACKBONE_INT8_CPU_ONNX)
    pointwise = [w for group, w in cpu.values() if group == 1]
    depthwise = [w for group, w in cpu.values() if group > 1]
    assert pointwise and depthwise
    assert max(pointwise) <= 64 and 2 * 255 * max(pointwise) <= 32767
    assert max(depthwise) == 127  # 8 bits where the kernel sums in int32
    trt = _largest_weight_per_conv(shared_run.out / BACKBONE_INT8_ONNX)
    assert {w for _, w in trt.values()} == {127}  # TensorRT's file: 8 bits everywhere


def test_a_second_run_is_up_to_date_and_a_new_fp32_export_is_not(
    shared_run: quantize.QuantizeResult,
) -> None:
    out = shared_run.out
    again = quantize.quantize_backbone(out, photos=SHARED_PHOTOS)
    assert again.up_to_date and again.manifest == shared_run.manifest
    expected = quantize.sources(
        out / "backbone.onnx", quantize.calibration_subset(quantize.list_photos(SHARED_PHOTOS)[0]), []
    )
    assert not quantize.is_up_to_date(out, expected)  # other photos checked: not current
    (out / BACKBONE_INT8_ONNX).write_bytes(b"truncated")
    assert not quantize.quantize_backbone(out, photos=SHARED_PHOTOS).up_to_date  # a damaged output is rebuilt


def test_the_bundled_samples_calibrate_a_clone_without_shared_photos(
    fp32_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize, "SHARED_PHOTOS", tmp_path / "absent")
    out = _fresh(fp32_dir, tmp_path / "onnx")
    result = quantize.quantize_backbone(out)
    assert result.manifest["photos"] == str(quantize.default_photos())
    check_cpu, check_trt = result.manifest["checks"]
    assert check_cpu["photos"] == 7 * len(quantize.SAMPLE_PHOTO_FILES)  # each photo and 6 variants
    assert check_cpu["top1_int8"] is None
    for check in (check_cpu, check_trt):
        assert quantize.Int8Check(**check).bar() == quantize.SAMPLE_BAR
        assert not quantize.Int8Check(**check).failures()
