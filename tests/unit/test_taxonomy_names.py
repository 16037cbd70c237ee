"""Content-cluster names from the classifier's view of each cluster, and the names the heads ship with."""

from __future__ import annotations

import json

import numpy as np

from piaa_client.features import CONTENT_CLUSTER_NAMES, CONTENT_NAMES, NUM_CONTENT_CLUSTERS
from piaa_export.sources import MANIFEST_FILE
from piaa_export.taxonomy import GROUP_NAMES, cluster_names, coarse_group


def confident_logits(classes: list[int]) -> np.ndarray:
    """Logits of a classifier sure of each photo's class."""
    logits = np.zeros((len(classes), 1000))
    logits[np.arange(len(classes)), classes] = 20.0
    return logits


def test_a_cluster_is_named_by_its_group_or_its_two_leading_groups() -> None:
    dogs, cats, birds = [151, 152, 153], [281, 282], [7, 8]
    classes = dogs + birds + dogs[:2] + cats[:2]
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    names = cluster_names(clusters, confident_logits(classes), {}, 3)
    assert names[0] == GROUP_NAMES[coarse_group(151)] == "dogs"
    assert names[1] == "birds"
    assert names[2] in ("dogs/other mammals", "other mammals/dogs")  # 50/50: neither holds more than half


def test_look_alike_clusters_are_told_apart_by_their_leading_classes() -> None:
    classes = [817, 817, 511, 559, 559, 404]  # sports car x2, convertible; folding chair x2, airliner
    clusters = np.array([0, 0, 0, 1, 1, 1])
    known = {817: "sports_car", 511: "convertible", 559: "folding_chair", 404: "airliner"}
    names = cluster_names(clusters, confident_logits(classes), known, 3)
    assert names[0] == "artefacts (sports car, convertible)"
    assert names[1] == "artefacts (folding chair, airliner)"
    assert names[2] == "cluster 2"  # no photos
    assert len(set(names)) == 3
    # without class names the look-alikes are numbered, still distinct
    bare = cluster_names(clusters, confident_logits(classes), {}, 2)
    assert bare == ("artefacts #0", "artefacts #1")


def test_the_served_names_are_the_ones_training_made() -> None:
    manifest = json.loads(MANIFEST_FILE.read_text())
    assert tuple(manifest["content_names"]) == CONTENT_CLUSTER_NAMES
    assert manifest["metrics"]["content"]["names"] == manifest["content_names"]
    assert len(set(CONTENT_CLUSTER_NAMES)) == NUM_CONTENT_CLUSTERS
    assert tuple(f"content:{n}" for n in CONTENT_CLUSTER_NAMES) == CONTENT_NAMES
