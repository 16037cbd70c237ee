"""Fitting the heads: each fit on synthetic data with a known answer, the taxonomy, and deterministic
training end to end on a small subset of the real photos."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from piaa_client.features import ATTRIBUTES, EMBEDDING_DIM, FEATURE_SPACE_VERSION
from piaa_export import fitting, taxonomy, train
from piaa_export.build import build
from piaa_export.extract import DEGRADATION_NAMES, TrainingData, extract, list_photos, photo_plan
from piaa_export.heads import HeadWeights, heads_numpy, l2_normalize
from tests.fixtures.photos import SHARED_PHOTOS

SUBSET = 16
"""Photos in the end-to-end subset: 16 × (1 + 2 kinds × 2 levels) = 80 images ≥ EMBEDDING_DIM."""


def synthetic_data(n: int = 60, d: int = 32, seed: int = 0) -> TrainingData:
    """Originals plus two levels of each of two kinds; degradation shrinks dimension 0 (known answer)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (n, d)) + 3.0
    rows, photo, kind, level = [], [], [], []
    for i in range(n):
        for k in (0, 1):
            for lv in (1, 2):
                f = features[i].copy()
                f[0] -= 1.5 * lv + rng.normal(0, 0.2)
                rows.append(f)
                photo.append(i)
                kind.append(k)
                level.append(lv)
    m = len(rows)
    return TrainingData(
        names=np.array([f"p{i}.jpg" for i in range(n)]),
        features=features.astype(np.float32),
        logits=np.zeros((n, 1000), np.float32),
        measures=rng.normal(size=(n, len(ATTRIBUTES))),
        degraded_features=np.array(rows, np.float32),
        degraded_measures=rng.normal(size=(m, len(ATTRIBUTES))),
        degraded_photo=np.array(photo),
        degraded_kind=np.array(kind),
        degraded_level=np.array(level),
    )


def test_split_is_seeded_and_holds_out_the_share() -> None:
    a, b = fitting.split_photos(100, 0.2, 0), fitting.split_photos(100, 0.2, 0)
    assert np.array_equal(a, b) and (~a).sum() == 20
    assert not np.array_equal(a, fitting.split_photos(100, 0.2, 1))


def test_ranking_pairs_order_original_mild_strong() -> None:
    data = synthetic_data(n=4)
    better, worse, kinds = train.ranking_pairs(data, np.ones(4, bool))
    assert len(better) == 4 * 2 * 3  # per photo and kind: 0>1, 0>2, 1>2
    level = np.concatenate([np.zeros(4, int), data.degraded_level])
    assert np.all(level[better] < level[worse])
    photo = np.concatenate([np.arange(4), data.degraded_photo])
    assert np.array_equal(photo[better], photo[worse])
    assert set(kinds.tolist()) == {0, 1}


def test_generic_ranker_learns_the_degradation_direction() -> None:
    data = synthetic_data()
    mask = fitting.split_photos(len(data.features), 0.25, 0)
    w, _b, metrics = train.fit_generic(data, mask, c=1.0)
    assert metrics["heldout"]["pairwise_accuracy"] > 0.95
    assert np.argmax(np.abs(w)) == 0 and w[0] > 0
    levels = metrics["heldout_mean_generic_by_level"]
    assert levels["0"] > levels["1"] > levels["2"]


