"""Active learning: which images a user should rate next to teach their model most (pure numpy)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from piaa_personalization.model.residual import Posterior


def suggest(post: Posterior, candidates: ArrayLike, k: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The k candidates whose ratings would teach the model most, most informative first.

    Greedy maximum predictive variance: after each pick the covariance is updated as if that image had
    been rated (cov - alpha cov x x' cov / (1 + alpha x' cov x), exact for Bayesian linear regression and
    independent of the unknown rating), so near-duplicates of a pick lose their appeal and the picks
    spread over what the model does not know yet. Never returns an index twice.

    candidates: features [M, D] in the posterior's layout. Returns (indices [min(k, M)] int64, stds
    [min(k, M)]): each pick's predictive standard deviation under the current posterior, before any of
    the suggested images is rated. Raises ValueError on a negative k or mismatched D.
    """
    x = np.asarray(candidates, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != post.dim:
        raise ValueError(f"candidates must be [M, {post.dim}], got {x.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, x.shape[0])
    xc = x @ post.cov  # [M, D]
    var0 = np.maximum(np.einsum("md,md->m", xc, x), 0.0)
    var = var0.copy()
    picked: list[int] = []
    for _ in range(k):
        masked = var.copy()
        masked[picked] = -np.inf
        j = int(np.argmax(masked))
        picked.append(j)
        u = xc[j]  # cov x_j
        s = var[j]
        # Rank-one downdate of every candidate's variance: (x_i' cov x_j)^2 alpha / (1 + alpha s).
        cross = x @ u
        var = np.maximum(var - post.alpha * cross**2 / (1.0 + post.alpha * s), 0.0)
        xc = xc - np.outer(cross, u) * (post.alpha / (1.0 + post.alpha * s))
    idx = np.asarray(picked, dtype=np.int64)
    return idx, np.sqrt(var0[idx] + 1.0 / post.alpha)
