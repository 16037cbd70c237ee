"""AADB and FLICKR-AES loaders on small generated data in exactly their published formats, and the
refit of the heads on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_client.features import ATTRIBUTES
from piaa_export.build import build
from piaa_export.datasets import load_aadb, load_flickr_aes, refit_on_datasets
from piaa_export.exceptions import DatasetError
from piaa_export.fitting import TrainConfig
from piaa_export.heads import HeadWeights

AADB_FILE_NAMES = [("BalacingElements" if a == "BalancingElements" else a) for a in ATTRIBUTES]
"""The official label files misspell BalancingElements; the loader must accept that spelling."""


def write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((300, 260), Image.Resampling.BICUBIC).save(folder / name, quality=90)


def make_aadb(root: Path, train_names: list[str], test_names: list[str], seed: int = 0) -> np.ndarray:
    """AADB layout: imgListFiles_label/imgList{Train,TestNew}Regression_<attr>.txt, datasetImages_warp256/."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1, 1, (len(train_names) + len(test_names), len(ATTRIBUTES))).round(2)
    labels = root / "imgListFiles_label"
    labels.mkdir(parents=True)
    for split, names, offset in (("Train", train_names, 0), ("TestNew", test_names, len(train_names))):
        for j, attr in enumerate([*AADB_FILE_NAMES, "MotionBlur", "score"]):
            col = values[:, j] if j < len(ATTRIBUTES) else rng.uniform(0, 1, len(values)).round(2)
            lines = [f"{n} {col[offset + i]}" for i, n in enumerate(names)]
            (labels / f"imgList{split}Regression_{attr}.txt").write_text("\n".join(lines) + "\n")
    write_images(root / "datasetImages_warp256", train_names + test_names, seed)
    return values


def make_flickr(root: Path, ratings: list[tuple[str, str, int]]) -> None:
    """FLICKR-AES layout: the worker CSV (header with spaces after the commas) + 40K/ images."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["worker, imagePair, score", *(f"{w}, {img}, {s}" for w, img, s in ratings)]
    (root / "FLICKR-AES_image_labeled_by_each_worker.csv").write_text("\n".join(lines) + "\n")
    write_images(root / "40K", sorted({img for _, img, _ in ratings}))


def test_aadb_loader_reads_attributes_splits_and_spelling(tmp_path: Path) -> None:
    values = make_aadb(tmp_path, ["farm1_a.jpg", "farm1_b.jpg"], ["farm1_c.jpg"])
    data = load_aadb(tmp_path)
    assert [p.name for p in data.images] == ["farm1_a.jpg", "farm1_b.jpg", "farm1_c.jpg"]
    np.testing.assert_allclose(data.attributes, values)
    assert data.split == ["train", "train", "test"]
    assert np.all((data.score >= 0) & (data.score <= 1))


def test_aadb_image_missing_on_disk_or_missing_an_attribute_is_dropped(tmp_path: Path) -> None:
    make_aadb(tmp_path, ["a.jpg", "b.jpg"], ["c.jpg"])
    (tmp_path / "datasetImages_warp256" / "b.jpg").unlink()
    symmetry = tmp_path / "imgListFiles_label" / "imgListTestNewRegression_Symmetry.txt"
    symmetry.write_text("")
    assert [p.name for p in load_aadb(tmp_path).images] == ["a.jpg"]


def test_aadb_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no AADB label files"):
        load_aadb(tmp_path)
    make_aadb(tmp_path / "x", ["a.jpg"], [])
    bad = tmp_path / "x" / "imgListFiles_label" / "imgListTrainRegression_Light.txt"
    bad.write_text("a.jpg high\n")
    with pytest.raises(DatasetError, match="not a number"):
        load_aadb(tmp_path / "x")


def test_flickr_aes_loader_averages_workers(tmp_path: Path) -> None:
    make_flickr(tmp_path, [("A1", "farm1_1.jpg", 5), ("A2", "farm1_1.jpg", 2), ("A1", "farm1_2.jpg", 3)])
    data = load_flickr_aes(tmp_path)
    assert [p.name for p in data.images] == ["farm1_1.jpg", "farm1_2.jpg"]
    np.testing.assert_allclose(data.mean_score, [3.5, 3.0])
    assert data.ratings.tolist() == [2, 1]
    assert data.by_worker["A1"] == [("farm1_1.jpg", 5.0), ("farm1_2.jpg", 3.0)]


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        ("worker, imagePair, score", "A1, farm1_1.jpg, 6", "outside 1..5"),
        ("worker, imagePair, score", "A1, farm1_1.jpg, good", "bad row"),
        ("worker, image, score", "A1, farm1_1.jpg, 3", "imagePair"),
    ],
)
def test_flickr_aes_errors_are_clear(tmp_path: Path, header: str, row: str, message: str) -> None:
    (tmp_path / "FLICKR-AES_image_labeled_by_each_worker.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(DatasetError, match=message):
        load_flickr_aes(tmp_path)


def test_flickr_aes_without_csv_or_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_flickr_aes(tmp_path)
    (tmp_path / "FLICKR-AES_image_labeled_by_each_worker.csv").write_text(
        "worker, imagePair, score\nA, x.jpg, 3\n"
    )
    with pytest.raises(DatasetError, match="none of the 1 rated"):
        load_flickr_aes(tmp_path)


def test_refit_replaces_only_the_labelled_heads(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    onnx = tmp_path_factory.getbasetemp() / "piaa-onnx"
    build(onnx)
    names = [f"farm1_{i}.jpg" for i in range(12)]
    make_aadb(tmp_path / "aadb", names[:9], names[9:])
    make_flickr(tmp_path / "flickr", [(f"W{i % 3}", n, 1 + i % 5) for i, n in enumerate(names)])
    weights = HeadWeights.load()
    config = TrainConfig(aadb=tmp_path / "aadb", flickr_aes=tmp_path / "flickr", holdout=0.25)
    refit, metrics, sources = refit_on_datasets(weights, config, onnx / "backbone.onnx", tmp_path / "cache")
    assert not np.array_equal(refit.attributes_w, weights.attributes_w)
    assert not np.array_equal(refit.generic_w, weights.generic_w)
    assert np.array_equal(refit.centroids, weights.centroids)
    assert np.array_equal(refit.embedding_proj, weights.embedding_proj)
    assert metrics["aadb"]["images"] == 12 and metrics["aadb"]["heldout_images"] == 3
    assert set(metrics["aadb"]["heldout_spearman"]) == set(ATTRIBUTES)
    assert metrics["flickr_aes"]["images"] == 12
    assert sources["aadb"]["count"] == 12 and len(sources["flickr_aes"]["sha256"]) == 64
