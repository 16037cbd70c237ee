"""The protocol on synthetic head outputs: draws, the methods, the learned prior, the summaries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from piaa_personalization.evaluation import protocol as P
from piaa_personalization.evaluation.datasets import Ratings
from piaa_personalization.evaluation.report import breakdown_table, main_table, verdict
from piaa_personalization.model.residual import HeadOutputs

N_IMAGES = 240


def heads(n: int = N_IMAGES, seed: int = 0) -> HeadOutputs:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 10)) * 2
    content = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return HeadOutputs(
        rng.uniform(0.2, 0.8, n), rng.uniform(0, 1, (n, 10)), content, rng.normal(size=(n, 64))
    )


def rate(h: HeadOutputs, tastes: dict[str, np.ndarray], noise: float = 0.03, seed: int = 1) -> Ratings:
    """Each rater: stars from generic + content . taste + noise (taste = zeros: the crowd's score)."""
    rng = np.random.default_rng(seed)
    paths = [Path(f"img{i:03d}.jpg") for i in range(len(h))]
    rows = []
    for rater, taste in tastes.items():
        u = h.generic + h.content @ taste + rng.normal(0, noise, len(h))
        rows += [(rater, p, float(s)) for p, s in zip(paths, np.clip(np.rint(1 + 4 * u), 1, 5), strict=True)]
    return Ratings.from_rows(rows)


SHARED = np.array([0.4, -0.4, 0.3, -0.3, 0.2, -0.2, 0.0, 0.0, 0.0, 0.0])


def population(n_train: int = 12, n_test: int = 4, seed: int = 2) -> tuple[P.Design, P.Split]:
    """Raters whose tastes scatter a little around one shared taste; the first n_test are tested."""
    rng = np.random.default_rng(seed)
    tastes = {f"r{i:02d}": SHARED + rng.normal(0, 0.05, 10) for i in range(n_test + n_train)}
    h = heads()
    design = P.Design.build(h, rate(h, tastes))
    return design, P.Split(tuple(range(n_test, n_test + n_train)), tuple(range(n_test)))


def test_design_targets_are_unit_rating_minus_generic() -> None:
    h = heads(20)
    design = P.Design.build(h, rate(h, {"a": np.zeros(10)}))
    # fits see the outputs as a rating stores them (float16 generic, int8 / uint8 features)
    stored = h.generic.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(design.target, (design.ratings.stars - 1) / 4 - stored[design.ratings.image])
    assert design.x.shape == design.x_fit.shape == (20, 85)  # type: ignore[union-attr]
    assert not np.array_equal(design.x, design.x_fit)
    np.testing.assert_allclose(design.x_fit, design.x, atol=0.02)  # steps of 1/255 and max/127
    assert design.matrix(P.GENERIC, fit=True) is design.x_fit and design.matrix(P.GENERIC) is design.x
    with pytest.raises(ValueError):
        P.Design.build(heads(19), design.ratings)


def test_personalization_follows_a_strong_taste_and_the_prior_helps_at_k10() -> None:
    design, split = population()
    result = P.run(design, split, ks=(10, 100), reps=3)
    mean = {(s.method, s.k): s.mean for s in P.summarize(result)}
    for k in (10, 100):
        assert mean[("ours_prior", k)] > mean[("generic", k)] + 0.1
    assert mean[("paper_both", 100)] > mean[("generic", 100)] + 0.1  # enough data without a prior
    assert mean[("paper_content", 100)] > mean[("paper_attributes", 100)] + 0.1  # the taste is in content
    # At k = 10 the zero prior cannot pin down 21 weights; the population's shared taste can.
    assert mean[("ours_prior", 10)] > mean[("paper_both", 10)] + 0.05


def test_a_crowd_rater_gains_nothing() -> None:
    h = heads()
    tastes = {f"c{i}": np.zeros(10) for i in range(8)}
    design = P.Design.build(h, rate(h, tastes, noise=0.08))
    split = P.Split(tuple(range(2, 8)), (0, 1))
    rows = {(s.method, s.k): s for s in P.summarize(P.run(design, split, ks=(100,), reps=3))}
    assert abs(rows[("ours_prior", 100)].gain) < 0.03 and rows[("ours_prior", 100)].mean > 0.5
    assert rows[("generic", 100)].gain == 0.0


def test_draws_are_seeded_and_shared_by_methods() -> None:
    design, split = population(n_train=4, n_test=2)
    a = P.run(design, split, ks=(10,), reps=2, seed=5)
    b = P.run(design, split, ks=(10,), reps=2, seed=5, methods=(P.GENERIC, P.METHODS_BY_NAME["paper_both"]))
    np.testing.assert_array_equal(a.rho[[0, 3]], b.rho)  # same draws whichever methods run
    c = P.run(design, split, ks=(10,), reps=2, seed=6)
    assert not np.array_equal(a.rho, c.rho)


def test_raters_with_too_few_ratings_are_not_tested_at_that_k() -> None:
    design, split = population(n_train=3, n_test=2)
    mask = ~((design.ratings.rater == 0) & (design.ratings.image >= 50))  # rater 0 keeps 50 ratings
    r = design.ratings
    small = Ratings(r.raters, r.images, r.rater[mask], r.image[mask], r.stars[mask])
    result = P.run(P.Design.build(heads(), small), split, ks=(10, 100), reps=1)
    assert np.isnan(result.rho[:, 1, 0]).all() and np.isfinite(result.rho[:, 0, 0]).all()
    assert {(s.k, s.raters) for s in P.summarize(result)} == {(10, 2), (100, 1)}


def test_learned_prior_carries_the_shared_taste_and_leave_one_out_excludes_the_rater() -> None:
    design, split = population()
    method = P.METHODS_BY_NAME["ours_prior"]
    prior = P.learn_prior(design, split.train, method)
    assert prior.n_users == len(split.train)
    content_weights = prior.mean[11:21]
    assert np.corrcoef(content_weights, SHARED)[0, 1] > 0.9
    loo = P.Split((), split.test, leave_one_out=True)
    cache: dict[tuple[str, int], object] = {}
    p0 = P.prior_for(design, loo, method, split.test[0], cache)  # type: ignore[arg-type]
    assert p0 is not None and p0.n_users == len(split.test) - 1
    assert P.prior_for(design, loo, P.METHODS_BY_NAME["paper_both"], 0, cache) is None  # type: ignore[arg-type]
    assert P.learn_prior(design, split.train[:1], method).n_users == 0  # one rater: the zero prior


def test_spearman_and_intervals() -> None:
    assert P.spearman(np.array([1.0, 2, 3]), np.array([0.5, 0.5, 0.5])) == 0.0
    assert P.spearman(np.array([1.0, 2, 2, 3]), np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.9486833)
    lo, hi = P.t_interval(np.array([1.0, 2.0, 3.0]))
    assert (lo + hi) / 2 == pytest.approx(2.0) and (hi - lo) / 2 == pytest.approx(4.302653 / math.sqrt(3))
    assert all(math.isnan(x) for x in P.t_interval(np.array([1.0])))
    assert verdict((0.01, 0.02)) == "better" and verdict((-0.02, -0.01)) == "worse"
    assert verdict((-0.01, 0.02)) == "no difference"


def test_tables_render_every_method_and_group() -> None:
    design, split = population(n_train=4, n_test=2)
    result = P.run(design, split, ks=(10,), reps=2)
    table = main_table(P.summarize(result))
    assert table.count("\n") == 1 + len(P.METHODS)
    assert all(m.label in table for m in P.METHODS)
    groups = breakdown_table(result, {"first": np.array([True, False]), "both": np.array([True, True])})
    assert "| first (1) | 10 |" in groups and "| both (2) | 10 |" in groups
