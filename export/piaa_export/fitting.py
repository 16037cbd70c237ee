"""The training configuration and the pure fits both train.py and datasets.py use (arrays in, arrays out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.linear_model import RidgeCV

from piaa_client.features import ATTRIBUTES


@dataclass(frozen=True)
class TrainConfig:
    """How the default heads are fitted."""

    seed: int = 0
    """Seeds the degradation draws, the held-out split and k-means."""
    limit: int | None = None
    """Use only the first `limit` photos (tests)."""
    holdout: float = 0.2
    """Share of photos held out for the generic and attribute metrics (the weights never see them)."""
    degradations_per_photo: int = 3
    """Degradation kinds per photo, each at both levels (RankIQA pairs)."""
    ranking_c: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01)
    """Inverse L2 strengths tried for the pairwise ranker; chosen on an inner split of the training photos."""
    attributes_on_degraded: bool = False
    """Fit the attribute head on the degraded versions too. Off by default: on held-out originals it scored
    lower for 8 of 10 attributes (docs/models.md), though it follows exposure and saturation edits better."""
    aadb: Path | None = None
    """AADB folder: when given, the attribute head is fitted on its labels instead of pixel measures."""
    flickr_aes: Path | None = None
    """FLICKR-AES folder: when given, the generic head is fitted on its mean ratings instead."""


def split_photos(n: int, holdout: float, seed: int) -> np.ndarray:
    """Boolean mask of training photos; the rest (≈ holdout share, at least one) are held out."""
    rng = np.random.default_rng([seed, 1])
    held = rng.permutation(n)[: max(1, round(n * holdout))] if n > 1 else np.array([], dtype=int)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return mask


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per column of x; a constant column gets std 1 so dividing by it is safe."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-8, std, 1.0)


def fit_attributes(
    features: np.ndarray,
    targets: np.ndarray,
    train: np.ndarray,
    names: tuple[str, ...] = ATTRIBUTES,
    evaluate: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Ridge regression (alpha per target by leave-one-out) from features to targets in [-1, 1].

    Returns (W [A, D], b [A], metrics: Spearman of the clipped prediction vs the target on the held-out
    rows, restricted to the `evaluate` mask when given).
    """
    x = features.astype(np.float64)
    mean, std = standardizer(x[train])
    xs = (x - mean) / std
    model = RidgeCV(alphas=np.logspace(0, 5, 11), alpha_per_target=True).fit(xs[train], targets[train])
    w = np.atleast_2d(model.coef_) / std  # fold the standardization into the weights
    b = np.atleast_1d(model.intercept_) - w @ mean
    pred = np.clip(x @ w.T + b, -1.0, 1.0)
    held = ~train if evaluate is None else ~train & evaluate
    spearman = {}
    for j, name in enumerate(names):
        if held.sum() > 2:
            rho = stats.spearmanr(pred[held, j], targets[held, j]).statistic
            spearman[name] = round(float(rho), 4)
    alphas = np.atleast_1d(model.alpha_)
    return w, b, {"alpha": dict(zip(names, map(float, alphas), strict=False)), "heldout_spearman": spearman}
