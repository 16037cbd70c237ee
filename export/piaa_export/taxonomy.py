"""Coarse semantic groups of the ImageNet-1k classes: how pure the content clusters are, and their names.

The shared photos hold one photo per class (800 classes), so purity against the classes themselves
is meaningless; the groups below follow the WordNet order of the ImageNet-1k index (animals by
family, then artefacts in alphabetical order, then food, scenery, people, plants and fungi).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

COARSE_GROUPS: dict[str, tuple[tuple[int, int], ...]] = {
    "fish": ((0, 6), (389, 397)),
    "birds": ((7, 24), (80, 100), (127, 146)),
    "reptiles+amphibians": ((25, 68),),
    "invertebrates": ((69, 79), (107, 126), (300, 329)),
    "dogs": ((151, 268),),
    "other mammals": ((101, 106), (147, 150), (269, 299), (330, 388)),
    "artefacts": ((398, 923), (999, 999)),
    "food": ((924, 969),),
    "scenery": ((970, 980),),
    "people+plants+fungi": ((981, 998),),
}
"""Group → inclusive ImageNet-1k index ranges; every index 0..999 is in exactly one group."""

GROUP_NAMES = tuple(COARSE_GROUPS)


def group_matrix(classes: int = 1000) -> np.ndarray:
    """[classes, groups] float32 0/1 matrix: row c has a 1 in the column of class c's group."""
    matrix = np.zeros((classes, len(GROUP_NAMES)), dtype=np.float32)
    for c in range(classes):
        matrix[c, coarse_group(c)] = 1.0
    return matrix


def group_probabilities(logits: np.ndarray) -> np.ndarray:
    """[N, groups] float64: the softmax of the classifier's logits [N, 1000], summed within each group
    (the named-group content: what a `--content groups` release's heads compute, and the evaluation's)."""
    shifted = np.asarray(logits, dtype=np.float64)
    prob = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    return np.asarray(prob @ group_matrix(prob.shape[1]).astype(np.float64), dtype=np.float64)


def coarse_group(imagenet_index: int) -> int:
    """Index into GROUP_NAMES of an ImageNet-1k class. Raises ValueError outside 0..999."""
    for g, ranges in enumerate(COARSE_GROUPS.values()):
        if any(lo <= imagenet_index <= hi for lo, hi in ranges):
            return g
    raise ValueError(f"ImageNet index {imagenet_index} is outside 0..999")


def purity_report(clusters: np.ndarray, imagenet_index: np.ndarray) -> dict[str, Any]:
    """Purity of clusters against the coarse groups: the share of photos in their cluster's majority group.

    Also gives the purity of a labelling that ignores the photos (every photo in the largest group), so
    the number can be read against chance, and each cluster's size and majority group.
    """
    groups = np.array([coarse_group(int(i)) for i in imagenet_index])
    per_cluster = []
    majority_total = 0
    for k in np.unique(clusters):
        members = groups[clusters == k]
        counts = np.bincount(members, minlength=len(GROUP_NAMES))
        top = int(np.argmax(counts))
        majority_total += int(counts[top])
        per_cluster.append(
            {
                "cluster": int(k),
                "size": len(members),
                "majority_group": GROUP_NAMES[top],
                "majority_share": round(float(counts[top] / len(members)), 3),
            }
        )
    overall = np.bincount(groups, minlength=len(GROUP_NAMES))
    return {
        "purity": float(majority_total / len(groups)),
        "chance_purity": float(overall.max() / len(groups)),
        "group_sizes": {GROUP_NAMES[g]: int(c) for g, c in enumerate(overall) if c},
        "clusters": per_cluster,
    }


def cluster_names(
    clusters: np.ndarray, logits: np.ndarray, class_names: Mapping[int, str], k: int
) -> tuple[str, ...]:
    """A readable name per content cluster, from what the backbone's own ImageNet classifier sees in it.

    clusters [N]: each photo's cluster (0..k-1); logits [N, 1000]: the classifier's logits of the same
    photos; class_names: ImageNet index → name for the classes that have one (others are never quoted).
    A cluster is named by the coarse group holding most of its photos' summed class probability
    ("dogs"), by its two leading groups when none holds half ("dogs/other mammals"), and, when another
    cluster has the same name, by its two most probable named classes as well ("artefacts (swing,
    library)"). An empty cluster is "cluster <i>". Returns k distinct names.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(shifted)
    prob /= prob.sum(axis=1, keepdims=True)
    to_group = group_matrix(prob.shape[1]).astype(np.float64)
    named = np.array([c in class_names for c in range(prob.shape[1])])
    base, detail = [], []
    for i in range(k):
        mass = prob[clusters == i].sum(axis=0)
        if mass.sum() == 0:
            base.append(f"cluster {i}")
            detail.append("")
            continue
        share = mass @ to_group / mass.sum()
        first, second = np.argsort(-share, kind="stable")[:2]
        base.append(
            GROUP_NAMES[first] if share[first] >= 0.5 else f"{GROUP_NAMES[first]}/{GROUP_NAMES[second]}"
        )
        top = [int(c) for c in np.argsort(-np.where(named, mass, -1.0), kind="stable")[:2] if named[c]]
        detail.append(", ".join(class_names[c].replace("_", " ") for c in top))
    names = [f"{b} ({d})" if base.count(b) > 1 and d else b for b, d in zip(base, detail, strict=True)]
    # still equal (the same leading classes, or none named): numbered
    return tuple(f"{name} #{i}" if names.count(name) > 1 else name for i, name in enumerate(names))
