"""The personalized model: Bayesian ridge on the residual of the generic score (pure numpy, no I/O).

Ren et al. (ICCV 2017) model a user's score as the generic score plus a residual that is linear in the
image's 10 AADB attributes and 10 content probabilities. We fit that residual by Bayesian ridge:

    y_i = unit(rating_i) - generic_i,    y_i ~ N(x_i . w, 1/alpha),    w ~ N(m0, (lam * P0)^-1)

where x = [1, attributes, content(, embedding)] (the intercept first), (m0, P0) is a population prior
learned from enrolled users (zero mean and identity when there are none) and (alpha, lam) maximise the
evidence (MacKay's fixed point; a Gamma hyper-prior keeps the noise level alpha sane with few ratings,
and one on lam expresses how far a learned population prior is trusted; under the zero prior lam comes
from the evidence alone, which keeps a user with few, uninformative ratings at the generic score).
Everything is computed from the sufficient statistics (S = A'A, b = A'y, y'y, n),
which a new rating updates with a rank-one step, so a profile improves without re-reading its ratings.
Scores are clipped to [0, 1], the unit rating scale.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from piaa_client.features import (
    ATTRIBUTES,
    EMBEDDING_DIM,
    FEATURE_SPACE_VERSION,
    NUM_CONTENT_CLUSTERS,
    PAPER_FEATURES,
)

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]

INTERCEPT = "intercept"
EMBEDDING_NAMES: tuple[str, ...] = tuple(f"embedding:{i}" for i in range(EMBEDDING_DIM))
PACKED_DIM = 1 + len(ATTRIBUTES) + NUM_CONTENT_CLUSTERS + EMBEDDING_DIM
"""Floats per image in the packed head outputs: generic, attributes, content, embedding (85)."""

DEFAULT_NOISE_STD = 0.15
"""Prior guess of a rater's noise on the unit scale (0.6 star); the evidence refines it per user."""
DEFAULT_WEIGHT_STD = 0.3
"""Prior guess of a residual weight's size without a population prior (unit score per unit feature)."""
LEARNED_LAM_STRENGTH = 10.0
"""Trust in a learned prior's scale (lam0 = 1), in pseudo-counts of the lam hyper-prior."""


class InvalidRating(ValueError):
    """A rating value that is NaN, infinite, outside its scale, or on an unknown scale."""


class RatingScale(enum.IntEnum):
    """The scale a rating is given on; the numbers equal piaa.v1.RatingScale's."""

    UNSPECIFIED = 0
    STARS_1_5 = 1
    UNIT = 2


def rating_to_unit(value: float, scale: RatingScale | int) -> float:
    """Maps a rating onto [0, 1]: stars v -> (v - 1) / 4, unit values unchanged.

    Raises InvalidRating for NaN/inf, values outside the scale, and an unspecified or unknown scale.
    """
    try:
        scale = RatingScale(scale)
    except ValueError:
        raise InvalidRating(f"unknown rating scale {scale!r}") from None
    if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise InvalidRating(f"rating must be a finite number, got {value!r}")
    if scale is RatingScale.STARS_1_5:
        if not 1.0 <= value <= 5.0:
            raise InvalidRating(f"a star rating must be within [1, 5], got {value}")
        return (float(value) - 1.0) / 4.0
    if scale is RatingScale.UNIT:
        if not 0.0 <= value <= 1.0:
            raise InvalidRating(f"a unit rating must be within [0, 1], got {value}")
        return float(value)
    raise InvalidRating("the rating scale must be specified (STARS_1_5 or UNIT)")


