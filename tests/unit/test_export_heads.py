"""The committed heads: shapes, ranges, manifest, and the torch module matching its numpy twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from piaa_client.features import (
    ATTRIBUTES,
    BACKBONE_FEATURE_DIM,
    EMBEDDING_DIM,
    FEATURE_SPACE_VERSION,
    HEAD_OUTPUTS,
    NUM_CONTENT_CLUSTERS,
)
from piaa_export.exceptions import WeightsError
from piaa_export.heads import Heads, HeadWeights, heads_numpy
from piaa_export.runtime import session
from piaa_export.sources import HEADS_FILE, MANIFEST_FILE
from piaa_export.verify import photo_tensors
from tests.fixtures.photos import Photo


@pytest.fixture(scope="module")
def weights() -> HeadWeights:
    return HeadWeights.load()


@pytest.fixture(scope="module")
def real_features(photos: list[Photo], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from piaa_export.build import build

    out = tmp_path_factory.getbasetemp() / "piaa-onnx"
    build(out)
    images = photo_tensors([p.path for p in photos[::50]])
    (features,) = session(out / "backbone.onnx").run(["feature"], {"image": images})
    return np.asarray(features)


def run(weights: HeadWeights, features: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = Heads(weights)(torch.from_numpy(features.astype(np.float32)))
    return {o.name: t.numpy() for o, t in zip(HEAD_OUTPUTS, out, strict=True)}


def test_committed_weights_are_small_and_described() -> None:
    assert HEADS_FILE.stat().st_size < 1_000_000
    manifest = json.loads(MANIFEST_FILE.read_text())
    assert manifest["feature_space_version"] == FEATURE_SPACE_VERSION
    assert manifest["provisional"] is False
    assert len(manifest["trained_on"]["photos"]["sha256"]) == 64
    assert manifest["metrics"]["generic"]["heldout"]["pairwise_accuracy"] > 0.5
    assert set(manifest["metrics"]["attributes"]["heldout_spearman"]) == set(ATTRIBUTES)


def test_outputs_have_declared_shapes_and_ranges(weights: HeadWeights, real_features: np.ndarray) -> None:
    out = run(weights, real_features)
    n = len(real_features)
    for spec in HEAD_OUTPUTS:
        assert out[spec.name].shape == (n, *spec.dims)
        assert out[spec.name].dtype == np.float32 and np.all(np.isfinite(out[spec.name]))
    assert out["generic"].min() >= 0.0 and out["generic"].max() <= 1.0
    assert out["attributes"].min() >= -1.0 and out["attributes"].max() <= 1.0
    np.testing.assert_allclose(out["content"].sum(axis=1), 1.0, atol=1e-5)
    assert out["content"].min() >= 0.0
    assert out["embedding"].shape[1] == EMBEDDING_DIM


def test_outputs_vary_across_photos(weights: HeadWeights, real_features: np.ndarray) -> None:
    out = run(weights, real_features)
    assert out["generic"].std() > 0.01
    assert np.all(out["attributes"].std(axis=0) > 0.01)
    assert out["embedding"].std(axis=0).max() > 0.1
    # A fitted temperature keeps content informative: far from the uniform 1/K on real photos.
    assert out["content"].max(axis=1).mean() > 3.0 / NUM_CONTENT_CLUSTERS
    assert len(set(out["content"].argmax(axis=1).tolist())) >= 3


def test_torch_module_matches_numpy_twin(weights: HeadWeights, real_features: np.ndarray) -> None:
    torch_out = run(weights, real_features)
    numpy_out = heads_numpy(weights, real_features)
    for name, value in numpy_out.items():
        np.testing.assert_allclose(torch_out[name], value, atol=2e-5, err_msg=name)


def test_zero_feature_gives_finite_outputs(weights: HeadWeights) -> None:
    out = run(weights, np.zeros((1, BACKBONE_FEATURE_DIM), np.float32))
    assert all(np.all(np.isfinite(v)) for v in out.values())


def test_save_and_load_round_trip_byte_identical(weights: HeadWeights, tmp_path: Path) -> None:
    weights.save(tmp_path / "a.npz")
    again = HeadWeights.load(tmp_path / "a.npz")
    again.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert (tmp_path / "a.npz").read_bytes() == HEADS_FILE.read_bytes()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("centroids", np.zeros((NUM_CONTENT_CLUSTERS + 1, BACKBONE_FEATURE_DIM), np.float32), "centroids"),
        ("embedding_proj", np.zeros((EMBEDDING_DIM, 3), np.float32), "embedding_proj"),
        ("temperature", np.float32(0.0), "temperature"),
        ("generic_w", np.full(BACKBONE_FEATURE_DIM, np.nan, np.float32), "not finite"),
    ],
)
def test_invalid_weights_are_refused(
    weights: HeadWeights, field: str, value: np.ndarray, message: str
) -> None:
    with pytest.raises(WeightsError, match=message):
        HeadWeights(**{**weights.__dict__, field: np.asarray(value)}).validate()


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        HeadWeights.load(tmp_path / "none.npz")
    np.savez(tmp_path / "partial.npz", generic_w=np.zeros(3))
    with pytest.raises(WeightsError, match="lacks"):
        HeadWeights.load(tmp_path / "partial.npz")
