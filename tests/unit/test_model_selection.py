"""The residual model weighed against the generic one by evidence: no taste keeps the generic ranking."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from piaa_client.features import ATTRIBUTES
from piaa_personalization.model.residual import (
    FeatureLayout,
    HeadOutputs,
    Hyper,
    Posterior,
    Prior,
    SufficientStats,
    explain,
    feature_matrix,
    fit,
)

ALONE = Hyper(compare_generic=False)


def outputs(rng: np.random.Generator, n: int) -> HeadOutputs:
    return HeadOutputs(
        generic=rng.beta(5, 5, n).astype(np.float32),
        attributes=rng.uniform(-1, 1, (n, len(ATTRIBUTES))).astype(np.float32),
        content=rng.dirichlet(np.full(10, 0.3), n).astype(np.float32),
        embedding=rng.normal(0, 1, (n, 64)).astype(np.float32),
    )


def crowd_rater(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Residual targets of a rater who is the crowd's score plus an offset and noise: no taste."""
    return 0.05 + rng.normal(0.0, 0.12, len(x))


def taste_rater(rng: np.random.Generator, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x @ w + rng.normal(0.0, 0.05, len(x))


def population_prior(rng: np.random.Generator, dim: int) -> Prior:
    """A learned-looking prior whose mean is a population taste (what a crowd rater does not share)."""
    weights = rng.normal(0.0, 0.1, (40, dim)) + rng.normal(0.0, 0.1, dim)
    return Prior.from_users(weights)


@pytest.mark.parametrize("k", [10, 100])
def test_a_rater_without_taste_keeps_the_generic_ranking(k: int) -> None:
    rng = np.random.default_rng(k)
    x = feature_matrix(outputs(rng, 400))
    prior = population_prior(rng, x.shape[1])
    worst = []
    for seed in range(20):
        r = np.random.default_rng([k, seed])
        pick = r.permutation(len(x))[:k]
        stats = SufficientStats.from_data(x[pick], crowd_rater(r, x[pick]))
        alone, averaged = fit(stats, prior, ALONE), fit(stats, prior)
        assert alone.p_residual == 1.0 and 0.0 <= averaged.p_residual <= 1.0
        # the residual's spread over the photos (the intercept only shifts every score)
        worst.append((np.std(x[:, 1:] @ averaged.mean[1:]), np.std(x[:, 1:] @ alone.mean[1:])))
    averaged_spread, alone_spread = np.median(np.array(worst), axis=0)
    assert averaged_spread < 0.3 * alone_spread


def test_a_rater_with_a_taste_keeps_the_fitted_residual() -> None:
    rng = np.random.default_rng(3)
    x = feature_matrix(outputs(rng, 300))
    w = rng.normal(0.0, 0.15, x.shape[1])
    stats = SufficientStats.from_data(x, taste_rater(rng, x, w))
    prior = Prior.zero(x.shape[1])
    averaged, alone = fit(stats, prior), fit(stats, prior, ALONE)
    assert averaged.p_residual > 0.999
    np.testing.assert_allclose(averaged.mean, alone.mean, atol=1e-6)
    rho = sps.spearmanr(x @ averaged.mean, x @ w).statistic
    assert rho > 0.95


def test_the_averaged_posterior_is_a_proper_mixture() -> None:
    rng = np.random.default_rng(5)
    x = feature_matrix(outputs(rng, 12))
    stats = SufficientStats.from_data(x, taste_rater(rng, x, rng.normal(0, 0.05, x.shape[1])))
    prior = population_prior(rng, x.shape[1])
    post, alone = fit(stats, prior), fit(stats, prior, ALONE)
    assert 0.0 < post.p_residual < 1.0
    assert np.allclose(post.cov, post.cov.T) and np.all(np.linalg.eigvalsh(post.cov) > -1e-12)
    # off the intercept, the mean is the residual model's shrunk by p_residual
    np.testing.assert_allclose(post.mean[1:], post.p_residual * alone.mean[1:], rtol=1e-9, atol=1e-12)
    # the evidence of the average: p(y) = (p(y | residual) + p(y | generic)) / 2 at even prior odds
    generic = alone.log_evidence - np.log(post.p_residual / (1 - post.p_residual))
    assert post.log_evidence == pytest.approx(np.logaddexp(alone.log_evidence, generic) - np.log(2))
    even = fit(stats, prior, Hyper(residual_log_odds=0.0))
    favoured = fit(stats, prior, Hyper(residual_log_odds=3.0))
    assert favoured.p_residual > even.p_residual


def test_without_an_intercept_column_nothing_is_averaged() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 5))  # column 0 is not the intercept: the generic model is not defined
    stats = SufficientStats.from_data(x, rng.normal(size=30))
    post = fit(stats, Prior.zero(5))
    assert post.p_residual == 1.0
    np.testing.assert_allclose(post.mean, fit(stats, Prior.zero(5), ALONE).mean)


def test_a_rater_without_taste_has_no_likes_or_dislikes() -> None:
    rng = np.random.default_rng(11)
    layout = FeatureLayout()
    x = feature_matrix(outputs(rng, 400))
    prior = population_prior(rng, layout.dim)
    stats = SufficientStats.from_data(x[:200], crowd_rater(rng, x[:200]))
    post = fit(stats, prior)
    assert post.p_residual < 0.05
    assert explain(post, prior, layout.names) == ([], [])
    # the residual model alone pulls the weights off the population's: "dislikes" the user never showed
    _, dislikes = explain(fit(stats, prior, ALONE), prior, layout.names)
    assert dislikes


def test_a_taste_shows_once_the_evidence_favours_it_even_while_the_average_hedges() -> None:
    """The model average's spread between "a taste" and "none" is doubt about whether there is one: at
    p_residual = 0.7 the residual model's clear VividColor weight is still the user's like."""
    layout = FeatureLayout()
    prior = Prior(np.zeros(layout.dim), np.eye(layout.dim))
    vivid = layout.names.index("VividColor")
    residual_mean = np.zeros(layout.dim)
    residual_mean[vivid] = 0.4
    residual_cov = np.eye(layout.dim) * 0.01
    p = 0.7
    mean = p * residual_mean
    d1, d0 = residual_mean - mean, -mean
    cov = p * (residual_cov + np.outer(d1, d1)) + (1 - p) * np.outer(d0, d0)
    averaged = Posterior(mean, cov, 30.0, 1.0, 40, 0.0, p)
    likes, dislikes = explain(averaged, prior, layout.names)
    assert likes == [("VividColor", pytest.approx(0.4))] and dislikes == []
    hedged = Posterior(mean, cov, 30.0, 1.0, 40, 0.0, 0.4)  # the evidence favours no taste
    assert explain(hedged, prior, layout.names) == ([], [])
