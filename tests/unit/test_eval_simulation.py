"""Simulated raters, pixel statistics and the active-learning curves, on generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_personalization.evaluation import protocol as P
from piaa_personalization.evaluation.curves import plot_curves, run_curves
from piaa_personalization.evaluation.features import ImageFeatures, pixel_stats
from piaa_personalization.evaluation.simulate import GROUPS, SimConfig, group_matrix, simulate
from tests.unit.test_eval_protocol import heads


def test_pixel_stats_of_plain_colours() -> None:
    red = pixel_stats(Image.new("RGB", (80, 60), (255, 0, 0)))
    np.testing.assert_allclose(red, [1.0, 0.299, 1.0], atol=1e-3)
    grey = pixel_stats(Image.new("RGB", (80, 60), (128, 128, 128)))
    np.testing.assert_allclose(grey, [0.0, 128 / 255, 0.0], atol=1e-3)
    blue = pixel_stats(Image.new("RGB", (10, 10), (0, 0, 255)))
    assert blue[0] == pytest.approx(-1.0, abs=1e-3)  # cold


def test_groups_cover_imagenet_once() -> None:
    g = group_matrix([0, 397, 398, 923, 924, 969, 975, 990, 999])
    names = list(GROUPS)
    assert [names[i] for i in g.argmax(axis=1)] == [
        "animals", "animals", "man-made", "man-made", "food", "food", "scenery", "people+plants", "man-made"
    ]  # fmt: skip
    assert (g.sum(axis=1) == 1).all()
    with pytest.raises(ValueError):
        group_matrix([1000])


def _features(n: int = 200) -> tuple[ImageFeatures, list[int], list[Path]]:
    rng = np.random.default_rng(3)
    pixels = np.stack([rng.uniform(-0.3, 0.3, n), rng.uniform(0.2, 0.8, n), rng.uniform(0, 1, n)], axis=1)
    return (
        ImageFeatures(heads(n), pixels),
        rng.integers(0, 1000, n).tolist(),
        [Path(f"{i}.jpg") for i in range(n)],
    )


def test_simulated_raters_follow_their_kind() -> None:
    feats, labels, paths = _features()
    ratings, raters = simulate(feats, labels, paths, SimConfig(n_test=8, n_train=4, noise=(0.01, 0.02)))
    assert len(raters) == 12 and len(ratings) == 12 * 200
    assert [r.kind for r in raters[:4]] == ["none", "content", "pixels", "mixed"]
    assert all(r.test for r in raters[:8]) and not any(r.test for r in raters[8:])
    assert set(np.unique(ratings.stars)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    generic = feats.heads.generic
    for i, rater in enumerate(raters):
        images, stars = ratings.of(i)
        rho = P.spearman(stars, generic[images])
        if rater.kind == "none":
            assert rater.strength == 0.0 and rho > 0.85  # the crowd's score, rounded, little noise
        else:
            assert 0.05 <= rater.strength <= 0.15 and rho < 0.97
    again, _ = simulate(feats, labels, paths, SimConfig(n_test=8, n_train=4, noise=(0.01, 0.02)))
    np.testing.assert_array_equal(again.stars, ratings.stars)


def test_active_and_random_curves(tmp_path: Path) -> None:
    feats, labels, paths = _features(160)
    ratings, _ = simulate(feats, labels, paths, SimConfig(n_test=4, n_train=6, seed=1))
    design = P.Design.build(feats.heads, ratings)
    split = P.Split(tuple(range(4, 10)), (0, 1, 2, 3))
    curves = run_curves(design, split, ks=(5, 20, 80, 100), reps=2)
    assert curves.rho.shape == (2, 4, 4, 2)
    assert np.isfinite(curves.rho[:, :3]).all()
    assert np.isnan(curves.rho[:, 3]).all()  # the pool (half of 160) is smaller than 100
    assert not np.array_equal(curves.rho[0], curves.rho[1])  # the strategies chose different images
    means, cis = curves.mean_ci("active")
    assert means.shape == (4,) and cis.shape == (4, 2) and np.isnan(means[3])
    over, over_ci = curves.over_generic("random")
    manual = (curves.rho[0, 1] - curves.generic).mean(axis=1).mean()
    assert over[1] == pytest.approx(manual) and over_ci[1, 0] <= over[1] <= over_ci[1, 1]
    gain, ci = curves.gain(20)
    assert ci[0] <= gain <= ci[1]
    png = tmp_path / "curves.png"
    plot_curves(curves, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_files_in_the_exporter_or_the_repository_layout(tmp_path: Path) -> None:
    from piaa_personalization.evaluation.features import model_files

    with pytest.raises(FileNotFoundError, match="no backbone/heads"):
        model_files(tmp_path)
    for name in ("backbone", "heads"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.onnx").write_bytes(b"stand-in")
    assert model_files(tmp_path) == (tmp_path / "backbone/1/model.onnx", tmp_path / "heads/1/model.onnx")
    (tmp_path / "backbone.onnx").write_bytes(b"stand-in")
    (tmp_path / "heads.onnx").write_bytes(b"stand-in")
    assert model_files(tmp_path) == (tmp_path / "backbone.onnx", tmp_path / "heads.onnx")  # exporter first
