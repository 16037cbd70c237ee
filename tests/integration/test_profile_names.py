"""Taste in words through the real stack: GetProfile and `piaa profile` name content clusters, not numbers."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from piaa_client import Client, cli
from piaa_client.features import CONTENT_CLUSTER_NAMES, CONTENT_NAMES
from piaa_client.types import Rating
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import Photo


def test_a_liked_cluster_is_named_in_the_profile_and_the_cli(
    gateway: GatewayProcess, photos: list[Photo], capsys: pytest.CaptureFixture[str]
) -> None:
    user = f"names-{uuid.uuid4().hex[:8]}"
    sample = photos[::5][:120]
    with Client(gateway.address, timeout=120.0) as client:
        scores = [
            s
            for start in range(0, len(sample), 60)  # the gateway takes at most 64 images per call
            for s in client.score(user, [p.path for p in sample[start : start + 60]], generic_only=True)
        ]
        cluster = np.array([int(np.argmax(s.content)) for s in scores])
        liked = int(np.bincount(cluster).argmax())
        # 5 stars for the liked cluster's photos, 1 for the others: a taste no evidence can miss
        ratings = [Rating(p.path, 5.0 if c == liked else 1.0) for p, c in zip(sample, cluster, strict=True)]
        for start in range(0, len(ratings), 60):
            client.add_ratings(user, ratings[start : start + 60])
        profile = client.get_profile(user)
    content = [w.name for w in profile.weights if w.name.startswith("content:")]
    assert content == list(CONTENT_NAMES)
    assert f"content:{CONTENT_CLUSTER_NAMES[liked]}" in [f.name for f in profile.likes]
    assert not any(f.name[len("content:") :].isdigit() for f in profile.likes + profile.dislikes)

    assert cli.main(["profile", "--server", gateway.address, "--user", user]) == 0
    out = capsys.readouterr().out
    likes_line = next(line for line in out.splitlines() if line.startswith("likes:"))
    assert f"content:{CONTENT_CLUSTER_NAMES[liked]} (+" in likes_line
    with Client(gateway.address) as client:
        client.delete_profile(user)
