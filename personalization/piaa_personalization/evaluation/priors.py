"""Which prior a tenant should start from: zero, a shipped default, or its own users' after N enrolled.

The same tested raters and draws as the report, personalized with `ours_prior` under priors learned from
(a) nobody (the zero prior: a new tenant without a shipped default), (b) 60 raters of *another* simulated
population (seed + 1: what a default shipped with the product would be, learned elsewhere), and (c) the
tenant's own first N training raters, as the gateway's background relearning would learn it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from piaa_personalization.evaluation import protocol
from piaa_personalization.evaluation.datasets import Ratings
from piaa_personalization.evaluation.features import ImageFeatures
from piaa_personalization.evaluation.report import verdict
from piaa_personalization.evaluation.simulate import SimConfig, simulate

DEFAULT_SIZES = (5, 10, 20, 40, 60)
"""Enrolled users the tenant's own prior is learned from, in the study."""


def _rows(ratings: Ratings, prefix: str = "") -> list[tuple[str, Path, float]]:
    return [
        (prefix + ratings.raters[r], ratings.images[i], float(s))
        for r, i, s in zip(ratings.rater, ratings.image, ratings.stars, strict=True)
    ]


def prior_study(
    feats: ImageFeatures,
    imagenet_index: Sequence[int],
    paths: Sequence[Path],
    config: SimConfig,
    *,
    ks: Sequence[int] = (10, 100),
    reps: int = 10,
    sizes: Sequence[int] = DEFAULT_SIZES,
) -> str:
    """The markdown table: per prior, the gain over generic at each k (all tested raters, 95% CI) and on
    the `none` raters at the first k. Raises ValueError when a size exceeds config.n_train."""
    if any(n > config.n_train for n in sizes):
        raise ValueError(f"sizes {tuple(sizes)} exceed the {config.n_train} training raters")
    ratings, raters = simulate(feats, imagenet_index, paths, config)
    elsewhere, _ = simulate(feats, imagenet_index, paths, replace(config, n_test=0, seed=config.seed + 1))
    combined = Ratings.from_rows(_rows(ratings) + _rows(elsewhere, "default-"))
    design = protocol.Design.build(feats.heads, combined)
    ids = combined.raters
    test = tuple(i for i, rid in enumerate(ids) if rid.startswith("test-"))
    train = [i for i, rid in enumerate(ids) if rid.startswith("train-")]  # kinds in turn: balanced prefixes
    default = tuple(i for i, rid in enumerate(ids) if rid.startswith("default-"))
    kind = {r.id: r.kind for r in raters}
    none = np.array([kind[ids[i]] == "none" for i in test])
    variants = [
        ("zero (nobody)", protocol.Split((), test)),
        (f"shipped default: {len(default)} raters of another population", protocol.Split(default, test)),
        *((f"the tenant's own first {n} users", protocol.Split(tuple(train[:n]), test)) for n in sizes),
    ]
    methods = (protocol.GENERIC, protocol.METHODS_BY_NAME["ours_prior"])
    head = (
        "| prior | " + " | ".join(f"gain at k = {k} [95% CI]" for k in ks) + f" | none raters, k = {ks[0]} |"
    )
    out = [head, "|---" * (len(ks) + 2) + "|"]
    for label, split in variants:
        result = protocol.run(design, split, ks=ks, reps=reps, methods=methods, seed=config.seed)
        rows = {s.k: s for s in protocol.summarize(result) if s.method == "ours_prior"}
        (crowd,) = [s for s in protocol.summarize(result, none) if s.method == "ours_prior" and s.k == ks[0]]
        cells = [f"{rows[k].gain:.3f} [{rows[k].gain_ci[0]:.3f}, {rows[k].gain_ci[1]:.3f}]" for k in ks]
        cells.append(f"{crowd.gain:.3f} {verdict(crowd.gain_ci)}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)
