"""Refits from format-2 ratings (quantized head outputs) against refits from the exact outputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from piaa_personalization.model.residual import FeatureLayout, HeadOutputs, Prior, SufficientStats, fit
from piaa_personalization.store import format as fmt

MAX_SCORE_DIFF = {False: 0.01, True: 0.02}
"""Largest personalized-score difference (unit scale; 0.04 and 0.08 star) allowed between the two refits,
by layout: the 85 weights of the embedding layout are less pinned down by 10 ratings than the 21."""
MAX_SPEARMAN_LOSS = 0.005
"""Largest drop of the mean Spearman with the held-out truth allowed for the quantized refits."""


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Packed head outputs [n, 85] in the real heads' ranges (generic in (0.15, 0.95), attributes in
    [-1, 1], peaked content probabilities, embedding components of std ~0.6, as on the 800 shared photos)."""
    return np.concatenate(
        [
            rng.uniform(0.15, 0.95, (n, 1)),
            np.tanh(rng.normal(0, 0.8, (n, 10))),
            rng.dirichlet(np.full(10, 0.3), n),
            rng.normal(0, 0.6, (n, 64)),
        ],
        axis=1,
    ).astype(np.float32)


@pytest.mark.parametrize("with_embedding", [False, True])
def test_refit_from_quantized_ratings_matches_the_exact_refit(with_embedding: bool) -> None:
    layout = FeatureLayout(with_embedding)
    rng = np.random.default_rng(7)
    pool, held = images(rng, 400), images(rng, 200)
    quantized_pool = np.stack([fmt.quantized(row) for row in pool])
    x_held = layout.features(HeadOutputs.from_packed(held))
    prior = Prior.zero(layout.dim)
    worst, rho_exact, rho_quant = 0.0, [], []
    for _ in range(40):
        taste = rng.normal(0, 0.15, layout.dim)
        truth = np.clip(held[:, 0] + x_held @ taste, 0, 1)
        for count in (10, 50, 100):
            idx = rng.choice(len(pool), count, replace=False)
            x = layout.features(HeadOutputs.from_packed(pool[idx]))
            stars = np.clip(np.rint(1 + 4 * (pool[idx, 0] + x @ taste + rng.normal(0, 0.1, count))), 1, 5)
            unit = (stars - 1) / 4
            exact = fit(SufficientStats.from_data(x, unit - pool[idx, 0]), prior)
            xq = layout.features(HeadOutputs.from_packed(quantized_pool[idx]))
            # What the store folds: the decoded outputs, and statistics through their float32 field.
            stats_q = SufficientStats.from_data(xq, unit - quantized_pool[idx, 0])
            stats_q = fmt.decode_stats2(layout.dim, fmt.encode_stats(stats_q))
            quant = fit(stats_q, prior)
            s_exact, s_quant = exact.score(held[:, 0], x_held), quant.score(held[:, 0], x_held)
            worst = max(worst, float(np.abs(s_exact - s_quant).max()))
            rho_exact.append(spearmanr(truth, s_exact).statistic)
            rho_quant.append(spearmanr(truth, s_quant).statistic)
    loss = float(np.mean(rho_exact) - np.mean(rho_quant))
    print(
        f"\n{layout.key}: 40 users x (10, 50, 100) ratings; largest score difference {worst:.4f}; "
        f"mean Spearman with the truth exact {np.mean(rho_exact):.4f}, quantized {np.mean(rho_quant):.4f}"
    )
    assert worst <= MAX_SCORE_DIFF[with_embedding]
    assert loss <= MAX_SPEARMAN_LOSS
