"""The heads: one small torch module, pooled feature [N,1280] → generic, attributes, content, embedding.

- generic    = sigmoid(f·w + b)                        the aesthetics score in [0, 1]
- attributes = clamp(f·W + b, -1, 1)                   the 10 AADB attributes on AADB's [-1, 1] scale
- content    = softmax(-‖z - c_k‖² / T), z = f / ‖f‖    soft assignment to K k-means centroids
- embedding  = P (z - μ)                               a fixed projection (PCA of z) to EMBEDDING_DIM

The weights live in one .npz (HeadWeights); the ONNX heads model is exported from this module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from piaa_client.features import ATTRIBUTES, BACKBONE_FEATURE_DIM, EMBEDDING_DIM, NUM_CONTENT_CLUSTERS
from piaa_export.exceptions import WeightsError
from piaa_export.sources import HEADS_FILE

NORM_EPS = 1e-6
"""Keeps the L2 normalization finite for an all-zero feature."""


@dataclass(frozen=True)
class HeadWeights:
    """Every parameter of the heads, as float32 arrays with the shapes checked by validate()."""

    generic_w: np.ndarray  # [D]
    generic_b: np.ndarray  # []
    attributes_w: np.ndarray  # [A, D]
    attributes_b: np.ndarray  # [A]
    centroids: np.ndarray  # [K, D], unit rows (k-means on L2-normalized features)
    temperature: np.ndarray  # [] > 0
    embedding_mean: np.ndarray  # [D]
    embedding_proj: np.ndarray  # [E, D]

    def validate(self) -> HeadWeights:
        """Returns self; raises WeightsError when a shape differs from the feature-space spec."""
        d, a, k, e = BACKBONE_FEATURE_DIM, len(ATTRIBUTES), NUM_CONTENT_CLUSTERS, EMBEDDING_DIM
        want = {
            "generic_w": (d,),
            "generic_b": (),
            "attributes_w": (a, d),
            "attributes_b": (a,),
            "centroids": (k, d),
            "temperature": (),
            "embedding_mean": (d,),
            "embedding_proj": (e, d),
        }
        for name, shape in want.items():
            got = getattr(self, name).shape
            if got != shape:
                raise WeightsError(f"head weight {name} has shape {got}, the feature space needs {shape}")
            if not np.all(np.isfinite(getattr(self, name))):
                raise WeightsError(f"head weight {name} is not finite")
        if float(self.temperature) <= 0:
            raise WeightsError(f"content temperature must be > 0, got {float(self.temperature)}")
        return self

    def save(self, path: Path) -> None:
        """Writes the weights as an uncompressed .npz (byte-identical for identical weights)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: np.asarray(getattr(self, f.name), dtype=np.float32) for f in fields(self)}
        with path.open("wb") as out:
            np.savez(out, **arrays)

    @classmethod
    def load(cls, path: Path = HEADS_FILE) -> HeadWeights:
        """Reads and validates weights written by save(). Raises WeightsError."""
        if not path.exists():
            raise WeightsError(f"head weights not found at {path}")
        with np.load(path) as data:
            missing = {f.name for f in fields(cls)} - set(data.files)
            if missing:
                raise WeightsError(f"{path} lacks {sorted(missing)}")
            return cls(**{f.name: data[f.name].astype(np.float32) for f in fields(cls)}).validate()


class Heads(nn.Module):
    """feature [N,1280] → (generic [N,1], attributes [N,10], content [N,10], embedding [N,64])."""

    generic_w: torch.Tensor
    generic_b: torch.Tensor
    attributes_w: torch.Tensor
    attributes_b: torch.Tensor
    centroids_t: torch.Tensor
    centroids_sq: torch.Tensor
    inv_temperature: torch.Tensor
    embedding_mean: torch.Tensor
    embedding_proj_t: torch.Tensor

    def __init__(self, weights: HeadWeights) -> None:
        super().__init__()
        w = weights.validate()

        def buffer(name: str, array: np.ndarray) -> None:
            self.register_buffer(name, torch.from_numpy(np.array(array, dtype=np.float32)))

        buffer("generic_w", w.generic_w.reshape(-1, 1))
        buffer("generic_b", w.generic_b.reshape(1))
        buffer("attributes_w", w.attributes_w.T)
        buffer("attributes_b", w.attributes_b)
        buffer("centroids_t", w.centroids.T)
        buffer("centroids_sq", (w.centroids.astype(np.float64) ** 2).sum(axis=1))
        buffer("inv_temperature", np.reshape(1.0 / w.temperature, (1,)))
        buffer("embedding_mean", w.embedding_mean)
        buffer("embedding_proj_t", w.embedding_proj.T)
        self.eval()

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        generic = torch.sigmoid(feature @ self.generic_w + self.generic_b)
        attributes = torch.clamp(feature @ self.attributes_w + self.attributes_b, -1.0, 1.0)
        z = feature / torch.sqrt((feature * feature).sum(dim=1, keepdim=True) + NORM_EPS)
        # ‖z - c‖² = ‖z‖² - 2 z·c + ‖c‖², one matmul instead of a [N,K,D] difference tensor.
        z_sq = (z * z).sum(dim=1, keepdim=True)
        distances = z_sq - 2.0 * (z @ self.centroids_t) + self.centroids_sq
        content = torch.softmax(-distances * self.inv_temperature, dim=1)
        embedding = (z - self.embedding_mean) @ self.embedding_proj_t
        return generic, attributes, content, embedding


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, the same way Heads does it (float64 for fitting)."""
    f = np.asarray(features, dtype=np.float64)
    return f / np.sqrt((f * f).sum(axis=1, keepdims=True) + NORM_EPS)


def heads_numpy(weights: HeadWeights, features: np.ndarray) -> dict[str, np.ndarray]:
    """The heads in float64 numpy (for fitting and metrics without torch); same math as Heads."""
    f = np.asarray(features, dtype=np.float64)
    generic = 1.0 / (1.0 + np.exp(-(f @ weights.generic_w.astype(np.float64) + float(weights.generic_b))))
    attributes = np.clip(f @ weights.attributes_w.T.astype(np.float64) + weights.attributes_b, -1.0, 1.0)
    z = l2_normalize(f)
    c = weights.centroids.astype(np.float64)
    distances = (z * z).sum(1, keepdims=True) - 2.0 * z @ c.T + (c * c).sum(1)
    logits = -distances / float(weights.temperature)
    logits -= logits.max(axis=1, keepdims=True)
    content = np.exp(logits)
    content /= content.sum(axis=1, keepdims=True)
    embedding = (z - weights.embedding_mean.astype(np.float64)) @ weights.embedding_proj.T.astype(np.float64)
    return {"generic": generic[:, None], "attributes": attributes, "content": content, "embedding": embedding}
