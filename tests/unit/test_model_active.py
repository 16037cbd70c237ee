"""Active learning: suggest() picks high-variance, diverse candidates, exactly as sequential rating would."""

from __future__ import annotations

import numpy as np
import pytest

from piaa_personalization.model.active import suggest
from piaa_personalization.model.residual import Posterior, Prior, SufficientStats, posterior

ALPHA, LAM = 40.0, 2.0


def test_greedy_picks_equal_sequential_bayesian_updates() -> None:
    """Each pick is the argmax of the predictive variance after the earlier picks were rated."""
    rng = np.random.default_rng(0)
    prior = Prior(np.zeros(6), np.diag(rng.uniform(0.5, 4.0, 6)))
    stats = SufficientStats.from_data(rng.normal(size=(4, 6)), rng.normal(size=4) * 0.1)
    post = posterior(stats, prior, ALPHA, LAM)
    cands = rng.normal(size=(40, 6))
    picks, stds = suggest(post, cands, 5)
    current = stats
    for j in picks:
        p = posterior(current, prior, ALPHA, LAM)
        var = p.predictive_std(cands) ** 2
        var[[int(i) for i in picks[: list(picks).index(j)]]] = -np.inf
        assert int(np.argmax(var)) == int(j)
        current = current.add(cands[j], 0.0)  # the rating's value does not change the covariance
    np.testing.assert_allclose(stds, post.predictive_std(cands[picks]), rtol=1e-9)
    assert int(picks[0]) == int(np.argmax(post.predictive_std(cands)))


def test_duplicates_of_the_most_uncertain_image_are_not_suggested_twice() -> None:
    cov = np.diag([1.0, 0.5, 0.3, 0.01])
    post = Posterior(np.zeros(4), cov, alpha=50.0, lam=1.0)
    a, b, c = np.eye(4)[0], np.eye(4)[1], np.eye(4)[2]
    cands = np.stack([a, a * 1.001, a * 0.999, b, c, a])
    picks, _ = suggest(post, cands, 3)
    naive = np.argsort(-post.predictive_std(cands))[:3]
    assert set(naive.tolist()) <= {0, 1, 2, 5}  # plain top-k variance would take three copies of a
    directions = {int(np.argmax(np.abs(cands[i]))) for i in picks}
    assert directions == {0, 1, 2}  # greedy with updates spreads over a, b and c
    assert len(set(picks.tolist())) == 3


def test_suggest_edge_cases() -> None:
    post = Posterior(np.zeros(3), np.eye(3), alpha=10.0, lam=1.0)
    cands = np.eye(3)
    picks, stds = suggest(post, cands, 10)
    assert sorted(picks.tolist()) == [0, 1, 2] and picks.dtype == np.int64 and len(stds) == 3
    picks, stds = suggest(post, cands, 0)
    assert len(picks) == 0 and len(stds) == 0
    with pytest.raises(ValueError):
        suggest(post, cands, -1)
    with pytest.raises(ValueError):
        suggest(post, np.ones((2, 4)), 1)