@dataclass(frozen=True)
class HeadOutputs:
    """The heads' outputs for N images (float32): generic [N], attributes [N,10], content [N,10],
    embedding [N,64]. Raises ValueError on shapes that disagree with piaa_client.features."""

    generic: F32
    attributes: F32
    content: F32
    embedding: F32

    def __post_init__(self) -> None:
        n = np.shape(self.generic)[0] if np.ndim(self.generic) else -1
        want = {
            "generic": (n,),
            "attributes": (n, len(ATTRIBUTES)),
            "content": (n, NUM_CONTENT_CLUSTERS),
            "embedding": (n, EMBEDDING_DIM),
        }
        for name, shape in want.items():
            arr = np.asarray(getattr(self, name), dtype=np.float32)
            if arr.shape != shape:
                raise ValueError(f"HeadOutputs.{name}: shape {arr.shape}, expected {shape}")
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.generic.shape[0])

    def packed(self) -> F32:
        """[N, 85] float32: generic, attributes, content, embedding (the store's encoding)."""
        return np.concatenate(
            [self.generic[:, None], self.attributes, self.content, self.embedding], axis=1, dtype=np.float32
        )

    @classmethod
    def from_packed(cls, packed: ArrayLike) -> HeadOutputs:
        """Inverse of packed(); accepts [N, 85] or one row [85]."""
        arr = np.asarray(packed, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != PACKED_DIM:
            raise ValueError(f"packed head outputs must be [N, {PACKED_DIM}], got {arr.shape}")
        a, c = 1 + len(ATTRIBUTES), 1 + len(ATTRIBUTES) + NUM_CONTENT_CLUSTERS
        return cls(arr[:, 0], arr[:, 1:a], arr[:, a:c], arr[:, c:])

    def take(self, index: ArrayLike) -> HeadOutputs:
        """The rows at `index` (an int array or slice), as a new HeadOutputs."""
        idx = np.asarray(index) if not isinstance(index, slice) else index
        return HeadOutputs(self.generic[idx], self.attributes[idx], self.content[idx], self.embedding[idx])

    @classmethod
    def concat(cls, parts: Sequence[HeadOutputs]) -> HeadOutputs:
        """The rows of all parts, in order."""
        return cls.from_packed(np.concatenate([p.packed() for p in parts], axis=0))


@dataclass(frozen=True)
class FeatureLayout:
    """Which features the personalized model uses, in the feature space `fs_version`.

    The layout's `key` is stored with every profile: weights fitted under another key are never applied.
    """

    with_embedding: bool = False
    fs_version: str = FEATURE_SPACE_VERSION

    @property
    def name(self) -> str:
        """'paper20' (the paper's 20 features) or 'paper20+emb64'."""
        return f"paper20+emb{EMBEDDING_DIM}" if self.with_embedding else "paper20"

    @property
    def key(self) -> str:
        """'<fs_version>/<name>', e.g. 'fs1/paper20': what a stored profile must match to be applied."""
        return f"{self.fs_version}/{self.name}"

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in column order: 'intercept', attributes, 'content:<cluster name>'(,
        'embedding:<i>')."""
        return (INTERCEPT, *PAPER_FEATURES, *(EMBEDDING_NAMES if self.with_embedding else ()))

    @property
    def dim(self) -> int:
        """D, the number of weights (intercept included): 21 or 85."""
        return len(self.names)

    def features(self, outputs: HeadOutputs) -> F64:
        """[N, D] design matrix of `outputs` in this layout."""
        return feature_matrix(outputs, self.with_embedding)

    @classmethod
    def parse(cls, key: str) -> FeatureLayout:
        """Inverse of `key`; raises ValueError on an unknown layout name."""
        fs, _, name = key.partition("/")
        for with_embedding in (False, True):
            layout = cls(with_embedding, fs)
            if layout.name == name:
                return layout
        raise ValueError(f"unknown feature layout {key!r}")


def feature_matrix(outputs: HeadOutputs, with_embedding: bool = False) -> F64:
    """[N, D] float64: a column of ones (the intercept), the 10 attributes, the 10 content probabilities,
    and, when `with_embedding`, the 64-d embedding. D = 21 or 85."""
    cols: list[NDArray[Any]] = [np.ones((len(outputs), 1)), outputs.attributes, outputs.content]
    if with_embedding:
        cols.append(outputs.embedding)
    return np.concatenate(cols, axis=1, dtype=np.float64)


def _as_rows(x: ArrayLike, dim: int | None = None) -> F64:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise ValueError(f"expected [k, {dim}] features, got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class SufficientStats:
    """What the fit needs from a user's ratings: gram = A'A [D,D], moment = A'y [D], yy = y'y, n."""

    gram: F64
    moment: F64
    yy: float = 0.0
    n: int = 0

    @property
    def dim(self) -> int:
        return int(self.moment.shape[0])

    @classmethod
    def empty(cls, dim: int) -> SufficientStats:
        """No ratings yet."""
        return cls(np.zeros((dim, dim)), np.zeros(dim), 0.0, 0)

    @classmethod
    def from_data(cls, x: ArrayLike, y: ArrayLike) -> SufficientStats:
        """The statistics of features x [k, D] and targets y [k] (targets = unit rating - generic)."""
        rows = _as_rows(x)
        return cls.empty(rows.shape[1]).add(rows, y)

    def add(self, x: ArrayLike, y: ArrayLike) -> SufficientStats:
        """New statistics with k more ratings (x [k, D] or [D], y [k] or scalar): k rank-one updates."""
        rows = _as_rows(x, self.dim)
        t = np.asarray(y, dtype=np.float64).reshape(-1)
        if t.shape[0] != rows.shape[0] or not (np.all(np.isfinite(rows)) and np.all(np.isfinite(t))):
            raise ValueError("features and targets must be finite and of the same length")
        return SufficientStats(
            self.gram + rows.T @ rows, self.moment + rows.T @ t, self.yy + float(t @ t), self.n + len(t)
        )


@dataclass(frozen=True)
class Prior:
    """The population prior w ~ N(mean, (lam * precision)^-1), and the starting guesses for (lam, alpha).

    `lam0`/`alpha0` are also the modes of the Gamma hyper-priors the evidence fit uses; `lam_strength`
    is how much the fit trusts lam0 (pseudo-counts): 0 for the zero prior, whose scale is a guess (the
    evidence alone then decides, and with few ratings it keeps the weights near zero rather than
    overfit), and more for a learned prior, whose covariance already has the population's scale.
    """

    mean: F64
    precision: F64
    lam0: float = 1.0 / DEFAULT_WEIGHT_STD**2
    alpha0: float = 1.0 / DEFAULT_NOISE_STD**2
    n_users: int = 0
    lam_strength: float = 0.0
    learned_at: float = 0.0
    """When the store took this prior (Unix seconds; 0 for the zero prior): a fit records it, so a refit
    under a newer prior replaces a fit of the same ratings."""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @functools.cached_property
    def whitener(self) -> F64:
        """L^-1 where precision = L L' (Cholesky), computed once per prior: every fit whitens with it."""
        if np.array_equal(self.precision, np.eye(self.dim)):
            return np.eye(self.dim)
        chol = np.linalg.cholesky(self.precision)
        return np.asarray(np.linalg.solve(chol, np.eye(self.dim)), dtype=np.float64)

    @functools.cached_property
    def intercept_prior(self) -> Prior:
        """The prior's marginal of the intercept (column 0) alone: the generic model's prior."""
        var = float(np.linalg.inv(self.precision)[0, 0])
        return Prior(
            self.mean[:1], np.array([[1.0 / var]]), self.lam0, self.alpha0, self.n_users, self.lam_strength
        )

    @classmethod
    def zero(cls, dim: int) -> Prior:
        """No population yet: zero mean (the generic score), identity precision scaled by lam0."""
        return cls(np.zeros(dim), np.eye(dim))

    @classmethod
    def from_users(
        cls, weights: ArrayLike, covs: ArrayLike | None = None, *, alpha0: float | None = None
    ) -> Prior:
        """The prior learned from enrolled users' fitted weights [U, D] (one EM step of a Gaussian
        hierarchy): mean = average weights, covariance = their spread (+ the average posterior covariance
        `covs` [U, D, D] when given, which undoes the shrinkage of users with few ratings), shrunk toward
        its diagonal when users are few. With fewer than 2 users returns Prior.zero. lam0 = 1 with
        LEARNED_LAM_STRENGTH: the learned covariance already has the right scale."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"weights must be [U, D], got {w.shape}")
        users, dim = w.shape
        base = cls.zero(dim)
        if users < 2:
            return base
        mean = w.mean(axis=0)
        cov = np.cov(w, rowvar=False, ddof=1).reshape(dim, dim)
        if covs is not None:
            cov = cov + np.asarray(covs, dtype=np.float64).mean(axis=0)
        shrink = dim / (users + dim)  # Ledoit-Wolf-like: few users -> mostly the diagonal
        cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov))
        cov += (1e-6 * np.trace(cov) / dim + 1e-10) * np.eye(dim)
        precision = np.linalg.inv(cov)
        return cls(
            mean, (precision + precision.T) / 2, 1.0, alpha0 or base.alpha0, users, LEARNED_LAM_STRENGTH
        )


@dataclass(frozen=True)
class Hyper:
    """Settings of the evidence fit. The strengths are the pseudo-counts of the Gamma hyper-priors (0 =
    plain MacKay, as sklearn's BayesianRidge); they matter only for users with few ratings.
    `lam_strength` None takes the prior's own."""

    alpha_strength: float = 4.0
    lam_strength: float | None = None
    max_iter: int = 200
    tol: float = 1e-6
    compare_generic: bool = True
    """Weigh the residual model against the generic one (intercept only: the generic ranking) by their
    evidence, and average the two (needs the intercept in column 0; off: the residual model alone)."""
    residual_log_odds: float = 0.0
    """Prior log odds of the residual model against the generic one (0 = even)."""


PRIOR_FIT = Hyper(compare_generic=False)
"""How enrolled users are fitted to teach the population prior: the residual model alone, since the prior
is that model's (the generic model is weighed in when a user is fitted under the prior)."""


@dataclass(frozen=True)
class Posterior:
    """The user's model: weights `mean` [D], their covariance `cov` [D,D], noise precision `alpha`,
    prior scale `lam`, the ratings it saw `n` and the log evidence of (alpha, lam)."""

    mean: F64
    cov: F64
    alpha: float
    lam: float
    n: int = 0
    log_evidence: float = field(default=float("nan"), compare=False)
    p_residual: float = field(default=1.0, compare=False)
    """Posterior probability that the ratings carry a taste the features express (the residual model)
    rather than the crowd's score plus noise; the weights are averaged over both models with it."""

    @property
    def weights(self) -> F64:
        return self.mean

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def predict(self, features: ArrayLike) -> F64:
        """Predicted residual x . w for features [N, D]."""
        return _as_rows(features, self.dim) @ self.mean

    def predictive_std(self, features: ArrayLike) -> F64:
        """Predictive standard deviation of a new rating, sqrt(x' cov x + 1/alpha), for features [N, D]."""
        x = _as_rows(features, self.dim)
        var = np.einsum("nd,de,ne->n", x, self.cov, x)
        return np.sqrt(np.maximum(var, 0.0) + 1.0 / self.alpha)

    def score(self, generic: ArrayLike, features: ArrayLike) -> F64:
        """Personalized score clip(generic + x . w, 0, 1)."""
        return np.clip(np.asarray(generic, dtype=np.float64) + self.predict(features), 0.0, 1.0)


@dataclass(frozen=True)
class _Whitened:
    """The problem in coordinates where the prior is N(0, I/lam): eigenbasis of the whitened gram."""

    eig: F64  # eigenvalues of S' (>= 0)
    vecs: F64  # eigenvectors (columns)
    proj: F64  # V' b'
    yy: float  # |y - A m0|^2
    l_inv: F64  # L^-1 with P0 = L L'


def _whiten(stats: SufficientStats, prior: Prior) -> _Whitened:
    if stats.dim != prior.dim:
        raise ValueError(f"statistics have D={stats.dim} but the prior has D={prior.dim}")
    l_inv = prior.whitener
    m0 = prior.mean
    s_w = l_inv @ stats.gram @ l_inv.T
    b_w = np.asarray(l_inv @ (stats.moment - stats.gram @ m0), dtype=np.float64)
    yy = max(stats.yy - 2 * float(m0 @ stats.moment) + float(m0 @ stats.gram @ m0), 0.0)
    eig, vecs = np.linalg.eigh((s_w + s_w.T) / 2)
    return _Whitened(np.maximum(eig, 0.0), vecs, vecs.T @ b_w, float(yy), l_inv)


def _terms(wh: _Whitened, alpha: float, lam: float) -> tuple[F64, F64, float, float, float]:
    """(denominators, mean in the eigenbasis, gamma, residual sum of squares, |m'|^2)."""
    d = lam + alpha * wh.eig
    mv = alpha * wh.proj / d
    gamma = alpha * float(wh.eig @ (1.0 / d))
    resid = max(wh.yy - 2 * float(mv @ wh.proj) + float(wh.eig @ (mv * mv)), 0.0)
    return d, mv, gamma, resid, float(mv @ mv)


def _log_evidence(wh: _Whitened, n: int, alpha: float, lam: float) -> float:
    d, _, _, resid, w2 = _terms(wh, alpha, lam)
    dim = len(wh.eig)
    return float(
        0.5 * dim * math.log(lam)
        + 0.5 * n * math.log(alpha)
        - 0.5 * alpha * resid
        - 0.5 * lam * w2
        - 0.5 * np.sum(np.log(d))
        - 0.5 * n * math.log(2 * math.pi)
    )


def log_evidence(stats: SufficientStats, prior: Prior, alpha: float, lam: float) -> float:
    """ln p(y | alpha, lam): the marginal likelihood of the ratings under the prior scaled by lam."""
    return _log_evidence(_whiten(stats, prior), stats.n, alpha, lam)


def _posterior(wh: _Whitened, prior: Prior, n: int, alpha: float, lam: float) -> Posterior:
    d, mv, _, _, _ = _terms(wh, alpha, lam)
    back = wh.l_inv.T @ wh.vecs  # maps the whitened eigenbasis back to weights
    mean = prior.mean + back @ mv
    cov = (back / d) @ back.T
    return Posterior(mean, (cov + cov.T) / 2, alpha, lam, n, _log_evidence(wh, n, alpha, lam))


def posterior(stats: SufficientStats, prior: Prior, alpha: float, lam: float) -> Posterior:
    """The posterior for fixed (alpha, lam): precision lam P0 + alpha S, mean solving
    (lam P0 + alpha S) w = lam P0 m0 + alpha b (ridge regression shrunk toward m0)."""
    return _posterior(_whiten(stats, prior), prior, stats.n, alpha, lam)


def fit(stats: SufficientStats, prior: Prior, hyper: Hyper | None = None) -> Posterior:
    """The user's posterior with (alpha, lam) maximising the evidence (MacKay fixed point + hyper-priors),
    averaged with the generic model by their evidence when `hyper.compare_generic` (p_residual says how).

    With no ratings, returns the prior itself (alpha0, lam0). Raises ValueError on mismatched dimensions.
    """
    hyper = hyper or Hyper()
    wh = _whiten(stats, prior)
    alpha, lam = prior.alpha0, prior.lam0
    if stats.n == 0:
        return _posterior(wh, prior, 0, alpha, lam)
    na = hyper.alpha_strength
    nl = prior.lam_strength if hyper.lam_strength is None else hyper.lam_strength
    for _ in range(hyper.max_iter):
        _, _, gamma, resid, w2 = _terms(wh, alpha, lam)
        # The Gamma hyper-priors add (strength) pseudo-observations at the prior guesses; the tiny floors
        # keep the plain-MacKay case (strength 0) finite when the data fit exactly.
        new_lam = (gamma + nl + 1e-12) / (w2 + nl / prior.lam0 + 1e-12)
        new_alpha = (max(stats.n - gamma, 0.0) + na + 1e-12) / (resid + na / prior.alpha0 + 1e-12)
        new_lam, new_alpha = min(max(new_lam, 1e-10), 1e10), min(max(new_alpha, 1e-10), 1e10)
        done = abs(new_lam - lam) <= hyper.tol * lam and abs(new_alpha - alpha) <= hyper.tol * alpha
        # Without signal the evidence grows toward lam = infinity and the iteration creeps there; once
        # the data pin down less than 1e-3 effective parameters the weights are the prior's for any use.
        done = done or gamma < 1e-3
        alpha, lam = new_alpha, new_lam
        if done:
            break
    post = _posterior(wh, prior, stats.n, alpha, lam)
    has_intercept = stats.dim > 1 and abs(stats.gram[0, 0] - stats.n) <= 1e-9 * stats.n
    return (
        _average_with_generic(post, stats, prior, hyper) if hyper.compare_generic and has_intercept else post
    )


def _average_with_generic(post: Posterior, stats: SufficientStats, prior: Prior, hyper: Hyper) -> Posterior:
    """Bayesian model averaging of the residual model `post` and the generic model (the intercept alone,
    under the prior's marginal of the intercept: a rating offset that leaves the generic ranking as it
    is), weighted by their evidence. A user whose ratings carry no taste the features can express gets
    p_residual near 0 and so keeps the generic ranking; the evidence's Occam factor makes this so even
    with few ratings, where a fitted residual follows noise."""
    generic = fit(
        SufficientStats(stats.gram[:1, :1], stats.moment[:1], stats.yy, stats.n),
        prior.intercept_prior,
        Hyper(hyper.alpha_strength, hyper.lam_strength, hyper.max_iter, hyper.tol, compare_generic=False),
    )
    log_odds = post.log_evidence - generic.log_evidence + hyper.residual_log_odds
    p = 1.0 / (1.0 + math.exp(-min(max(log_odds, -700.0), 700.0)))
    mean0 = np.zeros(post.dim)
    mean0[0] = generic.mean[0]
    cov0 = np.zeros_like(post.cov)
    cov0[0, 0] = generic.cov[0, 0]
    mean = p * post.mean + (1 - p) * mean0
    d1, d0 = post.mean - mean, mean0 - mean
    cov = p * (post.cov + np.outer(d1, d1)) + (1 - p) * (cov0 + np.outer(d0, d0))
    prior_p = 1.0 / (1.0 + math.exp(-hyper.residual_log_odds))
    evidence = float(
        np.logaddexp(post.log_evidence + math.log(prior_p), generic.log_evidence + math.log1p(-prior_p))
    )
    return Posterior(mean, (cov + cov.T) / 2, post.alpha, post.lam, post.n, evidence, p)


def personalize(generic: ArrayLike, features: ArrayLike, weights: ArrayLike) -> F32:
    """Scores of a batch where every row may belong to another user: clip(generic + x . w, 0, 1).

    generic [N], features [N, D], weights [N, D] (a row of zeros = no profile = the generic score);
    features or weights may also be one row [D], broadcast over the batch. Returns float32 [N].
    """
    g = np.asarray(generic, dtype=np.float64).reshape(-1)
    x = np.asarray(features, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"features have D={x.shape[-1]} but weights have D={w.shape[-1]}")
    x, w = np.broadcast_to(x, (len(g), x.shape[-1])), np.broadcast_to(w, (len(g), w.shape[-1]))
    residual = np.einsum("nd,nd->n", x, w)
    return np.clip(g + residual, 0.0, 1.0).astype(np.float32)


def explain(
    post: Posterior, prior: Prior, names: Sequence[str], *, top: int = 5, min_z: float = 1.0
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Taste in words: (likes, dislikes), each [(feature name, weight relative to the population)],
    strongest first, at most `top` each. A feature counts only when its weight differs from the
    population's by at least `min_z` posterior standard deviations; the intercept (rates everything
    higher or lower) is not a taste and is left out. A user whose evidence favours the generic model
    (p_residual < 1/2) has no likes or dislikes; otherwise the taste is the residual model's own
    (the model average's mean and variance, taken back to that component)."""
    if len(names) != post.dim or prior.dim != post.dim:
        raise ValueError("names, posterior and prior must have the same D")
    p = post.p_residual
    if p < 0.5:
        return [], []
    # Outside the intercept the generic model's weights are 0, so the average is p · the residual
    # model's mean, and its variance p · (the residual's) + p (1 - p) · mean². Undone here: the spread
    # between the two models is doubt about *whether* there is a taste, not about *which* one.
    mean = post.mean / p
    var = (np.diag(post.cov) - p * (1 - p) * mean**2) / p
    delta = mean - prior.mean
    z = delta / np.sqrt(np.maximum(var, 1e-300))
    keep = [i for i, name in enumerate(names) if name != INTERCEPT and abs(z[i]) >= min_z]
    likes = sorted((i for i in keep if delta[i] > 0), key=lambda i: -delta[i])[:top]
    dislikes = sorted((i for i in keep if delta[i] < 0), key=lambda i: delta[i])[:top]
    return [(names[i], float(delta[i])) for i in likes], [(names[i], float(delta[i])) for i in dislikes]
