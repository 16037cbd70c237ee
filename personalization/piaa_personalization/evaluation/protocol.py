"""The field's protocol (Ren et al. 2017): per test rater, k rated images train, the rest test, repeated.

For every test rater and repetition, k of the rater's images are drawn at random to fit the residual
model and the rater's other images test it; the number is the Spearman correlation between the rater's
stars and the predicted scores on the test images (per rater, then averaged). Training raters (never
tested) may teach the population prior. Everything runs on cached head outputs (features.py), with the
product's own model code (residual.fit, Prior.from_users as store.learn_prior does it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

from piaa_client.features import ATTRIBUTES, NUM_CONTENT_CLUSTERS
from piaa_personalization.evaluation.datasets import Ratings
from piaa_personalization.model import residual
from piaa_personalization.store import format as store_format

F64 = NDArray[np.float64]
_A, _C = 1 + len(ATTRIBUTES), 1 + len(ATTRIBUTES) + NUM_CONTENT_CLUSTERS
MIN_TEST_IMAGES = 5
"""A rater needs at least k + this many ratings to be tested at k (Spearman on fewer is noise)."""


@dataclass(frozen=True)
class Method:
    """One way to score: the generic score alone (no columns), or a residual fitted on some columns of
    the full design matrix [1, attributes, content, embedding] under the zero or the population prior."""

    name: str
    label: str
    columns: tuple[int, ...] = ()
    population_prior: bool = False
    named_groups: bool = False
    """Content columns = the classifier's coarse-group probabilities (Design.groups), not the clusters."""
    oracle: bool = False
    """Ranks by the rater's noise-free score (Design.oracle): the ceiling, known only for simulated raters."""

    @property
    def generic(self) -> bool:
        return not self.columns and not self.oracle


GENERIC = Method("generic", "generic only")
METHODS: tuple[Method, ...] = (
    GENERIC,
    Method("paper_attributes", "paper residual: attributes", (0, *range(1, _A))),
    Method("paper_content", "paper residual: content", (0, *range(_A, _C))),
    Method("paper_both", "paper residual: attributes + content", tuple(range(_C))),
    Method("ours_prior", "ours: population prior (paper20)", tuple(range(_C)), True),
    Method("ours_embedding", "ours: population prior + embedding", tuple(range(residual.PACKED_DIM)), True),
)
"""The comparison's rows. The paper's residual is fitted by the product's Bayesian ridge under the zero
prior (the evidence picks the ridge strength), i.e. what the gateway does before a prior is learned."""
OURS_NAMED = Method(
    "ours_named", "what if: population prior, content = named ImageNet groups", tuple(range(_C)), True, True
)
ORACLE = Method("oracle", "ceiling: an oracle that knows each rater's taste", oracle=True)
EXTRA_METHODS: tuple[Method, ...] = (OURS_NAMED, ORACLE)
"""Rows only the simulated report can fill: content as a future feature space could serve it (named
groups of the classifier's classes; needs Design.groups), and the oracle (needs Design.oracle)."""
METHODS_BY_NAME = {m.name: m for m in METHODS + EXTRA_METHODS}


@dataclass(frozen=True)
class Split:
    """Rater indices (into Ratings.raters) that teach the prior and that are tested. An empty `train`
    with `leave_one_out` learns each test rater's prior from all the other test raters (REAL-CUR)."""

    train: tuple[int, ...]
    test: tuple[int, ...]
    leave_one_out: bool = False


def split_raters(
    ratings: Ratings, n_test: int = 37, seed: int = 0, test_workers: Sequence[str] | None = None
) -> Split:
    """The literature's split by worker: `test_workers` when given (ids; raises KeyError on an unknown
    one), else `n_test` raters drawn at random; every other rater trains the prior."""
    index = {r: i for i, r in enumerate(ratings.raters)}
    if test_workers is not None:
        missing = [w for w in test_workers if w not in index]
        if missing:
            raise KeyError(f"test workers not in the ratings: {missing[:5]}")
        test = sorted(index[w] for w in test_workers)
    else:
        if not 0 < n_test <= len(ratings.raters):
            raise ValueError(f"n_test must be in 1..{len(ratings.raters)}, got {n_test}")
        test = sorted(np.random.default_rng(seed).permutation(len(ratings.raters))[:n_test].tolist())
    chosen = set(test)
    return Split(tuple(i for i in range(len(ratings.raters)) if i not in chosen), tuple(test))


