"""Conversion checks: ONNX against torch under an explicit tolerance; ImageNet top-1 on labelled photos."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from piaa_client.features import BACKBONE_FEATURE, BACKBONE_INPUT, HEAD_OUTPUTS, IMAGE_SIZE
from piaa_export.backbone import Backbone
from piaa_export.exceptions import DatasetError, ParityError
from piaa_export.heads import Heads
from piaa_export.runtime import session
from piaa_triton.imaging import preprocess

FP32_ATOL = 1e-4
"""fp32 ONNX Runtime vs torch: largest absolute difference allowed on any output element."""

TOP1_MAX_GAP = 0.005
"""ONNX vs torch ImageNet top-1 on the same photos: at most half a point apart."""

PARITY_PHOTOS = 32
"""How many photos the parity checks run on (torch eager is the slow side)."""


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute difference per output between ONNX Runtime and torch, over `samples` inputs."""

    model: str
    samples: int
    max_abs_diff: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(d <= self.tolerance for d in self.max_abs_diff.values())

    def raise_for_failure(self) -> ParityReport:
        """Returns self; raises ParityError naming the outputs beyond the tolerance."""
        if not self.ok:
            bad = {k: v for k, v in self.max_abs_diff.items() if v > self.tolerance}
            raise ParityError(f"{self.model}: ONNX differs from torch beyond {self.tolerance:g}: {bad}")
        return self


def generated_images(count: int, seed: int = 0) -> np.ndarray:
    """Deterministic image-like uint8 inputs [count,3,224,224]: smooth colour fields plus texture.

    Used when no photos are given (a fresh clone has none): smooth low-frequency structure gives the
    network realistic activations, unlike white noise alone.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(count, 3, 7, 7)).astype(np.float32)
    t = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic"
    )
    pixels = t.numpy() + rng.normal(0, 12, size=t.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def photo_tensors(paths: Sequence[Path]) -> np.ndarray:
    """Photos → the backbone's input batch, through piaa_triton.imaging.preprocess (the serving path)."""
    return np.stack([preprocess(p.read_bytes()) for p in paths])


def _compare(
    names: Sequence[str], torch_out: Sequence[torch.Tensor], onnx_out: Sequence[np.ndarray]
) -> dict[str, float]:
    return {
        n: float(np.max(np.abs(t.numpy() - o))) for n, t, o in zip(names, torch_out, onnx_out, strict=True)
    }


def backbone_parity(
    backbone: Backbone, onnx_path: Path, images: np.ndarray, batch_size: int = 16
) -> ParityReport:
    """Compares the ONNX backbone with torch on `images` [N,3,224,224]; returns the per-output max diff."""
    sess = session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    worst = dict.fromkeys(names, 0.0)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        with torch.no_grad():
            expected = backbone(torch.from_numpy(batch))
        got = sess.run(names, {BACKBONE_INPUT.name: batch})
        for k, v in _compare(names, expected, got).items():
            worst[k] = max(worst[k], v)
    return ParityReport("backbone", len(images), worst, FP32_ATOL)


def heads_parity(heads: Heads, onnx_path: Path, features: np.ndarray) -> ParityReport:
    """Compares the ONNX heads with torch on `features` [N,1280]; returns the per-output max diff."""
    sess = session(onnx_path)
    names = [o.name for o in HEAD_OUTPUTS]
    with torch.no_grad():
        expected = heads(torch.from_numpy(features.astype(np.float32)))
    got = sess.run(names, {BACKBONE_FEATURE.name: features.astype(np.float32)})
    return ParityReport("heads", len(features), _compare(names, expected, got), FP32_ATOL)


@dataclass(frozen=True)
class LabelledPhoto:
    """One photo of a folder with labels.csv (file, wnid, imagenet_index, class_name)."""

    path: Path
    imagenet_index: int
    class_name: str


def read_labelled_folder(folder: Path) -> list[LabelledPhoto]:
    """The photos listed in folder/labels.csv, in file order. Raises DatasetError."""
    labels = folder / "labels.csv"
    if not labels.exists():
        raise DatasetError(f"{labels} not found: a photo folder needs labels.csv (file,imagenet_index,...)")
    with labels.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file", "imagenet_index"} <= set(rows[0]):
        raise DatasetError(f"{labels} needs the columns file and imagenet_index")
    return [
        LabelledPhoto(folder / r["file"], int(r["imagenet_index"]), r.get("class_name", "")) for r in rows
    ]


def onnx_top1(
    onnx_path: Path, photos: Sequence[LabelledPhoto], batch_size: int = 1, progress: bool = False
) -> float:
    """ImageNet top-1 accuracy (0..1) of the ONNX backbone on labelled photos.

    Batch 1 by default: on 2 CPU cores ONNX Runtime runs this model fastest one image at a time.
    """
    sess = session(onnx_path)
    correct = 0
    for start in tqdm(range(0, len(photos), batch_size), desc="top-1 (onnx)", disable=not progress):
        chunk = photos[start : start + batch_size]
        (logits,) = sess.run(["logits"], {BACKBONE_INPUT.name: photo_tensors([p.path for p in chunk])})
        correct += int(
            sum(int(np.argmax(row)) == p.imagenet_index for row, p in zip(logits, chunk, strict=True))
        )
    return correct / len(photos)


def torch_top1(
    backbone: Backbone, photos: Sequence[LabelledPhoto], batch_size: int = 32, progress: bool = False
) -> float:
    """ImageNet top-1 accuracy (0..1) of the torch backbone on labelled photos."""
    correct = 0
    for start in tqdm(range(0, len(photos), batch_size), desc="top-1 (torch)", disable=not progress):
        chunk = photos[start : start + batch_size]
        with torch.no_grad():
            _, logits = backbone(torch.from_numpy(photo_tensors([p.path for p in chunk])))
        predicted = logits.argmax(dim=1).tolist()
        correct += sum(int(k == p.imagenet_index) for k, p in zip(predicted, chunk, strict=True))
    return correct / len(photos)


def report_folder(
    onnx_path: Path, folder: Path, torch_limit: int | None = None, progress: bool = False
) -> dict[str, object]:
    """Parity on the folder's first photos, ONNX top-1 on all, torch top-1 on the first `torch_limit`.

    Returns a JSON-able report; parity_ok is False when ONNX and torch disagree beyond FP32_ATOL or their
    top-1 on the same photos differs by more than TOP1_MAX_GAP.
    """
    from piaa_export.backbone import load_backbone

    photos = read_labelled_folder(folder)
    backbone = load_backbone()
    parity = backbone_parity(backbone, onnx_path, photo_tensors([p.path for p in photos[:PARITY_PHOTOS]]))
    subset = photos[: torch_limit or len(photos)]
    onnx_all = onnx_top1(onnx_path, photos, progress=progress)
    onnx_subset = onnx_all if len(subset) == len(photos) else onnx_top1(onnx_path, subset)
    torch_subset = torch_top1(backbone, subset, progress=progress)
    return {
        "photos": len(photos),
        "parity_photos": parity.samples,
        "max_abs_diff": parity.max_abs_diff,
        "tolerance": FP32_ATOL,
        "onnx_top1": onnx_all,
        "torch_top1_photos": len(subset),
        "torch_top1": torch_subset,
        "onnx_top1_same_photos": onnx_subset,
        "parity_ok": parity.ok and abs(onnx_subset - torch_subset) <= TOP1_MAX_GAP,
    }
