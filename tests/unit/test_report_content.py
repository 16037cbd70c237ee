"""The album report's content section: each cluster's readable name with the album's surest examples."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from piaa_client.features import CONTENT_CLUSTER_NAMES, FEATURE_SPACE_VERSION, NUM_CONTENT_CLUSTERS
from piaa_client.report import album_report, content_examples
from piaa_client.types import ImageError, ImageScore, Profile


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def scored(name: str, cluster: int, sureness: float) -> ImageScore:
    content = np.full(NUM_CONTENT_CLUSTERS, (1 - sureness) / (NUM_CONTENT_CLUSTERS - 1))
    content[cluster] = sureness
    return ImageScore(name, "0" * 64, 0.5, 0.5, {}, tuple(content), True, None)


def profile(fs: str = FEATURE_SPACE_VERSION) -> Profile:
    return Profile("alice", True, 12, fs, 0.0, [], [], [])


def test_examples_are_grouped_by_cluster_surest_first() -> None:
    album = [scored(f"p{i}", i % 3, 0.5 + 0.05 * i) for i in range(9)]
    failed = ImageScore(
        "broken", "", 0.0, 0.0, {}, (), False, None, ImageError("INVALID_ARGUMENT", "not an image")
    )
    groups = content_examples([*album, failed], per_cluster=2)
    assert [name for name, _ in groups] == list(CONTENT_CLUSTER_NAMES[:3])
    assert [[s.id for s in members] for _, members in groups] == [["p6", "p3"], ["p7", "p4"], ["p8", "p5"]]


def test_the_report_names_the_clusters_and_shows_their_photos() -> None:
    album = [scored(f"p{i}", 4 if i < 5 else 0, 0.9 - 0.01 * i) for i in range(7)]
    images = {s.id: jpeg(i) for i, s in enumerate(album)}
    page = album_report("alice", album, images, profile())
    section = page.split("Content in this album")[1].split("<h2>")[0]
    assert (
        f"content:{CONTENT_CLUSTER_NAMES[0]}" in section and f"content:{CONTENT_CLUSTER_NAMES[4]}" in section
    )
    assert section.count("<img") == 4 + 2  # at most four of cluster 4's five photos, both of cluster 0's
    assert 'alt="p4"' not in section  # cluster 4's least sure photo is left out
    # without the photos' bytes, or for another feature space's profile, there is nothing to show
    assert "Content in this album" not in album_report("alice", album, {}, profile())
    assert "Content in this album" not in album_report("alice", album, images, profile("fs0"))
