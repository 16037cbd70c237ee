"""Simulated users with known linear tastes: the model learns them from 10 and 100 star ratings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import spearmanr

from piaa_personalization.model.active import suggest
from piaa_personalization.model.residual import (
    FeatureLayout,
    HeadOutputs,
    Hyper,
    Posterior,
    Prior,
    SufficientStats,
    fit,
    rating_to_unit,
)

LAYOUT = FeatureLayout()
RESIDUAL_ALONE = Hyper(compare_generic=False)


@dataclass
class World:
    outputs: HeadOutputs
    x: np.ndarray  # [N, 21]
    pop_mean: np.ndarray
    pop_cov: np.ndarray


def make_world(seed: int, n_images: int = 600) -> World:
    rng = np.random.default_rng(seed)
    outputs = HeadOutputs(
        generic=rng.beta(5, 5, n_images).astype(np.float32),
        attributes=rng.uniform(-1, 1, (n_images, 10)).astype(np.float32),
        content=rng.dirichlet(np.full(10, 0.3), n_images).astype(np.float32),
        embedding=np.zeros((n_images, 64), np.float32),
    )
    # The population: everybody likes content 0 a bit more than the crowd; tastes spread mostly over the
    # content clusters (animals vs vehicles) and a few attributes.
    pop_mean = np.zeros(21)
    pop_mean[11] = 0.1
    spread = np.r_[0.02, np.full(10, 0.04), np.full(10, 0.2)]
    return World(outputs, LAYOUT.features(outputs), pop_mean, np.diag(spread**2))


def stars(world: World, w: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rater's 1-5 stars: generic + their residual + noise, rounded to whole stars."""
    unit = world.outputs.generic[idx] + world.x[idx] @ w + rng.normal(0, 0.08, len(idx))
    return np.clip(np.rint(1 + 4 * unit), 1, 5)


def stats_of(world: World, idx: np.ndarray, ratings: np.ndarray) -> SufficientStats:
    target = np.array([rating_to_unit(r, 1) for r in ratings]) - world.outputs.generic[idx]
    return SufficientStats.from_data(world.x[idx], target)


def learned_prior(world: World, rng: np.random.Generator, users: int = 40, k: int = 100) -> Prior:
    """The population prior from enrolled users' own fits (under the zero prior)."""
    posts: list[Posterior] = []
    for _ in range(users):
        w = rng.multivariate_normal(world.pop_mean, world.pop_cov)
        idx = rng.choice(len(world.x), k, replace=False)
        posts.append(fit(stats_of(world, idx, stars(world, w, idx, rng)), Prior.zero(21)))
    return Prior.from_users(np.stack([p.mean for p in posts]), np.stack([p.cov for p in posts]))


def heldout_spearman(
    world: World, post: Posterior, w: np.ndarray, test: np.ndarray, rng
) -> tuple[float, float]:
    truth = stars(world, w, test, rng)
    generic = world.outputs.generic[test]
    personal = post.score(generic, world.x[test])
    return float(spearmanr(generic, truth)[0]), float(spearmanr(personal, truth)[0])


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(11)


@pytest.fixture(scope="module")
def population_prior(world: World) -> Prior:
    return learned_prior(world, np.random.default_rng(12))


def test_personalization_beats_generic_with_10_and_100_ratings(world: World, population_prior: Prior) -> None:
    rng = np.random.default_rng(13)
    results: dict[tuple[str, int], list[float]] = {}
    generic_rho: list[float] = []
    for _ in range(30):
        w = rng.multivariate_normal(world.pop_mean, world.pop_cov)
        order = rng.permutation(len(world.x))
        test = order[:300]
        for k in (10, 100):
            train = order[300 : 300 + k]
            stats = stats_of(world, train, stars(world, w, train, rng))
            for name, prior in (("zero", Prior.zero(21)), ("population", population_prior)):
                g, p = heldout_spearman(world, fit(stats, prior), w, test, np.random.default_rng(k))
                results.setdefault((name, k), []).append(p)
            generic_rho.append(g)
    mean = {key: float(np.mean(v)) for key, v in results.items()}
    gen = float(np.mean(generic_rho))
    print(f"mean Spearman over 30 simulated users: generic {gen:.3f}, " + ", ".join(
        f"{name}@{k} {v:.3f}" for (name, k), v in sorted(mean.items())
    ))  # fmt: skip
    assert mean[("population", 10)] > gen + 0.02  # 10 ratings help, thanks to the population prior
    assert mean[("zero", 10)] > gen - 0.01  # without it the evidence keeps 10 ratings from hurting
    # both are weighed against the generic model by their evidence, which with 10 ratings keeps part of
    # the way to the generic ranking; the population prior still adds
    assert mean[("population", 10)] > mean[("zero", 10)] + 0.01
    assert mean[("population", 100)] > mean[("population", 10)] + 0.05  # 100 help more
    assert mean[("zero", 100)] > gen + 0.1


@pytest.mark.parametrize("k", [10, 20])
def test_active_learning_learns_faster_than_random_choice(
    world: World, population_prior: Prior, k: int
) -> None:
    """k ratings chosen by `suggest` pin a new user's weights down better than k chosen at random (the
    prior's covariance tells which directions are uncertain; without a population there is no such
    knowledge and the two are on par)."""
    rng = np.random.default_rng(14)
    err_active, err_random = [], []
    for _ in range(30):
        w = rng.multivariate_normal(world.pop_mean, world.pop_cov)
        pool = rng.choice(len(world.x), 200, replace=False)
        picks, _ = suggest(fit(SufficientStats.empty(21), population_prior), world.x[pool], k)
        for chosen, errs in ((pool[picks], err_active), (pool[:k], err_random)):
            # the residual model alone: how well the picks pin the weights down, not how far the evidence
            # then trusts them
            post = fit(
                stats_of(world, chosen, stars(world, w, chosen, rng)), population_prior, RESIDUAL_ALONE
            )
            errs.append(float(np.mean((world.x @ (post.mean - w)) ** 2)))
    print(
        f"residual MSE after {k} ratings: active {np.mean(err_active):.4f}, random {np.mean(err_random):.4f}"
    )
    assert np.mean(err_active) < 0.9 * np.mean(err_random)