def test_content_clusters_recover_separated_groups() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 10
    labels = np.repeat(np.arange(4), 25)
    features = centres[labels] + rng.normal(0, 0.5, (100, 8)) + 1.0
    perturbed = features + rng.normal(0, 0.3, features.shape)
    centroids, temperature, metrics = train.fit_content(features, perturbed, np.arange(100), 4, 0)
    found = np.argmin(((l2_normalize(features)[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    for g in range(4):
        assert len(set(found[labels == g].tolist())) == 1
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    assert 0 < temperature < 10 and metrics["mean_max_probability"] > 0.9
    assert sorted(metrics["cluster_sizes"]) == [25, 25, 25, 25]


def test_percentile_targets_are_monotone_in_range() -> None:
    raw = np.array([[3.0], [1.0], [2.0], [10.0]])
    out = train.percentile_targets(raw, raw)
    assert out.min() >= -1 and out.max() <= 1
    assert list(np.argsort(out[:, 0])) == [1, 2, 0, 3]


def test_attribute_ridge_recovers_a_linear_target() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = np.tanh(x[:, :2] @ np.array([[0.5, -0.3], [0.2, 0.4]]))
    mask = fitting.split_photos(300, 0.2, 0)
    w, b, metrics = fitting.fit_attributes(x, y, mask, names=("a", "b"))
    assert w.shape == (2, 20) and b.shape == (2,)
    assert min(metrics["heldout_spearman"].values()) > 0.9


def test_embedding_is_pca_with_unit_first_component() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 80)) * np.linspace(3, 0.1, 80) + 5
    mean, proj, _metrics = train.fit_embedding(x, 16, 0)
    z = (l2_normalize(x) - mean) @ proj.T
    assert z.shape == (200, 16)
    assert z[:, 0].std(ddof=1) == pytest.approx(1.0, rel=1e-6)  # PCA variances are unbiased
    assert np.all(np.diff(z.std(axis=0)) <= 1e-9)  # variance order kept: not whitened
    with pytest.raises(ValueError, match="at least"):
        train.fit_embedding(x[:10], 16, 0)


def test_taxonomy_covers_every_class_once() -> None:
    groups = [taxonomy.coarse_group(i) for i in range(1000)]
    assert set(groups) == set(range(len(taxonomy.GROUP_NAMES)))
    assert taxonomy.GROUP_NAMES[taxonomy.coarse_group(207)] == "dogs"  # golden retriever
    assert taxonomy.GROUP_NAMES[taxonomy.coarse_group(817)] == "artefacts"  # sports car
    with pytest.raises(ValueError):
        taxonomy.coarse_group(1000)
    report = taxonomy.purity_report(np.array([0, 0, 1, 1]), np.array([151, 152, 0, 924]))
    assert report["purity"] == 0.75 and report["clusters"][0]["majority_group"] == "dogs"


def test_photo_plan_draws_distinct_kinds_at_both_levels() -> None:
    plan = photo_plan((0, 123), 3)
    assert len(plan) == 6 and len({k for k, _ in plan}) == 3
    assert plan == photo_plan((0, 123), 3) and {lv for _, lv in plan} == {1, 2}
    assert all(0 <= k < len(DEGRADATION_NAMES) for k, _ in plan)


@pytest.fixture(scope="module")
def backbone_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "piaa-onnx"
    build(out)
    return out / "backbone.onnx"


def test_training_is_deterministic_for_a_seed(backbone_onnx: Path) -> None:
    files = list_photos(SHARED_PHOTOS, SUBSET)
    config = fitting.TrainConfig(seed=3, degradations_per_photo=2, ranking_c=(0.01,))
    first = extract(files, backbone_onnx, config.seed, config.degradations_per_photo)
    second = extract(files, backbone_onnx, config.seed, config.degradations_per_photo)
    for field in first.__dataclass_fields__:
        assert np.array_equal(getattr(first, field), getattr(second, field)), field
    w1, m1 = train.train_heads(first, config)
    w2, m2 = train.train_heads(second, config)
    for field in w1.__dataclass_fields__:
        assert np.array_equal(getattr(w1, field), getattr(w2, field)), field
    assert json.dumps(m1, sort_keys=True) == json.dumps(m2, sort_keys=True)
    # The seed is really used: another seed draws other degradations (checked on the plan, which is
    # what extract() follows, instead of paying for a third extraction).
    assert any(photo_plan((3, i), 2) != photo_plan((4, i), 2) for i in range(SUBSET))
    out = heads_numpy(w1, first.features)
    assert out["embedding"].shape == (SUBSET, EMBEDDING_DIM)


def test_train_and_save_writes_weights_and_manifest(tmp_path: Path, backbone_onnx: Path) -> None:
    config = fitting.TrainConfig(seed=0, limit=SUBSET, degradations_per_photo=2, ranking_c=(0.01,))
    manifest = train.train_and_save(
        SHARED_PHOTOS, config, out=tmp_path, cache_dir=tmp_path / "cache", onnx_dir=backbone_onnx.parent
    )
    weights = HeadWeights.load(tmp_path / "heads.npz")
    assert weights.centroids.shape[0] == 10
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written == json.loads(json.dumps(manifest))
    assert written["feature_space_version"] == FEATURE_SPACE_VERSION
    assert written["trained_on"]["photos"]["count"] == SUBSET
    assert written["metrics"]["content"]["purity"]["purity"] > 0  # labels.csv was read
    assert list((tmp_path / "cache").glob("training-*.npz"))  # features cached for the next run


def test_code_version_hashes_every_module_training_runs() -> None:
    # The fingerprint helpers and the error tree shape no weights; build makes the ONNX backbone, which has
    # its own fingerprint in the build manifest (and in the feature cache key).
    not_training = {"sources", "exceptions", "build"}
    package = Path(train.__file__).parent
    reached, todo = set(), ["train"]
    while todo:
        module = todo.pop()
        reached.add(module)
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                child = name.removeprefix("piaa_export.")
                ours = child != name and "." not in child and (package / f"{child}.py").exists()
                if ours and child not in reached | not_training:
                    todo.append(child)
    assert {"datasets", "fitting"} <= reached
    assert reached == {name.removesuffix(".py") for name in train.TRAINING_CODE}