@dataclass
class Design:
    """Per image: the generic score [N] and the full design matrix [N, 85]; per rating: the residual
    target unit(stars) - generic. Built once per dataset.

    The product scores with the heads' outputs as they are, but fits on the outputs its ratings store
    (store format 2 quantizes them); `generic_fit` and `x_fit` are those, when given, and the fits here
    use them too, so the in-process numbers are the gateway's."""

    generic: F64
    x: F64
    ratings: Ratings
    groups: F64 | None = None
    """[N, 10] the classifier's coarse-group probabilities, for OURS_NAMED."""
    oracle: F64 | None = None
    """[raters, N] each rater's noise-free score (simulated raters only), for ORACLE."""
    generic_fit: F64 | None = None
    x_fit: F64 | None = None
    target: F64 = field(init=False)
    _matrices: dict[tuple[bool, bool], F64] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        unit = (self.ratings.stars - 1.0) / 4.0  # residual.rating_to_unit for STARS_1_5, vectorized
        generic = self.generic if self.generic_fit is None else self.generic_fit
        self.target = unit - generic[self.ratings.image]

    def matrix(self, method: Method, fit: bool = False) -> F64:
        """The full design matrix [N, 85] as `method` sees it (named groups in the content columns when
        it asks for them), as fits see it (`fit`: the stored outputs) or as scoring does. Raises
        ValueError when it asks for groups the design lacks."""
        fit = fit and self.x_fit is not None
        base = self.x_fit if fit and self.x_fit is not None else self.x
        if not method.named_groups:
            return base
        if self.groups is None:
            raise ValueError(f"{method.name} needs the classifier's group probabilities")
        key = (True, fit)
        if key not in self._matrices:
            named = base.copy()
            # stored like the content probabilities they would replace: in steps of 1/255
            named[:, _A:_C] = np.rint(self.groups * 255) / 255 if fit else self.groups
            self._matrices[key] = named
        return self._matrices[key]

    @classmethod
    def build(cls, heads: residual.HeadOutputs, ratings: Ratings) -> Design:
        """The design of `ratings` on `heads` (rows in ratings.images order), with the stored outputs
        the fits use. Raises ValueError when the rows and images disagree."""
        if len(heads) != len(ratings.images):
            raise ValueError(f"{len(heads)} head rows for {len(ratings.images)} images")
        stored = residual.HeadOutputs.from_packed(
            np.stack([store_format.quantized(r) for r in heads.packed()])
        )
        return cls(
            heads.generic.astype(np.float64),
            residual.feature_matrix(heads, True),
            ratings,
            generic_fit=stored.generic.astype(np.float64),
            x_fit=residual.feature_matrix(stored, True),
        )

    def rows(self, rater: int) -> tuple[NDArray[np.int64], F64, F64]:
        """(image indices, stars, residual targets) of one rater."""
        mask = self.ratings.rater == rater
        return self.ratings.image[mask], self.ratings.stars[mask], self.target[mask]


def learn_prior(
    design: Design, raters: Sequence[int], method: Method, min_ratings: int = 10
) -> residual.Prior:
    """The population prior of `method`'s columns from `raters`' ratings, as store.learn_prior learns it:
    each rater with >= min_ratings fitted under the zero prior (PRIOR_FIT), then Prior.from_users."""
    cols = np.asarray(method.columns, dtype=np.int64)
    zero = residual.Prior.zero(len(cols))
    x = design.matrix(method, fit=True)
    means, covs = [], []
    for r in raters:
        images, _, target = design.rows(r)
        if len(images) < min_ratings:
            continue
        stats = residual.SufficientStats.from_data(x[np.ix_(images, cols)], target)
        post = residual.fit(stats, zero, residual.PRIOR_FIT)
        means.append(post.mean)
        covs.append(post.cov)
    if len(means) < 2:
        return zero
    return residual.Prior.from_users(np.stack(means), np.stack(covs))


