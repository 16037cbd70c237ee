"""Simulated raters on the shared photos: tastes the models never see directly, on the 1-5 star scale.

No human ratings exist on these machines, so each simulated rater's stars are

    stars = clip(round(1 + 4 * u), 1, 5),   u = generic + offset + strength * taste(image) + noise

with `generic` the generic model's score of the photo (the crowd's score), `taste` a per-rater mix of
(a) the photo's coarse ImageNet group from labels.csv (animals, man-made objects, food, scenery, people
and plants) and (b) pixel statistics (warmth, brightness, saturation), standardized to unit spread over
the photos. Individual tastes scatter around a population taste (people on average like animals and warm,
saturated photos a bit more than the crowd model says), which is what training raters can teach the
population prior. Four kinds of raters: `none` (crowd score + noise: personalization can only add noise),
`content`, `pixels` and `mixed`; strengths and noise levels vary per rater.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from piaa_personalization.evaluation.datasets import Ratings
from piaa_personalization.evaluation.features import PIXEL_STATS, ImageFeatures

KINDS: tuple[str, ...] = ("none", "content", "pixels", "mixed")
GROUPS: dict[str, tuple[tuple[int, int], ...]] = {
    "animals": ((0, 397),),
    "man-made": ((398, 923), (999, 999)),
    "food": ((924, 969),),
    "scenery": ((970, 980),),
    "people+plants": ((981, 998),),
}
"""Coarse ImageNet-1k groups (inclusive index ranges, WordNet order); every class is in exactly one."""
POPULATION_GROUP_TASTE = np.array([0.5, -0.4, 0.3, 0.5, 0.0])
POPULATION_PIXEL_TASTE = np.array([0.4, 0.2, 0.3])
"""The population's average taste beyond the crowd score, in units of each rater's own spread."""


@dataclass(frozen=True)
class SimConfig:
    """How many raters of which spread (unit rating scale: 0.25 = one star)."""

    n_test: int = 60
    """Tested raters, split evenly over KINDS."""
    n_train: int = 60
    """Raters that only teach the population prior (same distribution)."""
    strength: tuple[float, float] = (0.05, 0.15)
    """Range of a rater's taste strength (std of the taste term); the crowd score's std is ~0.14."""
    noise: tuple[float, float] = (0.05, 0.2)
    """Range of a rater's noise std (0.2 to 0.8 stars)."""
    seed: int = 0


@dataclass(frozen=True)
class SimRater:
    """One simulated rater: id, kind, taste strength, noise std, and whether it is tested."""

    id: str
    kind: str
    strength: float
    noise: float
    test: bool
    ideal: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)
    """The rater's noise-free score of every photo, generic + offset + strength * taste (what an oracle
    that knows the rater's taste ranks by)."""


def group_matrix(imagenet_index: Sequence[int]) -> NDArray[np.float64]:
    """One-hot [N, len(GROUPS)] of each photo's coarse group. Raises ValueError outside 0..999."""
    out = np.zeros((len(imagenet_index), len(GROUPS)))
    for i, cls in enumerate(imagenet_index):
        hits = [g for g, ranges in enumerate(GROUPS.values()) if any(lo <= cls <= hi for lo, hi in ranges)]
        if len(hits) != 1:
            raise ValueError(f"ImageNet index {cls} is outside 0..999")
        out[i, hits[0]] = 1.0
    return out


def _standardize(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-9)


def simulate(
    features: ImageFeatures, imagenet_index: Sequence[int], paths: Sequence[Path], config: SimConfig
) -> tuple[Ratings, list[SimRater]]:
    """Every rater rates every photo. Returns the ratings (test raters first) and the raters."""
    if not (len(features) == len(imagenet_index) == len(paths)):
        raise ValueError("features, labels and paths must describe the same photos")
    rng = np.random.default_rng(config.seed)
    groups = group_matrix(imagenet_index)
    pixels = _standardize(features.pixels)
    generic = features.heads.generic.astype(np.float64)
    raters: list[SimRater] = []
    rows: list[tuple[str, Path, float]] = []
    for n, test in ((config.n_test, True), (config.n_train, False)):
        for i in range(n):
            kind = KINDS[i % len(KINDS)]
            a = rng.normal(POPULATION_GROUP_TASTE, 1.0) * (kind in ("content", "mixed"))
            b = rng.normal(POPULATION_PIXEL_TASTE, 1.0) * (kind in ("pixels", "mixed"))
            taste = groups @ a + pixels @ b
            spread = taste.std()
            taste = taste / spread if spread > 0 else taste
            strength = float(rng.uniform(*config.strength)) if kind != "none" else 0.0
            noise = float(rng.uniform(*config.noise))
            ideal = generic + rng.uniform(-0.1, 0.1) + strength * taste
            u = ideal + rng.normal(0.0, noise, len(generic))  # the same draws, in the same order, as ever
            stars = np.clip(np.rint(1.0 + 4.0 * u), 1, 5)
            rater = SimRater(
                f"{'test' if test else 'train'}-{i:03d}-{kind}", kind, strength, noise, test, ideal
            )
            raters.append(rater)
            rows.extend((rater.id, p, float(s)) for p, s in zip(paths, stars, strict=True))
    return Ratings.from_rows(rows), raters


__all__ = ["KINDS", "PIXEL_STATS", "SimConfig", "SimRater", "group_matrix", "simulate"]
