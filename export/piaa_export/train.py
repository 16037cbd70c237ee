"""Fitting the default heads on cached features: content (k-means), generic (RankIQA), attributes, embedding.

Each fit is a function of arrays → (weights, metrics); the attribute fit, the split and TrainConfig live in
fitting.py (datasets.py uses them too). train_heads() composes the fits and train_and_save() writes
weights/heads.npz and weights/manifest.json. Deterministic for a seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from piaa_client.features import ATTRIBUTES, EMBEDDING_DIM, FEATURE_SPACE_VERSION, NUM_CONTENT_CLUSTERS
from piaa_export.datasets import refit_on_datasets
from piaa_export.extract import DEGRADATION_NAMES, TrainingData, data_fingerprint, extract, list_photos
from piaa_export.fitting import TrainConfig, fit_attributes, split_photos, standardizer
from piaa_export.heads import HeadWeights, l2_normalize
from piaa_export.sources import HEADS_FILE, MANIFEST_FILE, PACKAGE_DIR, files_sha256

TRAINING_CODE = (
    "train.py",
    "fitting.py",
    "datasets.py",
    "extract.py",
    "runtime.py",
    "degradations.py",
    "measures.py",
    "heads.py",
    "taxonomy.py",
)
"""The modules whose code shapes the trained heads; their sha256 is the manifest's code_version."""


