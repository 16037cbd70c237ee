"""The protocol against a running gateway: AddRatings with the k train images, Score on the rest.

This measures the product end to end (decode, Triton's heads, the store, the fit the gateway runs, its
prior and layout), with the same draws as protocol.run, so the live number can be set next to the
in-process one. Each (rater, k, repetition) is its own user id, deleted once scored.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from piaa_client import types as t
from piaa_client.client import Client
from piaa_personalization.evaluation.datasets import Ratings
from piaa_personalization.evaluation.protocol import (
    GENERIC,
    MIN_TEST_IMAGES,
    Method,
    ProtocolResult,
    Split,
    spearman,
)

LIVE = Method("live", "gateway: AddRatings + Score", (0,))
"""The live row: whatever the gateway serves (its layout, its tenant's prior)."""
CHUNK = 64
"""Images per Score call: the gateway's default max_images_per_request."""


def _score(client: Client, user: str, paths: Sequence[Path], cache: dict[Path, bytes]) -> list[t.ImageScore]:
    out: list[t.ImageScore] = []
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        out.extend(client.score(user, [cache.setdefault(p, p.read_bytes()) for p in chunk]))
    return out


def run_live(
    client: Client,
    ratings: Ratings,
    split: Split,
    *,
    ks: Sequence[int] = (10, 100),
    reps: int = 10,
    seed: int = 0,
    user_prefix: str | None = None,
) -> tuple[ProtocolResult, dict[str, int]]:
    """rho[(generic, live), k, rater, rep] through the gateway, plus counts of how the replies were
    personalized ({'personalized': n, '<fallback reason>': n}, per scored image). The draws equal
    protocol.run's for the same seed. Raises piaa_client errors as the client does."""
    prefix = user_prefix or f"eval-{uuid.uuid4().hex[:8]}-"
    data: dict[Path, bytes] = {}
    rho = np.full((2, len(ks), len(split.test), reps), np.nan)
    reasons: dict[str, int] = {}
    for ri, rater in enumerate(split.test):
        images, stars = ratings.of(rater)
        for ki, k in enumerate(ks):
            if len(images) < k + MIN_TEST_IMAGES:
                continue
            for rep in range(reps):
                order = np.random.default_rng([seed, rater, k, rep]).permutation(len(images))
                tr, te = order[:k], order[k:]
                user = f"{prefix}{ratings.raters[rater]}-k{k}-r{rep}"
                client.add_ratings(
                    user,
                    [
                        t.Rating(data.setdefault(p, p.read_bytes()), float(s), "stars")
                        for p, s in zip((ratings.images[i] for i in images[tr]), stars[tr], strict=True)
                    ],
                )
                scores = _score(client, user, [ratings.images[i] for i in images[te]], data)
                client.delete_profile(user)
                for s in scores:
                    key = "personalized" if s.personalized else str(s.fallback_reason)
                    reasons[key] = reasons.get(key, 0) + 1
                rho[0, ki, ri, rep] = spearman(stars[te], np.array([s.generic_score for s in scores]))
                rho[1, ki, ri, rep] = spearman(stars[te], np.array([s.score for s in scores]))
    result = ProtocolResult((GENERIC, LIVE), tuple(ks), tuple(ratings.raters[r] for r in split.test), rho)
    return result, reasons
