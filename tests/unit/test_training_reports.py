"""piaa_export.reports: the contact sheet and the embedding-width study, on small generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from piaa_export import reports
from piaa_export.heads import HeadWeights


def test_contact_sheet_has_one_row_per_cluster(tmp_path: Path) -> None:
    weights = HeadWeights.load()
    rng = np.random.default_rng(0)
    # Features near each centroid, so every cluster has members.
    features = np.repeat(weights.centroids, 3, axis=0) * 20 + rng.normal(0, 0.01, (30, 1280))
    files = []
    for i in range(len(features)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (120, 90), (i * 8, 100, 200)).save(path)
        files.append(path)
    out = reports.contact_sheet(files, features, weights, tmp_path / "sheet.png", per_cluster=3)
    with Image.open(out) as sheet:
        assert sheet.size == (190 + 3 * (reports.THUMB + 4), 10 * (reports.THUMB + 4))
    rows = reports.nearest_members(features, weights, 3)
    assert [len(r) for r in rows] == [3] * 10
    assert sorted(i for r in rows for i in r) == list(range(30))


def test_simulated_ratings_follow_groups_and_seed() -> None:
    index = np.array([151, 152, 153, 0, 1, 2])  # three dogs, three fish
    a = reports.simulated_ratings(index, np.random.default_rng(1), noise=0.0)
    b = reports.simulated_ratings(index, np.random.default_rng(1), noise=0.0)
    assert np.array_equal(a, b)
    assert np.allclose(a[:3], a[0]) and np.allclose(a[3:], a[3])  # same group and block: same taste


def test_embedding_study_reports_every_setting() -> None:
    weights = HeadWeights.load()
    rng = np.random.default_rng(0)
    index = rng.integers(0, 1000, 120)
    features = np.abs(rng.normal(0, 1, (120, 1280)))
    study = reports.embedding_study(
        features, index, weights, dims=(0, 4, 8), ratings=(10, 30), users=5, alphas=(1.0, 10.0)
    )
    table = study["mean_spearman"]
    assert set(table) == {"alpha=1", "alpha=10"}
    assert set(table["alpha=1"]) == {"n=10", "n=30"} and set(table["alpha=1"]["n=10"]) == {
        "d=0",
        "d=4",
        "d=8",
    }
    assert all(-1 <= v <= 1 for by_n in table.values() for row in by_n.values() for v in row.values())
