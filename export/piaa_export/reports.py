"""Reports for docs/models.md: the content clusters' contact sheet and the embedding-width study.

Both run on the originals' features (piaa_triton.imaging.preprocess + the ONNX backbone), so they need
only a photo folder and a built build/onnx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge

from piaa_export import taxonomy
from piaa_export.heads import HeadWeights, heads_numpy, l2_normalize

THUMB = 96


def nearest_members(features: np.ndarray, weights: HeadWeights, per_cluster: int) -> list[list[int]]:
    """Per cluster, its members closest to the centroid (membership as served: the nearest unit centroid)."""
    z = l2_normalize(features)
    c = weights.centroids.astype(np.float64)
    d = ((z[:, None, :] - c[None]) ** 2).sum(-1)
    assigned = d.argmin(axis=1)
    rows = []
    for k in range(len(c)):
        members = np.flatnonzero(assigned == k)
        rows.append(members[np.argsort(d[members, k])][:per_cluster].tolist())
    return rows


def contact_sheet(
    files: list[Path],
    features: np.ndarray,
    weights: HeadWeights,
    out: Path,
    *,
    per_cluster: int = 10,
    captions: list[str] | None = None,
) -> Path:
    """A PNG with one row per content cluster: its `per_cluster` photos nearest the centroid."""
    rows = nearest_members(features, weights, per_cluster)
    label_w = 190
    sheet = Image.new("RGB", (label_w + per_cluster * (THUMB + 4), len(rows) * (THUMB + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    z = l2_normalize(features)
    sizes = np.bincount(((z[:, None] - weights.centroids[None]) ** 2).sum(-1).argmin(1), minlength=len(rows))
    for k, members in enumerate(rows):
        top = k * (THUMB + 4)
        text = f"cluster {k}\n{sizes[k]} photos"
        if captions:
            text += f"\n{captions[k]}"
        draw.multiline_text((6, top + 8), text, fill="black")
        for j, i in enumerate(members):
            with Image.open(files[i]) as im:
                thumb = im.convert("RGB")
                side = min(thumb.size)
                left, upper = (thumb.width - side) // 2, (thumb.height - side) // 2
                thumb = thumb.crop((left, upper, left + side, upper + side)).resize((THUMB, THUMB))
            sheet.paste(thumb, (label_w + j * (THUMB + 4), top + 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    # An adaptive 256-colour palette keeps the committed PNG small; thumbnails survive it well.
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def simulated_ratings(imagenet_index: np.ndarray, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
    """One simulated user's ratings: a taste over coarse groups, a finer taste over blocks of 20 adjacent
    ImageNet classes (adjacent in WordNet order, e.g. breeds of one kind), plus rating noise."""
    groups = np.array([taxonomy.coarse_group(int(i)) for i in imagenet_index])
    coarse = rng.normal(0, 1, len(taxonomy.GROUP_NAMES))
    fine = rng.normal(0, 0.7, 50)
    return coarse[groups] + fine[imagenet_index // 20] + rng.normal(0, noise, len(imagenet_index))


def embedding_study(
    features: np.ndarray,
    imagenet_index: np.ndarray,
    weights: HeadWeights,
    *,
    dims: tuple[int, ...] = (0, 8, 16, 32, 64, 128),
    ratings: tuple[int, ...] = (10, 50),
    users: int = 100,
    alphas: tuple[float, ...] = (1.0, 10.0, 100.0),
    seed: int = 0,
) -> dict[str, Any]:
    """How well a simulated preference is learned from n ratings with the paper's 20 features plus the
    first d PCA components of the L2-normalized feature (d = 0: the paper's features alone).

    Each user rates n random photos; a ridge model is fitted on them and scored by Spearman correlation
    with the user's ratings on every other photo, for each ridge strength in `alphas` (the same users
    for every setting). Returns mean Spearman per alpha, n and d over `users` users.
    """
    heads = heads_numpy(weights, features)
    paper = np.concatenate([heads["attributes"], heads["content"]], axis=1)
    z = l2_normalize(features)
    pca = PCA(n_components=max(dims), svd_solver="full", random_state=seed).fit(z)
    components = pca.transform(z) / np.sqrt(pca.explained_variance_[0])
    rng = np.random.default_rng(seed)
    scores: dict[tuple[float, int, int], list[float]] = {}
    for n in ratings:
        for _ in range(users):
            y = simulated_ratings(imagenet_index, rng)
            rated = rng.permutation(len(y))[:n]
            rest = np.setdiff1d(np.arange(len(y)), rated)
            for d in dims:
                x = np.concatenate([paper, components[:, :d]], axis=1)
                for alpha in alphas:
                    model = Ridge(alpha=alpha).fit(x[rated], y[rated])
                    rho = float(stats.spearmanr(model.predict(x[rest]), y[rest]).statistic)
                    scores.setdefault((alpha, n, d), []).append(rho)
    table = {
        f"alpha={alpha:g}": {
            f"n={n}": {f"d={d}": round(float(np.mean(scores[alpha, n, d])), 4) for d in dims} for n in ratings
        }
        for alpha in alphas
    }
    return {"users": users, "mean_spearman": table}