# ----------------------------------------------------------------------------------------------- content
def fit_content(
    features: np.ndarray, perturbed: np.ndarray, perturbed_of: np.ndarray, k: int, seed: int
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """k-means (K=k) on L2-normalized features; temperature by maximum likelihood of perturbations.

    The temperature T of softmax(-‖z - c‖²/T) is the one under which a photo's soft assignment best
    predicts the cluster of its mildly degraded versions (`perturbed`, rows of photo `perturbed_of`):
    finite, data-driven, and it keeps the vector far from uniform when clusters are stable.
    Returns (unit centroids [k, D], T, metrics).
    """
    z = l2_normalize(features)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
    centroids = l2_normalize(km.cluster_centers_)
    d_orig = ((z[:, None, :] - centroids[None]) ** 2).sum(-1)
    zp = l2_normalize(perturbed)
    target = np.argmin(((zp[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    logits_base = d_orig[perturbed_of]

    def nll(log_t: float) -> float:
        logit = -logits_base / np.exp(log_t)
        logit -= logit.max(axis=1, keepdims=True)
        logp = logit - np.log(np.exp(logit).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(target)), target].mean())

    best = optimize.minimize_scalar(nll, bounds=(np.log(1e-4), np.log(10.0)), method="bounded")
    temperature = float(np.exp(best.x))
    p = np.exp(-(d_orig - d_orig.min(axis=1, keepdims=True)) / temperature)
    p /= p.sum(axis=1, keepdims=True)
    sizes = np.bincount(np.argmin(d_orig, axis=1), minlength=k)  # as served: nearest unit centroid
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1) / np.log(k)
    metrics = {
        "k": k,
        "temperature": temperature,
        "perturbation_nll": best.fun,
        "perturbation_agreement": float(np.mean(np.argmin(logits_base, axis=1) == target)),
        "cluster_sizes": sizes.tolist(),
        "size_entropy": float(stats.entropy(sizes / sizes.sum()) / np.log(k)),
        "mean_max_probability": float(p.max(axis=1).mean()),
        "mean_normalized_entropy": float(entropy.mean()),
    }
    return centroids, temperature, metrics


# ----------------------------------------------------------------------------------------------- generic
def ranking_pairs(data: TrainingData, photos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(better, worse, kind) rows for the given photo mask: original > mild > strong, per degradation kind.

    better/worse index a stacked array [originals; degraded] (degraded rows start at N).
    """
    n = len(data.features)
    better, worse, kinds = [], [], []
    by_key: dict[tuple[int, int], dict[int, int]] = {}
    for row, (photo, kind, level) in enumerate(
        zip(data.degraded_photo, data.degraded_kind, data.degraded_level, strict=True)
    ):
        if photos[photo]:
            by_key.setdefault((int(photo), int(kind)), {0: int(photo)})[int(level)] = n + row
    for (_, kind), levels in sorted(by_key.items()):
        ordered = [levels[level] for level in sorted(levels)]
        for a in range(len(ordered)):
            for b in range(a + 1, len(ordered)):
                better.append(ordered[a])
                worse.append(ordered[b])
                kinds.append(kind)
    return np.array(better, dtype=int), np.array(worse, dtype=int), np.array(kinds, dtype=int)


def fit_generic(data: TrainingData, train: np.ndarray, c: float) -> tuple[np.ndarray, float, dict[str, Any]]:
    """RankIQA-style linear ranker: logistic loss on feature differences of (less, more) degraded pairs.

    The score is then squashed to [0, 1] by a sigmoid centred on the training images' mean score with
    their std as scale. Returns (w [D], b, metrics with held-out pairwise accuracy overall and per kind).
    """
    stacked = np.concatenate([data.features, data.degraded_features]).astype(np.float64)
    b_tr, w_tr, _ = ranking_pairs(data, train)
    train_rows = np.unique(np.concatenate([b_tr, w_tr]))
    _, std = standardizer(stacked[train_rows])
    diff = (stacked[b_tr] - stacked[w_tr]) / std
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=5000, tol=1e-6).fit(x, y)
    w = model.coef_[0] / std
    scores = stacked @ w
    centre, scale = float(scores[train_rows].mean()), float(scores[train_rows].std() + 1e-12)
    w_final, b_final = w / scale, -centre / scale

    def accuracy(mask: np.ndarray) -> dict[str, Any]:
        better, worse, kinds = ranking_pairs(data, mask)
        hit = scores[better] > scores[worse]
        per_kind = {DEGRADATION_NAMES[k]: round(float(hit[kinds == k].mean()), 4) for k in np.unique(kinds)}
        return {"pairs": len(hit), "pairwise_accuracy": float(hit.mean()), "per_kind": per_kind}

    held = ~train
    generic = 1 / (1 + np.exp(-(stacked @ w_final + b_final)))
    levels = np.concatenate([np.zeros(len(data.features), int), data.degraded_level])
    photo_of = np.concatenate([np.arange(len(data.features)), data.degraded_photo])
    metrics = {
        "train": accuracy(train),
        "heldout": accuracy(held) if held.any() else None,
        "heldout_mean_generic_by_level": {
            str(level): float(generic[(levels == level) & held[photo_of]].mean())
            for level in np.unique(levels)
            if held.any()
        },
        "c": c,
    }
    return w_final, b_final, metrics


def choose_ranking_c(data: TrainingData, train: np.ndarray, config: TrainConfig) -> float:
    """The ranker's C with the best pairwise accuracy on an inner split of the training photos."""
    if len(config.ranking_c) == 1:
        return config.ranking_c[0]
    inner = train.copy()
    inner_held = split_photos(int(train.sum()), config.holdout, config.seed + 1)
    inner[np.flatnonzero(train)[~inner_held]] = False
    scores = {}
    better, worse, _ = ranking_pairs(data, train & ~inner)
    stacked = np.concatenate([data.features, data.degraded_features]).astype(np.float64)
    for c in config.ranking_c:
        w, _, _ = fit_generic(data, inner, c)
        scores[c] = float(np.mean(stacked[better] @ w > stacked[worse] @ w))
    return max(scores, key=lambda c: (scores[c], -c))


# -------------------------------------------------------------------------------------------- attributes
def percentile_targets(raw: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each column mapped through the reference rows' empirical CDF onto AADB's [-1, 1] scale."""
    out = np.empty_like(raw, dtype=np.float64)
    for j in range(raw.shape[1]):
        ref = np.sort(reference[:, j])
        ranks = np.searchsorted(ref, raw[:, j], side="left") + np.searchsorted(ref, raw[:, j], side="right")
        out[:, j] = ranks / (2.0 * len(ref)) * 2.0 - 1.0
    return out


# --------------------------------------------------------------------------------------------- embedding
def fit_embedding(features: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """PCA of L2-normalized features to `dim`, scaled so the first component has unit std (not whitened:
    the variance order is kept, so a ridge prior on the personalization side favours dominant directions).
    Returns (mean [D], projection [dim, D], metrics)."""
    z = l2_normalize(features)
    if len(z) < dim:
        raise ValueError(f"the embedding needs at least {dim} images, got {len(z)}")
    pca = PCA(n_components=dim, svd_solver="full", random_state=seed).fit(z)
    scale = 1.0 / float(np.sqrt(pca.explained_variance_[0]))
    metrics = {
        "dim": dim,
        "explained_variance_ratio": float(pca.explained_variance_ratio_.sum()),
        "scale": scale,
    }
    return pca.mean_, pca.components_ * scale, metrics


# ------------------------------------------------------------------------------------------------ heads
def train_heads(
    data: TrainingData,
    config: TrainConfig,
    imagenet_index: np.ndarray | None = None,
    class_names: Mapping[int, str] | None = None,
) -> tuple[HeadWeights, dict[str, Any]]:
    """Fits all four heads on cached training data. Returns the weights and every metric; the content
    clusters' names (from the backbone classifier's view of each cluster's photos) are metrics
    ["content"]["names"].

    imagenet_index: the photos' ImageNet classes (labels.csv), used only to report cluster purity.
    class_names: ImageNet index → class name (labels.csv), quoted in the names of look-alike clusters.
    """
    from piaa_export import taxonomy

    n = len(data.features)
    train = split_photos(n, config.holdout, config.seed)
    mild = data.degraded_level == 1
    centroids, temperature, content = fit_content(
        data.features,
        data.degraded_features[mild],
        data.degraded_photo[mild],
        NUM_CONTENT_CLUSTERS,
        config.seed,
    )
    z = l2_normalize(data.features)
    labels = np.argmin(((z[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    content["names"] = list(
        taxonomy.cluster_names(labels, data.logits, class_names or {}, NUM_CONTENT_CLUSTERS)
    )
    if imagenet_index is not None:
        content["purity"] = taxonomy.purity_report(labels, imagenet_index)
    generic_w, generic_b, generic = fit_generic(data, train, choose_ranking_c(data, train, config))
    # Targets are percentiles among the training originals; the degraded versions are scored on the same
    # scale, so "with degraded" metrics say how well the head follows edits of exposure, colour, blur.
    all_features = np.concatenate([data.features, data.degraded_features])
    all_measures = np.concatenate([data.measures, data.degraded_measures])
    all_train = np.concatenate([train, train[data.degraded_photo]])
    targets = percentile_targets(all_measures, data.measures[train])
    originals = np.arange(len(all_features)) < n
    fit_rows = all_train if config.attributes_on_degraded else all_train & originals
    held = ~all_train
    usable = fit_rows | held  # rows outside both (training photos' degraded versions) stay out entirely
    attr_w, attr_b, attributes = fit_attributes(
        all_features[usable], targets[usable], fit_rows[usable], evaluate=originals[usable]
    )
    pred = np.clip(all_features @ attr_w.T + attr_b, -1.0, 1.0)
    attributes["heldout_spearman_with_degraded"] = {
        name: round(float(stats.spearmanr(pred[held, j], targets[held, j]).statistic), 4)
        for j, name in enumerate(ATTRIBUTES)
    }
    attributes["fitted_on"] = "originals + degraded" if config.attributes_on_degraded else "originals"
    everything = np.concatenate([data.features, data.degraded_features])
    emb_mean, emb_proj, embedding = fit_embedding(everything, EMBEDDING_DIM, config.seed)
    weights = HeadWeights(
        generic_w=generic_w.astype(np.float32),
        generic_b=np.float32(generic_b),  # type: ignore[arg-type]
        attributes_w=attr_w.astype(np.float32),
        attributes_b=attr_b.astype(np.float32),
        centroids=centroids.astype(np.float32),
        temperature=np.float32(temperature),  # type: ignore[arg-type]
        embedding_mean=emb_mean.astype(np.float32),
        embedding_proj=emb_proj.astype(np.float32),
    )
    weights = HeadWeights(**{k: np.asarray(v, dtype=np.float32) for k, v in weights.__dict__.items()})
    metrics = {
        "photos": n,
        "train_photos": int(train.sum()),
        "heldout_photos": int((~train).sum()),
        "degraded_images": len(data.degraded_features),
        "content": content,
        "generic": generic,
        "attributes": attributes,
        "embedding": embedding,
    }
    return weights.validate(), metrics


def _class_names(folder: Path) -> dict[int, str]:
    """ImageNet index → class name from folder/labels.csv's class_name column (empty when absent)."""
    import csv

    labels = folder / "labels.csv"
    if not labels.exists():
        return {}
    with labels.open(newline="") as f:
        return {int(r["imagenet_index"]): r["class_name"] for r in csv.DictReader(f) if r.get("class_name")}


def _imagenet_labels(folder: Path, files: list[Path]) -> np.ndarray | None:
    """The photos' ImageNet indices from folder/labels.csv when it lists every photo, else None."""
    import csv

    labels = folder / "labels.csv"
    if not labels.exists():
        return None
    with labels.open(newline="") as f:
        index = {r["file"]: int(r["imagenet_index"]) for r in csv.DictReader(f) if "imagenet_index" in r}
    if not all(p.name in index for p in files):
        return None
    return np.array([index[p.name] for p in files])


def code_version() -> str:
    """sha256 over the training code (plus the git commit when available is recorded separately)."""
    return files_sha256([PACKAGE_DIR / name for name in TRAINING_CODE])


def train_and_save(
    photos: Path,
    config: TrainConfig,
    out: Path | None = None,
    *,
    cache_dir: Path = Path("build/cache"),
    progress: bool = False,
    onnx_dir: Path | None = None,
) -> dict[str, Any]:
    """Extracts features (cached), fits the heads, writes heads.npz + manifest.json into `out`.

    Returns the manifest. With AADB / FLICKR-AES given, their labels replace the generated targets.
    onnx_dir: where the ONNX backbone is built (or found up to date); default build/onnx.
    """
    from piaa_export.build import BACKBONE_ONNX, DEFAULT_OUT, build

    started = time.monotonic()
    onnx_dir = onnx_dir or DEFAULT_OUT
    build(onnx_dir)  # the ONNX backbone the features come from (the heads part is not used here)
    files = list_photos(photos, config.limit)
    data = extract(
        files,
        onnx_dir / BACKBONE_ONNX,
        config.seed,
        config.degradations_per_photo,
        cache_dir=cache_dir,
        progress=progress,
    )
    weights, metrics = train_heads(data, config, _imagenet_labels(photos, files), _class_names(photos))
    sources: dict[str, Any] = {"photos": {"count": len(files), "sha256": data_fingerprint(files)}}
    if config.aadb is not None or config.flickr_aes is not None:
        weights, dataset_metrics, dataset_sources = refit_on_datasets(
            weights, config, onnx_dir / BACKBONE_ONNX, cache_dir, progress
        )
        metrics["datasets"] = dataset_metrics
        sources.update(dataset_sources)
    out = out or HEADS_FILE.parent
    weights.save(out / HEADS_FILE.name)
    manifest = {
        "feature_space_version": FEATURE_SPACE_VERSION,
        "content_names": metrics["content"]["names"],
        "provisional": False,
        "trained_on": sources,
        "seed": config.seed,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "code_version": code_version(),
        "libraries": {name: version(name) for name in ("numpy", "scikit-learn", "scipy", "onnxruntime")},
        "metrics": metrics,
        "training_seconds": round(time.monotonic() - started, 1),
    }
    (out / MANIFEST_FILE.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
