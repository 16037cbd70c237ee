"""The simulated report's extra rows: the oracle that knows each rater's taste, and content defined on
named groups of the classifier's classes (what a `--content groups` release serves)."""

from __future__ import annotations

import numpy as np
import pytest

from piaa_export.taxonomy import GROUP_NAMES, coarse_group, group_probabilities
from piaa_personalization.evaluation import protocol as P
from piaa_personalization.evaluation.priors import prior_study
from piaa_personalization.evaluation.simulate import SimConfig, simulate
from tests.unit.test_eval_simulation import _features


def test_group_probabilities_sum_the_softmax_within_each_group() -> None:
    logits = np.zeros((2, 1000))
    logits[0, 151] = 30.0  # sure of a dog
    probs = group_probabilities(logits)
    assert probs.shape == (2, len(GROUP_NAMES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs[0, coarse_group(151)] > 0.99
    sizes = np.bincount([coarse_group(c) for c in range(1000)], minlength=len(GROUP_NAMES))
    np.testing.assert_allclose(probs[1], sizes / 1000)  # unsure: each group by its number of classes


def test_ideal_scores_are_the_ratings_without_their_noise() -> None:
    feats, labels, paths = _features()
    config = SimConfig(n_test=8, n_train=0, noise=(1e-6, 2e-6))
    ratings, raters = simulate(feats, labels, paths, config)
    again, _ = simulate(feats, labels, paths, config)
    np.testing.assert_array_equal(ratings.stars, again.stars)
    for i, rater in enumerate(raters):
        assert rater.ideal is not None and rater.ideal.shape == (len(paths),)
        _, stars = ratings.of(i)
        np.testing.assert_array_equal(stars, np.clip(np.rint(1 + 4 * rater.ideal), 1, 5))
        if rater.kind == "none":  # the crowd's score and an offset: the generic ranking
            assert np.ptp(rater.ideal - feats.heads.generic) < 1e-6


def test_the_oracle_is_the_ceiling_and_named_groups_need_groups() -> None:
    feats, labels, paths = _features()
    ratings, raters = simulate(feats, labels, paths, SimConfig(n_test=8, n_train=8))
    design = P.Design.build(feats.heads, ratings)
    split = P.Split(tuple(range(8, 16)), tuple(range(8)))
    methods = (P.GENERIC, P.METHODS_BY_NAME["ours_prior"], P.ORACLE)
    with pytest.raises(ValueError, match="oracle"):
        P.run(design, split, ks=(10,), reps=1, methods=methods)
    design.oracle = np.stack([r.ideal for r in raters])
    result = P.run(design, split, ks=(10,), reps=2, methods=methods)
    oracle, ours = result.per_rater("oracle", 10), result.per_rater("ours_prior", 10)
    assert np.mean(oracle) > np.mean(ours) + 0.05
    with pytest.raises(ValueError, match="group"):
        P.run(design, split, ks=(10,), reps=1, methods=(P.GENERIC, P.OURS_NAMED))
    one_hot = np.zeros((len(paths), len(GROUP_NAMES)))
    one_hot[np.arange(len(paths)), [coarse_group(c) for c in labels]] = 1.0
    design.groups = one_hot
    named = P.run(design, split, ks=(10,), reps=1, methods=(P.GENERIC, P.OURS_NAMED))
    assert np.all(np.isfinite(named.per_rater("ours_named", 10)))
    assert design.matrix(P.OURS_NAMED)[:, 11:21].tolist() == one_hot.tolist()
    assert design.matrix(P.GENERIC) is design.x


def test_the_prior_study_compares_every_starting_prior() -> None:
    feats, labels, paths = _features()
    config = SimConfig(n_test=8, n_train=8)
    table = prior_study(feats, labels, paths, config, ks=(10,), reps=1, sizes=(4, 8)).splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:]] == [
        "zero (nobody)",
        "shipped default: 8 raters of another population",
        "the tenant's own first 4 users",
        "the tenant's own first 8 users",
    ]
    with pytest.raises(ValueError, match="exceed"):
        prior_study(feats, labels, paths, config, sizes=(9,))