def rep_mean(rho: F64) -> F64:
    """Mean over the last axis (repetitions) ignoring NaN; NaN where a row has no value."""
    count = np.isfinite(rho).sum(axis=-1)
    total = np.where(np.isfinite(rho), rho, 0.0).sum(axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def spearman(truth: F64, predicted: F64) -> float:
    """Spearman's rho with ties averaged; 0 when either side is constant (no ranking to compare)."""
    if np.ptp(truth) == 0 or np.ptp(predicted) == 0:
        return 0.0
    rho = sps.spearmanr(truth, predicted).statistic
    return 0.0 if not math.isfinite(rho) else float(rho)


def predict(
    design: Design,
    method: Method,
    prior: residual.Prior | None,
    *,
    train: NDArray[np.int64],
    target: F64,
    test: NDArray[np.int64],
) -> F64:
    """Scores of the `test` images after fitting `method` on the `train` images' residual targets."""
    generic = design.generic[test]
    if method.generic:
        return generic
    cols = np.asarray(method.columns, dtype=np.int64)
    prior = prior if prior is not None else residual.Prior.zero(len(cols))
    x_fit = design.matrix(method, fit=True)
    post = residual.fit(residual.SufficientStats.from_data(x_fit[np.ix_(train, cols)], target), prior)
    return post.score(generic, design.matrix(method)[np.ix_(test, cols)])


@dataclass(frozen=True)
class ProtocolResult:
    """rho[method, k, rater, rep] (NaN where a rater has too few ratings for k), and what produced it."""

    methods: tuple[Method, ...]
    ks: tuple[int, ...]
    raters: tuple[str, ...]
    rho: F64

    def per_rater(self, method: str, k: int) -> F64:
        """Each tested rater's Spearman averaged over repetitions [R] (NaN rows dropped)."""
        m = [x.name for x in self.methods].index(method)
        vals = rep_mean(self.rho[m, self.ks.index(k)])
        return vals[np.isfinite(vals)]


def prior_for(
    design: Design, split: Split, method: Method, rater: int, cache: dict[tuple[str, int], residual.Prior]
) -> residual.Prior | None:
    """The prior `method` uses for test rater `rater` (None = zero prior), memoised in `cache`."""
    if not method.population_prior:
        return None
    key = (method.name, rater if split.leave_one_out else -1)
    if key not in cache:
        teachers = [r for r in split.test if r != rater] if split.leave_one_out else list(split.train)
        cache[key] = learn_prior(design, teachers, method)
    return cache[key]


def run(
    design: Design,
    split: Split,
    *,
    ks: Sequence[int] = (10, 100),
    reps: int = 10,
    methods: Sequence[Method] = METHODS,
    seed: int = 0,
) -> ProtocolResult:
    """The protocol for every test rater, k and repetition; the same draws for every method."""
    priors: dict[tuple[str, int], residual.Prior] = {}
    rho = np.full((len(methods), len(ks), len(split.test), reps), np.nan)
    for ri, rater in enumerate(split.test):
        images, stars, target = design.rows(rater)
        method_priors = [prior_for(design, split, m, rater, priors) for m in methods]
        for ki, k in enumerate(ks):
            if len(images) < k + MIN_TEST_IMAGES:
                continue
            for rep in range(reps):
                order = np.random.default_rng([seed, rater, k, rep]).permutation(len(images))
                tr, te = order[:k], order[k:]
                for mi, method in enumerate(methods):
                    if method.oracle:
                        if design.oracle is None:
                            raise ValueError("the oracle needs each rater's noise-free scores")
                        rho[mi, ki, ri, rep] = spearman(stars[te], design.oracle[rater][images[te]])
                        continue
                    pred = predict(
                        design,
                        method,
                        method_priors[mi],
                        train=images[tr],
                        target=target[tr],
                        test=images[te],
                    )
                    rho[mi, ki, ri, rep] = spearman(stars[te], pred)
    return ProtocolResult(tuple(methods), tuple(ks), tuple(design.ratings.raters[r] for r in split.test), rho)


@dataclass(frozen=True)
class Summary:
    """One row of a results table: mean Spearman over raters and repetitions, the std over repetitions
    (of the rater-averaged value, as the literature reports it), a 95% t-interval over raters, and the
    paired improvement over the generic score with its own 95% interval."""

    method: str
    k: int
    raters: int
    mean: float
    std_reps: float
    ci: tuple[float, float]
    gain: float
    gain_ci: tuple[float, float]


def t_interval(values: F64) -> tuple[float, float]:
    """95% Student-t interval of the mean of `values` (NaN when fewer than 2)."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    half = float(sps.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    mean = float(np.mean(values))
    return (mean - half, mean + half)


def summarize(result: ProtocolResult, raters: NDArray[np.bool_] | None = None) -> list[Summary]:
    """A Summary per (method, k); `raters` [R] restricts it to a subset of the tested raters."""
    names = [m.name for m in result.methods]
    g = names.index(GENERIC.name)
    keep = np.ones(len(result.raters), bool) if raters is None else raters
    out = []
    for ki, k in enumerate(result.ks):
        base = rep_mean(result.rho[g, ki][keep])
        valid = np.isfinite(base)
        for mi, method in enumerate(result.methods):
            rho = result.rho[mi, ki][keep][valid]
            if not len(rho):
                continue
            per_rater = rho.mean(axis=1)
            diff = per_rater - base[valid]
            out.append(
                Summary(
                    method.name,
                    k,
                    len(per_rater),
                    float(per_rater.mean()),
                    float(np.std(rho.mean(axis=0), ddof=1)) if rho.shape[1] > 1 else 0.0,
                    t_interval(per_rater),
                    float(diff.mean()),
                    t_interval(diff),
                )
            )
    return out
