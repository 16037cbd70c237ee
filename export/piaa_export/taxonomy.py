"""Coarse semantic groups of the ImageNet-1k classes, to measure how pure the content clusters are.

The shared photos hold one photo per class (800 classes), so purity against the classes themselves
is meaningless; the groups below follow the WordNet order of the ImageNet-1k index (animals by
family, then artefacts in alphabetical order, then food, scenery, people, plants and fungi).
"""

from __future__ import annotations

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
