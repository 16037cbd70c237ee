"""The personalized model's math: closed forms, evidence, online updates, scoring, validation, taste."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import BayesianRidge, Ridge

from piaa_client.features import ATTRIBUTES, CONTENT_NAMES, PAPER_FEATURES
from piaa_personalization.model.residual import (
    PACKED_DIM,
    FeatureLayout,
    HeadOutputs,
    Hyper,
    InvalidRating,
    Prior,
    RatingScale,
    SufficientStats,
    explain,
    feature_matrix,
    fit,
    log_evidence,
    personalize,
    posterior,
    rating_to_unit,
)

PLAIN = Hyper(alpha_strength=0.0, lam_strength=0.0)  # no hyper-priors: plain MacKay, as sklearn


def random_outputs(rng: np.random.Generator, n: int) -> HeadOutputs:
    """Head outputs shaped like the real ones: generic in (0,1), attributes in [-1,1], content a simplex."""
    return HeadOutputs(
        generic=rng.beta(5, 5, n).astype(np.float32),
        attributes=rng.uniform(-1, 1, (n, len(ATTRIBUTES))).astype(np.float32),
        content=rng.dirichlet(np.full(10, 0.3), n).astype(np.float32),
        embedding=rng.normal(0, 1, (n, 64)).astype(np.float32),
    )


def linear_data(rng: np.random.Generator, n: int, dim: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, dim))
    w = rng.normal(size=dim) * 0.3
    return x, x @ w + rng.normal(size=n) * noise


# -- ratings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "scale", "unit"),
    [
        (1, RatingScale.STARS_1_5, 0.0),
        (5, RatingScale.STARS_1_5, 1.0),
        (3.5, 1, 0.625),
        (0.0, 2, 0.0),
        (0.3, 2, 0.3),
    ],
)
def test_rating_to_unit_maps_scales(value: float, scale: int, unit: float) -> None:
    assert rating_to_unit(value, scale) == pytest.approx(unit)


@pytest.mark.parametrize(
    ("value", "scale"),
    [
        (math.nan, RatingScale.STARS_1_5),
        (math.inf, RatingScale.STARS_1_5),
        (-math.inf, RatingScale.UNIT),
        (0.99, RatingScale.STARS_1_5),
        (5.01, RatingScale.STARS_1_5),
        (-0.01, RatingScale.UNIT),
        (1.01, RatingScale.UNIT),
        (3, RatingScale.UNSPECIFIED),
        (3, 7),
        ("3", RatingScale.STARS_1_5),
    ],
)
def test_rating_to_unit_rejects_invalid(value: object, scale: int) -> None:
    with pytest.raises(InvalidRating):
        rating_to_unit(value, scale)  # type: ignore[arg-type]
    assert issubclass(InvalidRating, ValueError)


# -- features ----------------------------------------------------------------------------------------------


def test_feature_matrix_order_and_layouts() -> None:
    out = random_outputs(np.random.default_rng(0), 3)
    x = feature_matrix(out)
    assert x.shape == (3, 21) and x.dtype == np.float64
    np.testing.assert_array_equal(x[:, 0], 1.0)
    np.testing.assert_allclose(x[:, 1:11], out.attributes)
    np.testing.assert_allclose(x[:, 11:21], out.content)
    xe = feature_matrix(out, with_embedding=True)
    assert xe.shape == (3, 85)
    np.testing.assert_allclose(xe[:, 21:], out.embedding)
    paper, emb = FeatureLayout(), FeatureLayout(with_embedding=True)
    assert paper.names == ("intercept", *PAPER_FEATURES) and paper.dim == 21 and emb.dim == 85
    assert paper.key == "fs1/paper20" and emb.key == "fs1/paper20+emb64"
    assert FeatureLayout.parse(emb.key) == emb and FeatureLayout.parse("fs9/paper20").fs_version == "fs9"
    with pytest.raises(ValueError):
        FeatureLayout.parse("fs1/other")


def test_head_outputs_pack_round_trip_and_validation() -> None:
    out = random_outputs(np.random.default_rng(1), 4)
    packed = out.packed()
    assert packed.shape == (4, PACKED_DIM) and packed.dtype == np.float32
    back = HeadOutputs.from_packed(packed)
    for name in ("generic", "attributes", "content", "embedding"):
        np.testing.assert_array_equal(getattr(back, name), getattr(out, name))
    np.testing.assert_array_equal(out.take([2, 0]).packed(), packed[[2, 0]])
    np.testing.assert_array_equal(HeadOutputs.concat([out.take([0]), out.take([1])]).packed(), packed[:2])
    with pytest.raises(ValueError):
        HeadOutputs(out.generic, out.attributes[:, :9], out.content, out.embedding)
    with pytest.raises(ValueError):
        HeadOutputs.from_packed(np.zeros((2, 84)))


# -- sufficient statistics and the closed form -------------------------------------------------------------


def test_rank_one_updates_equal_batch_statistics_and_fit() -> None:
    rng = np.random.default_rng(2)
    x, y = linear_data(rng, 60, 21, 0.1)
    online = SufficientStats.empty(21)
    for xi, yi in zip(x, y, strict=True):
        online = online.add(xi, yi)
    batch = SufficientStats.from_data(x, y)
    np.testing.assert_allclose(online.gram, x.T @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(online.moment, x.T @ y, rtol=1e-12, atol=1e-12)
    assert online.n == 60 and online.yy == pytest.approx(float(y @ y))
    prior = Prior.zero(21)
    a, b = fit(online, prior), fit(batch, prior)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9, atol=1e-12)
    assert a.alpha == pytest.approx(b.alpha) and a.lam == pytest.approx(b.lam)
    with pytest.raises(ValueError):
        online.add(np.full(21, np.nan), 0.0)


def test_posterior_equals_closed_form_ridge() -> None:
    rng = np.random.default_rng(3)
    x, y = linear_data(rng, 40, 8, 0.2)
    stats = SufficientStats.from_data(x, y)
    alpha, lam = 25.0, 3.0
    post = posterior(stats, Prior.zero(8), alpha, lam)
    ridge = Ridge(alpha=lam / alpha, fit_intercept=False, solver="cholesky").fit(x, y)
    np.testing.assert_allclose(post.mean, ridge.coef_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        post.cov, np.linalg.inv(lam * np.eye(8) + alpha * x.T @ x), rtol=1e-9, atol=1e-12
    )
    # With a population prior the mean is the ridge solution shrunk toward m0 under the metric P0.
    m0 = rng.normal(size=8)
    q = rng.normal(size=(8, 8))
    p0 = q @ q.T + np.eye(8)
    post = posterior(stats, Prior(m0, p0), alpha, lam)
    precision = lam * p0 + alpha * x.T @ x
    np.testing.assert_allclose(
        post.mean, np.linalg.solve(precision, lam * p0 @ m0 + alpha * x.T @ y), rtol=1e-8
    )
    np.testing.assert_allclose(post.cov, np.linalg.inv(precision), rtol=1e-8, atol=1e-12)


def test_no_ratings_gives_the_prior() -> None:
    prior = Prior(np.arange(5.0), 2 * np.eye(5), lam0=4.0, alpha0=30.0)
    post = fit(SufficientStats.empty(5), prior)
    np.testing.assert_allclose(post.mean, prior.mean)
    np.testing.assert_allclose(post.cov, np.eye(5) / 8.0)
    assert (post.alpha, post.lam, post.n) == (30.0, 4.0, 0)


# -- hyper-parameters from the evidence ----------------------------------------------------------------


def test_evidence_fit_matches_sklearn_bayesian_ridge() -> None:
    rng = np.random.default_rng(4)
    x, y = linear_data(rng, 200, 21, 0.2)
    post = fit(SufficientStats.from_data(x, y), Prior.zero(21), PLAIN)
    ref = BayesianRidge(fit_intercept=False, tol=1e-12, max_iter=2000).fit(x, y)
    assert post.alpha == pytest.approx(ref.alpha_, rel=1e-4)
    assert post.lam == pytest.approx(ref.lambda_, rel=1e-4)
    np.testing.assert_allclose(post.mean, ref.coef_, rtol=1e-5, atol=1e-8)


def test_evidence_fit_is_a_maximum_of_the_evidence() -> None:
    rng = np.random.default_rng(5)
    x, y = linear_data(rng, 80, 21, 0.3)
    stats, prior = SufficientStats.from_data(x, y), Prior.zero(21)
    post = fit(stats, prior, PLAIN)
    best = log_evidence(stats, prior, post.alpha, post.lam)
    assert best == pytest.approx(post.log_evidence)
    for da, dl in [(1.2, 1), (0.8, 1), (1, 1.2), (1, 0.8), (1.1, 1.1), (0.9, 0.9)]:
        assert log_evidence(stats, prior, post.alpha * da, post.lam * dl) < best


def test_evidence_recovers_true_noise_and_prior_scale() -> None:
    rng = np.random.default_rng(6)
    dim, lam_true, alpha_true = 21, 25.0, 100.0  # weight std 0.2, noise std 0.1
    w = rng.normal(size=dim) / math.sqrt(lam_true)
    x = rng.normal(size=(3000, dim))
    y = x @ w + rng.normal(size=3000) / math.sqrt(alpha_true)
    post = fit(SufficientStats.from_data(x, y), Prior.zero(dim))
    assert post.alpha == pytest.approx(alpha_true, rel=0.1)
    assert lam_true / 2.5 < post.lam < lam_true * 2.5  # D = 21 draws of w: a ~30 % standard error


def test_evidence_lambda_predicts_about_as_well_as_the_best_lambda_in_hindsight() -> None:
    rng = np.random.default_rng(7)
    dim = 21
    errors, chosen = [], []
    for _ in range(20):
        w = rng.normal(size=dim) * 0.15
        x, xt = rng.normal(size=(25, dim)), rng.normal(size=(500, dim))
        y = x @ w + rng.normal(size=25) * 0.2
        stats = SufficientStats.from_data(x, y)
        post = fit(stats, Prior.zero(dim))
        grid = [posterior(stats, Prior.zero(dim), post.alpha, lam) for lam in np.logspace(-3, 4, 50)]
        errors.append([float(np.mean((xt @ (p.mean - w)) ** 2)) for p in grid])
        chosen.append(float(np.mean((xt @ (post.mean - w)) ** 2)))
    # Oracle: the single lam that is best on average over these users, chosen on the test sets.
    oracle = float(np.min(np.mean(errors, axis=0)))
    assert float(np.mean(chosen)) < 1.25 * oracle
    ends = np.mean(errors, axis=0)[[0, -1]]  # almost no shrinkage (OLS), and all weights at zero
    assert float(np.mean(chosen)) < 0.7 * float(np.min(ends))


# -- scoring -----------------------------------------------------------------------------------------------


def test_personalize_is_per_row_and_clipped() -> None:
    rng = np.random.default_rng(8)
    generic = rng.uniform(0, 1, 50)
    x = rng.normal(size=(50, 21))
    w = rng.normal(size=(50, 21)) * 2.0  # large weights push raw scores far outside [0, 1]
    w[:5] = 0.0  # no profile: the generic score
    scores = personalize(generic, x, w)
    assert scores.dtype == np.float32 and scores.shape == (50,)
    raw = generic + np.sum(x * w, axis=1)
    np.testing.assert_allclose(scores, np.clip(raw, 0, 1), rtol=1e-6, atol=1e-7)
    assert np.all((scores >= 0) & (scores <= 1)) and np.any(raw > 1) and np.any(raw < 0)
    np.testing.assert_allclose(scores[:5], generic[:5], rtol=1e-6)
    # One image for many users (ScoreForUsers): features broadcast over the users' weights.
    one = personalize(np.full(50, generic[0]), x[0], w)
    np.testing.assert_allclose(one, np.clip(generic[0] + w @ x[0], 0, 1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        personalize(generic, x, w[:, :20])


def test_posterior_predictions_stay_on_the_scale_and_stds_are_positive() -> None:
    rng = np.random.default_rng(9)
    x, y = linear_data(rng, 30, 21, 0.2)
    post = fit(SufficientStats.from_data(x, y * 10), Prior.zero(21))
    xt = rng.normal(size=(100, 21))
    scores = post.score(rng.uniform(0, 1, 100), xt)
    assert np.all((scores >= 0) & (scores <= 1))
    std = post.predictive_std(xt)
    assert np.all(std > math.sqrt(1 / post.alpha) - 1e-12)
    np.testing.assert_allclose(std**2, np.einsum("nd,de,ne->n", xt, post.cov, xt) + 1 / post.alpha, rtol=1e-9)


# -- the population prior ----------------------------------------------------------------------------------


def test_prior_from_users_recovers_the_population() -> None:
    rng = np.random.default_rng(10)
    mean = rng.normal(size=5) * 0.2
    q = rng.normal(size=(5, 5)) * 0.1
    cov = q @ q.T + 0.01 * np.eye(5)
    prior = Prior.from_users(rng.multivariate_normal(mean, cov, 4000))
    np.testing.assert_allclose(prior.mean, mean, atol=0.01)
    np.testing.assert_allclose(np.linalg.inv(prior.precision), cov, atol=0.01)
    assert prior.lam0 == 1.0 and prior.n_users == 4000
    few = Prior.from_users(rng.normal(size=(1, 5)))
    np.testing.assert_array_equal(few.mean, np.zeros(5))
    np.testing.assert_array_equal(few.precision, np.eye(5))


# -- taste in words ----------------------------------------------------------------------------------------


def test_explain_names_likes_and_dislikes_relative_to_the_population() -> None:
    layout = FeatureLayout()
    prior = Prior(np.full(21, 0.05), np.eye(21))
    mean = prior.mean.copy()
    mean[0] = 0.9  # intercept: rates everything higher, not a taste
    mean[layout.names.index("VividColor")] = 0.45
    mean[layout.names.index("DoF")] = 0.25
    mean[layout.names.index(CONTENT_NAMES[3])] = -0.35
    mean[layout.names.index("Symmetry")] = 0.07  # within the posterior's uncertainty: not reported
    post = posterior(SufficientStats.empty(21), prior, 30.0, 1.0)
    post = type(post)(mean, np.eye(21) * 0.01, 30.0, 1.0, 10)
    likes, dislikes = explain(post, prior, layout.names)
    assert [name for name, _ in likes] == ["VividColor", "DoF"]
    assert likes[0][1] == pytest.approx(0.40)
    assert dislikes == [(CONTENT_NAMES[3], pytest.approx(-0.40))]
    assert all(name != "intercept" for name, _ in likes + dislikes)
    everything, _ = explain(post, prior, layout.names, min_z=0.0, top=3)
    assert [name for name, _ in everything] == ["VividColor", "DoF", "Symmetry"]
