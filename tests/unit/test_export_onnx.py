"""ONNX export: graph contract (names, dims, opset), parity with torch on real photos, ImageNet top-1, and
the build's idempotence. The build runs once per session into a temporary folder (never build/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from piaa_client.features import (
    BACKBONE_FEATURE,
    BACKBONE_INPUT,
    BACKBONE_LOGITS,
    FEATURE_SPACE_VERSION,
    HEAD_OUTPUTS,
)
from piaa_export import build as build_mod
from piaa_export import cli, runtime, verify
from piaa_export.backbone import Backbone, load_backbone
from piaa_export.exceptions import WeightsError
from piaa_export.heads import Heads, HeadWeights
from piaa_export.sources import HEADS_FILE, MANIFEST_FILE
from tests.fixtures.photos import SHARED_PHOTOS, Photo

SAMPLE = 32
"""torch eager is slow on 2 cores: torch runs on this many photos (spread over all classes), ONNX on all."""


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "piaa-onnx"
    build_mod.build(out)  # idempotent: a second module asking for it finds it up to date
    return out


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone()


@pytest.fixture(scope="module")
def sample(photos: list[Photo]) -> list[Photo]:
    return photos[:: len(photos) // SAMPLE][:SAMPLE]


@pytest.fixture(scope="module")
def sample_images(sample: list[Photo]) -> np.ndarray:
    return verify.photo_tensors([p.path for p in sample])


@pytest.fixture(scope="module")
def torch_outputs(backbone: Backbone, sample_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        feature, logits = backbone(torch.from_numpy(sample_images))
    return feature.numpy(), logits.numpy()


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_backbone_graph_contract(onnx_dir: Path) -> None:
    model = onnx.load(str(onnx_dir / "backbone.onnx"))
    assert model.opset_import[0].version == 17
    (image,) = model.graph.input
    assert image.name == BACKBONE_INPUT.name and _dims(image)[1:] == list(BACKBONE_INPUT.dims)
    assert image.type.tensor_type.elem_type == onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(BACKBONE_INPUT.dtype)
    )
    first = model.graph.node[0]  # the uint8 pixels are normalized inside the graph, first thing
    assert first.op_type == "Cast" and list(first.input) == [BACKBONE_INPUT.name]
    assert isinstance(_dims(image)[0], str)  # the only dynamic axis is the batch
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert list(outputs) == [BACKBONE_FEATURE.name, BACKBONE_LOGITS.name]
    assert outputs[BACKBONE_FEATURE.name][1:] == list(BACKBONE_FEATURE.dims)
    assert outputs[BACKBONE_LOGITS.name][1:] == list(BACKBONE_LOGITS.dims)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["feature_space_version"] == FEATURE_SPACE_VERSION


def test_heads_graph_contract(onnx_dir: Path) -> None:
    model = onnx.load(str(onnx_dir / "heads.onnx"))
    assert model.opset_import[0].version == 17
    (feature,) = model.graph.input
    assert feature.name == BACKBONE_FEATURE.name and _dims(feature)[1:] == list(BACKBONE_FEATURE.dims)
    got = [(o.name, _dims(o)[1:]) for o in model.graph.output]
    assert got == [(o.name, list(o.dims)) for o in HEAD_OUTPUTS]
    assert all(isinstance(_dims(o)[0], str) for o in model.graph.output)


def test_backbone_parity_on_real_photos(
    onnx_dir: Path, sample_images: np.ndarray, torch_outputs: tuple[np.ndarray, np.ndarray]
) -> None:
    feature, logits = runtime.session(onnx_dir / "backbone.onnx").run(None, {"image": sample_images})
    assert len(feature) == SAMPLE
    assert verify.FP32_ATOL == 1e-4
    assert np.max(np.abs(feature - torch_outputs[0])) <= verify.FP32_ATOL
    assert np.max(np.abs(logits - torch_outputs[1])) <= verify.FP32_ATOL


def test_backbone_parity_report(onnx_dir: Path, backbone: Backbone, sample_images: np.ndarray) -> None:
    report = verify.backbone_parity(backbone, onnx_dir / "backbone.onnx", sample_images[:4])
    assert report.samples == 4 and set(report.max_abs_diff) == {"feature", "logits"}
    assert report.raise_for_failure().ok


def test_heads_parity_on_real_features(onnx_dir: Path, photos: list[Photo]) -> None:
    images = verify.photo_tensors([p.path for p in photos[:24]])
    (features,) = runtime.session(onnx_dir / "backbone.onnx").run(["feature"], {"image": images})
    report = verify.heads_parity(Heads(HeadWeights.load()), onnx_dir / "heads.onnx", features)
    assert report.ok, report.max_abs_diff


def test_parity_failure_is_reported(onnx_dir: Path, backbone: Backbone) -> None:
    heads = Heads(HeadWeights.load())
    with torch.no_grad():
        heads.generic_b += 1.0  # a torch model that no longer matches the exported file
    report = verify.heads_parity(heads, onnx_dir / "heads.onnx", np.ones((2, 1280), np.float32))
    assert not report.ok
    with pytest.raises(verify.ParityError, match="generic"):
        report.raise_for_failure()


def test_batch_size_does_not_change_outputs(onnx_dir: Path, photos: list[Photo]) -> None:
    images = verify.photo_tensors([p.path for p in photos[:5]])
    sess = runtime.session(onnx_dir / "backbone.onnx")
    (batched,) = sess.run(["feature"], {"image": images})
    single = np.concatenate([sess.run(["feature"], {"image": images[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_imagenet_top1_matches_torch(
    onnx_dir: Path, sample: list[Photo], torch_outputs: tuple[np.ndarray, np.ndarray]
) -> None:
    labelled = verify.read_labelled_folder(SHARED_PHOTOS)
    assert len(labelled) == 800
    onnx_all = verify.onnx_top1(onnx_dir / "backbone.onnx", labelled)
    # Clearly-labelled ImageNet samples (a reference export measured 88.9%): a wrong preprocessing or
    # weight load falls far below this.
    assert onnx_all >= 0.85, f"ONNX top-1 on {len(labelled)} photos is {onnx_all:.3f}"
    by_path = {p.path: p for p in labelled}
    subset = [by_path[p.path] for p in sample]
    onnx_subset = verify.onnx_top1(onnx_dir / "backbone.onnx", subset)
    torch_subset = float(np.mean(torch_outputs[1].argmax(axis=1) == [p.imagenet_index for p in sample]))
    assert abs(onnx_subset - torch_subset) <= verify.TOP1_MAX_GAP


def test_build_is_up_to_date_until_a_source_changes(onnx_dir: Path, tmp_path: Path) -> None:
    assert build_mod.is_up_to_date(onnx_dir)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["feature_space_version"] == FEATURE_SPACE_VERSION
    assert manifest["sources"] == build_mod.source_fingerprints()
    assert "generated" in manifest["parity"]["checked_on"]  # the build needs no photos
    copy = tmp_path / "heads.npz"
    copy.write_bytes(HEADS_FILE.read_bytes())
    assert not build_mod.is_up_to_date(onnx_dir, copy)  # same content, newer file: the mtime rule
    HeadWeights.load(copy)
    weights = HeadWeights.load()
    changed = HeadWeights(**{**weights.__dict__, "temperature": weights.temperature * 2})
    changed.save(copy)
    os.utime(copy, (0, 0))  # older than the outputs, but a different fingerprint
    assert not build_mod.is_up_to_date(onnx_dir, copy)


def test_cli_build_says_up_to_date(onnx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["build", "--out", str(onnx_dir)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_heads_for_another_feature_space_are_refused(tmp_path: Path) -> None:
    manifest = json.loads(MANIFEST_FILE.read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "feature_space_version": "fs0"}))
    with pytest.raises(WeightsError, match="fs0"):
        build_mod.build(tmp_path / "out", manifest_file=tmp_path / "manifest.json")
    assert not (tmp_path / "out" / "manifest.json").exists()
