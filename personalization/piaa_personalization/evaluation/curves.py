"""Active learning vs random choice: the Spearman a rater's model reaches after k ratings, k = 5..100.

Per test rater and repetition, half of the rater's images (at random) are held out to test; the other
half is the pool the k rated images come from. `active` asks residual.suggest (what SuggestImagesToRate
serves) for the next images given the posterior so far, rates them, refits, and repeats up to the next
checkpoint; `random` rates a random prefix of the pool. Both use the same method, prior and test half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from piaa_personalization.evaluation.protocol import (
    GENERIC,
    METHODS_BY_NAME,
    Design,
    Method,
    Split,
    prior_for,
    rep_mean,
    spearman,
    t_interval,
)
from piaa_personalization.model import residual
from piaa_personalization.model.active import suggest

DEFAULT_CHECKPOINTS: tuple[int, ...] = (5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)
STRATEGIES: tuple[str, ...] = ("random", "active")


@dataclass(frozen=True)
class Curves:
    """rho[strategy, checkpoint, rater, rep] (NaN where the pool is smaller than k) and the generic
    score's rho[rater, rep] on the same test halves."""

    ks: tuple[int, ...]
    method: str
    rho: NDArray[np.float64]
    generic: NDArray[np.float64]

    def mean_ci(self, strategy: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per checkpoint: mean over raters of the rep-averaged rho [K], and the 95% intervals [K, 2]."""
        per_rater = rep_mean(self.rho[STRATEGIES.index(strategy)])
        means = np.array(
            [row[np.isfinite(row)].mean() if np.isfinite(row).any() else np.nan for row in per_rater]
        )
        cis = np.array([t_interval(row[np.isfinite(row)]) for row in per_rater])
        return means, cis

    def over_generic(self, strategy: str) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per checkpoint: the gain over the generic score on the same test halves, paired per rater:
        mean [K] and 95% intervals [K, 2]."""
        diff = rep_mean(self.rho[STRATEGIES.index(strategy)] - self.generic[None])
        rows = [row[np.isfinite(row)] for row in diff]
        means = np.array([row.mean() if len(row) else np.nan for row in rows])
        return means, np.array([t_interval(row) for row in rows])

    def gain(self, k: int) -> tuple[float, tuple[float, float]]:
        """Active minus random at checkpoint k, paired per rater: mean and 95% interval."""
        i = self.ks.index(k)
        diff = rep_mean(self.rho[1, i] - self.rho[0, i])
        diff = diff[np.isfinite(diff)]
        return (float(diff.mean()) if len(diff) else float("nan")), t_interval(diff)


def _fit(
    design: Design,
    cols: NDArray[np.int64],
    prior: residual.Prior,
    images: NDArray[np.int64],
    target: NDArray[np.float64],
) -> residual.Posterior:
    x = design.matrix(GENERIC, fit=True)  # the stored outputs, as the product's fits see them
    return residual.fit(residual.SufficientStats.from_data(x[np.ix_(images, cols)], target), prior)


def run_curves(
    design: Design,
    split: Split,
    *,
    ks: Sequence[int] = DEFAULT_CHECKPOINTS,
    reps: int = 5,
    method: Method = METHODS_BY_NAME["ours_prior"],
    seed: int = 0,
) -> Curves:
    """Both strategies for every test rater and repetition (checkpoints ascending)."""
    ks = tuple(sorted(ks))
    cols = np.asarray(method.columns, dtype=np.int64)
    priors: dict[tuple[str, int], residual.Prior] = {}
    rho = np.full((len(STRATEGIES), len(ks), len(split.test), reps), np.nan)
    generic = np.full((len(split.test), reps), np.nan)
    for ri, rater in enumerate(split.test):
        images, stars, target = design.rows(rater)
        prior = prior_for(design, split, method, rater, priors) or residual.Prior.zero(len(cols))
        for rep in range(reps):
            order = np.random.default_rng([seed, rater, rep, 7]).permutation(len(images))
            half = len(images) // 2
            pool, test = order[:half], order[half:]
            if len(test) < 5:
                continue
            x_test, g_test = design.x[np.ix_(images[test], cols)], design.generic[images[test]]
            generic[ri, rep] = spearman(stars[test], g_test)
            picked: list[int] = []  # positions into `pool`, in the order they were rated
            post = residual.fit(residual.SufficientStats.empty(len(cols)), prior)
            for ki, k in enumerate(ks):
                if k > len(pool):
                    break
                rest = np.setdiff1d(np.arange(len(pool)), picked)
                new, _ = suggest(post, design.x[np.ix_(images[pool[rest]], cols)], k - len(picked))
                picked.extend(int(i) for i in rest[new])
                chosen = pool[np.asarray(picked)]
                post = _fit(design, cols, prior, images[chosen], target[chosen])
                rho[1, ki, ri, rep] = spearman(stars[test], post.score(g_test, x_test))
                rand = pool[:k]
                rnd = _fit(design, cols, prior, images[rand], target[rand])
                rho[0, ki, ri, rep] = spearman(stars[test], rnd.score(g_test, x_test))
    return Curves(ks, method.name, rho, generic)


def plot_curves(curves: Curves, path: str, title: str) -> None:
    """Writes a PNG: left, each strategy's gain over the generic score (mean and 95% band, paired per
    rater, so the spread between raters does not hide it); right, active minus random with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    ks = np.array(curves.ks)
    for strategy, color in zip(STRATEGIES, ("tab:gray", "tab:blue"), strict=True):
        mean, ci = curves.over_generic(strategy)
        left.plot(ks, mean, marker="o", ms=3, color=color, label=f"{strategy} choice")
        left.fill_between(ks, ci[:, 0], ci[:, 1], color=color, alpha=0.2)
    left.axhline(0.0, color="tab:red", ls="--", lw=1, label="generic only")
    left.set_ylabel("Spearman gain over generic")
    gains = [curves.gain(k) for k in curves.ks]
    right.plot(ks, [g for g, _ in gains], marker="o", ms=3, color="tab:blue")
    right.fill_between(ks, [c[0] for _, c in gains], [c[1] for _, c in gains], color="tab:blue", alpha=0.2)
    right.axhline(0.0, color="black", lw=0.8)
    right.set_ylabel("active − random (Spearman)")
    for ax in (left, right):
        ax.set_xlabel("k (images rated)")
        ax.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
