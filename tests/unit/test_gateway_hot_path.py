"""The hot path's shortcuts give what the general path gives: one user's scores, ImageScore messages."""

from __future__ import annotations

import numpy as np
import pytest

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.features import ATTRIBUTES
from piaa_personalization.api import servicer
from piaa_personalization.core import personalizer
from piaa_personalization.core.types import ImageAnalysis, Scored
from piaa_personalization.model.residual import PACKED_DIM
from piaa_personalization.store.format import Profile


def heads(n: int, seed: int = 0) -> list[personalizer.Head]:
    rng = np.random.default_rng(seed)
    return [personalizer.Head(rng.uniform(0, 1, PACKED_DIM).astype(np.float32)) for _ in range(n)]


@pytest.mark.parametrize("with_embedding", [False, True])
@pytest.mark.parametrize("n", [1, 8, 33])
def test_one_users_rows_score_exactly_as_the_pairs_do(n: int, with_embedding: bool) -> None:
    d = personalizer.layout(with_embedding).dim
    rng = np.random.default_rng(n)
    profile = Profile("default", "u", "fs1/x", rng.normal(0, 0.05, d).astype(np.float32), 5, 5, 5, 1, 0.0)
    hs = heads(n, seed=n)
    expected = personalizer.personalize(hs, [profile] * n, with_embedding)
    got = personalizer.personalize_rows(hs, profile, with_embedding)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert np.count_nonzero((got > 0) & (got < 1)) > 0  # not every score clipped: the test can fail


def naive(s: Scored) -> pb.ImageScore:
    a = s.analysis
    return pb.ImageScore(
        id=a.id,
        digest=a.digest,
        score=s.score,
        generic_score=a.head.generic,
        attributes=[
            pb.Attribute(name=n, value=float(v)) for n, v in zip(ATTRIBUTES, a.head.attributes, strict=True)
        ],
        content=[float(c) for c in a.head.content],
        personalized=s.personalized,
        fallback_reason=servicer._reason(s.reason),
    )


def test_image_scores_built_from_the_per_image_template_equal_the_plain_ones() -> None:
    first, second = heads(2, seed=7)
    digest = "ab" * 32
    cases = [
        Scored(ImageAnalysis("a", digest, first), 0.25, True, None),
        Scored(ImageAnalysis("b", digest, first), 0.5, False, "no_profile"),  # the template, reused
        Scored(ImageAnalysis("", digest, first), 0.75, False, "disabled"),
        Scored(ImageAnalysis("c", digest, second), 0.5, True, None),  # same digest, another Head
    ]
    for s in cases:
        assert servicer._image_score(s) == naive(s)
    assert servicer._image_score(cases[3]).generic_score != servicer._image_score(cases[0]).generic_score


def test_remembered_metric_children_count_into_the_exposition() -> None:
    from piaa_personalization.core.metrics import Metrics

    metrics = Metrics()
    hit = metrics.feature_cache.labels("hit")
    assert metrics.feature_cache.labels("hit") is hit  # looked up once
    assert metrics.feature_cache.labels(result="hit") is not None  # by name: prometheus_client's own path
    for _ in range(3):
        metrics.feature_cache.labels("hit").inc()
    metrics.feature_cache.labels("miss").inc(2)
    metrics.stage_seconds.labels("personalize").observe(0.002)
    text = metrics.expose().decode()
    assert 'piaa_feature_cache_lookups_total{result="hit"} 3.0' in text
    assert 'piaa_feature_cache_lookups_total{result="miss"} 2.0' in text
    assert 'piaa_stage_seconds_count{stage="personalize"} 1.0' in text
