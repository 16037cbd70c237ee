"""The protocol against a running gateway: AddRatings with the k train images, Score on the rest.

This measures the product end to end (decode, Triton's heads, the store, the fit the gateway runs, its
prior and layout), with the same draws as protocol.run, so the live number can be set next to the
in-process one. Each (rater, k, repetition) is its own user id, deleted once scored. teach_prior()
gives a fresh tenant the population prior learned from the training raters, as an operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

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
from piaa_personalization.model.residual import PRIOR_FIT, FeatureLayout, HeadOutputs, Prior, RatingScale
from piaa_personalization.store.format import RatingRecord

LIVE = Method("live", "gateway: AddRatings + Score", (0,))
"""The live row: whatever the gateway serves (its layout, its tenant's prior)."""
CHUNK = 64
"""Images per Score or AddRatings call: the gateway's default max_images_per_request."""


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
                rated = [
                    t.Rating(data.setdefault(p, p.read_bytes()), float(s), "stars")
                    for p, s in zip((ratings.images[i] for i in images[tr]), stars[tr], strict=True)
                ]
                for start in range(0, len(rated), CHUNK):  # as many calls as the request limit needs
                    client.add_ratings(user, rated[start : start + CHUNK])
                scores = _score(client, user, [ratings.images[i] for i in images[te]], data)
                client.delete_profile(user)
                for s in scores:
                    key = "personalized" if s.personalized else str(s.fallback_reason)
                    reasons[key] = reasons.get(key, 0) + 1
                rho[0, ki, ri, rep] = spearman(stars[te], np.array([s.generic_score for s in scores]))
                rho[1, ki, ri, rep] = spearman(stars[te], np.array([s.score for s in scores]))
    result = ProtocolResult((GENERIC, LIVE), tuple(ks), tuple(ratings.raters[r] for r in split.test), rho)
    return result, reasons


async def _teach(
    redis_url: str,
    tenant: str,
    ratings: Ratings,
    packed: NDArray[np.float32],
    raters: Sequence[int],
    *,
    with_embedding: bool,
    user_prefix: str,
) -> int:
    from piaa_personalization.store.redis_store import RedisProfileStore, StoreConfig

    store = RedisProfileStore(StoreConfig(url=redis_url))
    layout = FeatureLayout(with_embedding)
    digests: dict[int, str] = {}
    try:
        for r in raters:
            images, stars = ratings.of(r)
            records = [
                RatingRecord(
                    digest=digests.setdefault(
                        int(i), hashlib.sha256(ratings.images[i].read_bytes()).hexdigest()
                    ),
                    value=float(s),
                    scale=RatingScale.STARS_1_5,
                    outputs=packed[i],
                )
                for i, s in zip(images, stars, strict=True)
            ]
            user = f"{user_prefix}{ratings.raters[r]}"
            await store.add_ratings(tenant, user, records, layout=layout, prior=Prior.zero(layout.dim))
        prior = await store.learn_prior(tenant, layout, hyper=PRIOR_FIT)
    finally:
        await store.close()
    return prior.n_users


def teach_prior(
    redis_url: str,
    tenant: str,
    ratings: Ratings,
    heads: HeadOutputs,
    raters: Sequence[int],
    *,
    with_embedding: bool = False,
    user_prefix: str = "eval-train-",
) -> int:
    """Enrolls the training raters in `tenant` straight through the profile store (their head outputs
    from `heads`, the in-process cache: the gateway is spared tens of thousands of ratings) and learns
    the tenant's population prior as `store_tools learn-prior` does; returns how many raters it learned from.

    Use a tenant the gateway has not served in the last minute: it caches a tenant's prior for 60 s.
    `with_embedding` must match the gateway's --with-embedding."""
    packed = heads.packed()
    return asyncio.run(
        _teach(
            redis_url, tenant, ratings, packed, raters, with_embedding=with_embedding, user_prefix=user_prefix
        )
    )
