"""The feature space: names, order, shapes and version of every model output, defined once.

The Triton model repository, the exporter, the gateway and the client all read these constants, so a
renamed or reordered output cannot drift between them. Bump FEATURE_SPACE_VERSION whenever the
heads are retrained: profiles fitted in another version are never applied.
"""

from __future__ import annotations

from dataclasses import dataclass

FEATURE_SPACE_VERSION = "fs1"
"""Version of the heads' output space; stored with every profile."""

IMAGE_SIZE = 224
"""Side of the square RGB image the backbone takes."""

BACKBONE_FEATURE_DIM = 1280
"""Width of EfficientNet-Lite0's pooled feature."""

IMAGENET_CLASSES = 1000

ATTRIBUTES: tuple[str, ...] = (
    "BalancingElements",
    "ColorHarmony",
    "Content",
    "DoF",
    "Light",
    "Object",
    "Repetition",
    "RuleOfThirds",
    "Symmetry",
    "VividColor",
)
"""The 10 AADB attributes, in output order."""

NUM_CONTENT_CLUSTERS = 10
"""Content clusters found by k-means on the backbone's features (no labels)."""

EMBEDDING_DIM = 64
"""Width of the compact projection of the backbone feature."""


@dataclass(frozen=True)
class Output:
    """One tensor of the models: its name, its per-image shape and its element type (a numpy dtype name)."""

    name: str
    dims: tuple[int, ...]
    dtype: str = "float32"


GENERIC = Output("generic", (1,))
ATTRIBUTES_OUTPUT = Output("attributes", (len(ATTRIBUTES),))
CONTENT = Output("content", (NUM_CONTENT_CLUSTERS,))
EMBEDDING = Output("embedding", (EMBEDDING_DIM,))

HEAD_OUTPUTS: tuple[Output, ...] = (GENERIC, ATTRIBUTES_OUTPUT, CONTENT, EMBEDDING)
"""What the heads model (and so the ensemble) returns per image, in this order."""

BACKBONE_INPUT = Output("image", (3, IMAGE_SIZE, IMAGE_SIZE), "uint8")
"""The decoded photo, RGB 0..255, resized and centre-cropped: 150 kB per image between the preprocess and the
backbone (float32 pixels would be 602 kB); the backbone normalizes it as its first operation."""
BACKBONE_FEATURE = Output("feature", (BACKBONE_FEATURE_DIM,))
BACKBONE_LOGITS = Output("logits", (IMAGENET_CLASSES,))
ENSEMBLE_INPUT = Output("image_bytes", (1,))
"""The ensemble's input: one encoded image (BYTES) per batch item."""

CONTENT_CLUSTER_NAMES: tuple[str, ...] = (
    "dogs/other mammals",
    "birds/invertebrates",
    "artefacts (swing, library)",
    "artefacts (Christmas stocking, running shoe)",
    "food/artefacts",
    "artefacts (catamaran, pinwheel)",
    "other mammals",
    "artefacts (holster, iron)",
    "artefacts (scoreboard, oscilloscope)",
    "artefacts/dogs",
)
"""Readable names of the content clusters, in output order, for this feature space: made by the training
that made the clusters (from the ImageNet classes the backbone's classifier sees in each cluster's photos)
and recorded in the heads' manifest.json as `content_names`; a test keeps the two equal. A release in another
space carries its own names (heads metadata and model config `content_names`, e.g. the named ImageNet
groups), and the gateway's GetProfile names that space's content features with them."""
CONTENT_NAMES: tuple[str, ...] = tuple(f"content:{name}" for name in CONTENT_CLUSTER_NAMES)
"""The content features' names ('content:<cluster name>'), as profiles and GetProfile show them."""
PAPER_FEATURES: tuple[str, ...] = ATTRIBUTES + CONTENT_NAMES
"""The paper's 20 personalization features: the attributes, then the content probabilities."""
