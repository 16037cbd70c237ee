"""Head outputs and pixel statistics of image files, computed once with ONNX Runtime and cached.

The evaluation fits thousands of profiles on the same images; computing every image's head outputs once
(the serving decode + preprocess of piaa_triton.imaging, then backbone.onnx and heads.onnx in ONNX
Runtime, the same graphs Triton runs) and caching them in build/cache/ keeps a full report to minutes.
The cache key covers the ONNX files' bytes and every image's name and bytes, so a rebuilt model or a
changed photo never reuses stale outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from piaa_client.features import HEAD_OUTPUTS
from piaa_export import taxonomy
from piaa_personalization.model.residual import HeadOutputs
from piaa_triton.imaging import decode, to_tensor

DEFAULT_ONNX_DIR = Path("build/onnx")
DEFAULT_CACHE_DIR = Path("build/cache")
PIXEL_STATS: tuple[str, ...] = ("warmth", "brightness", "saturation")
"""Simple pixel statistics (on [0, 1] / [-1, 1]) the simulated raters may like; no head sees them."""
_BATCH = 16
_THUMB = 64


@dataclass(frozen=True)
class ImageFeatures:
    """What the evaluation needs per image: the heads' outputs, the pixel statistics [N, 3] and, when
    extracted, the backbone classifier's probability of each coarse ImageNet group [N, 10]
    (piaa_export.taxonomy.GROUP_NAMES): the named-group content a `--content groups` release serves."""

    heads: HeadOutputs
    pixels: NDArray[np.float64]
    groups: NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.heads)


def pixel_stats(image: Image.Image) -> NDArray[np.float64]:
    """[warmth, brightness, saturation] of an RGB image: mean (R - B), mean luma, mean HSV saturation,
    each scaled to [0, 1] ([-1, 1] for warmth), on a 64-px thumbnail (the statistics are global)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((_THUMB, _THUMB))
    rgb = np.asarray(thumb, dtype=np.float64) / 255.0
    hsv = np.asarray(thumb.convert("HSV"), dtype=np.float64) / 255.0
    warmth = float(np.mean(rgb[..., 0] - rgb[..., 2]))
    brightness = float(np.mean(rgb @ np.array([0.299, 0.587, 0.114])))
    return np.array([warmth, brightness, float(np.mean(hsv[..., 1]))])


def model_files(onnx_dir: Path) -> tuple[Path, Path]:
    """(backbone, heads) ONNX files of `onnx_dir`: the exporter's layout (backbone.onnx, heads.onnx) or a
    Triton CPU model repository's (backbone/1/model.onnx, heads/1/model.onnx), which is what a running
    Triton serves. Raises FileNotFoundError when neither is complete."""
    for backbone, heads in (
        (onnx_dir / "backbone.onnx", onnx_dir / "heads.onnx"),
        (onnx_dir / "backbone" / "1" / "model.onnx", onnx_dir / "heads" / "1" / "model.onnx"),
    ):
        if backbone.is_file() and heads.is_file():
            return backbone, heads
    raise FileNotFoundError(
        f"no backbone/heads ONNX files in {onnx_dir}: run `python -m piaa_export.cli build` (or `make setup`)"
    )


def _digest(paths: Sequence[Path], onnx_dir: Path) -> str:
    h = hashlib.sha256()
    for model in model_files(onnx_dir):
        h.update(hashlib.sha256(model.read_bytes()).digest())
    for path in paths:
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


class HeadRunner:
    """The backbone and heads ONNX graphs in ONNX Runtime (CPU): preprocessed tensors -> HeadOutputs."""

    def __init__(self, onnx_dir: Path = DEFAULT_ONNX_DIR) -> None:
        import onnxruntime as ort  # deferred: only the extraction needs it

        backbone, heads = model_files(onnx_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        providers = ["CPUExecutionProvider"]
        self.backbone = ort.InferenceSession(str(backbone), opts, providers=providers)
        self.heads = ort.InferenceSession(str(heads), opts, providers=providers)

    def __call__(self, batch: NDArray[np.float32]) -> tuple[HeadOutputs, NDArray[np.float64]]:
        """Head outputs and coarse-group probabilities of a batch of preprocessed images [B, 3, 224, 224]."""
        feature, logits = self.backbone.run(["feature", "logits"], {"image": batch})
        outs = self.heads.run([o.name for o in HEAD_OUTPUTS], {"feature": feature})
        heads = HeadOutputs(outs[0].reshape(-1), outs[1], outs[2], outs[3])
        return heads, taxonomy.group_probabilities(logits)


def extract(
    paths: Sequence[Path],
    onnx_dir: Path = DEFAULT_ONNX_DIR,
    progress: Callable[[int, int], None] | None = None,
) -> ImageFeatures:
    """Decodes every image once (the serving decode and preprocess), runs the heads in batches and
    measures the pixel statistics. Raises piaa_triton.imaging.ImageError on an undecodable file."""
    runner = HeadRunner(onnx_dir)
    parts: list[HeadOutputs] = []
    groups: list[NDArray[np.float64]] = []
    pixels: list[NDArray[np.float64]] = []
    for start in range(0, len(paths), _BATCH):
        tensors = []
        for path in paths[start : start + _BATCH]:
            image = decode(path.read_bytes())
            pixels.append(pixel_stats(image))
            tensors.append(to_tensor(image))
        heads, group = runner(np.stack(tensors))
        parts.append(heads)
        groups.append(group)
        if progress:
            progress(min(start + _BATCH, len(paths)), len(paths))
    return ImageFeatures(HeadOutputs.concat(parts), np.stack(pixels), np.concatenate(groups))


def cached_features(
    paths: Sequence[Path],
    onnx_dir: Path = DEFAULT_ONNX_DIR,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: Callable[[int, int], None] | None = None,
) -> ImageFeatures:
    """extract() for `paths`, read from cache_dir/eval-<key>.npz when the same images and ONNX files
    were seen before, else computed and written there. Returns rows in the order of `paths`."""
    if not paths:
        raise ValueError("no images to extract")
    cache = cache_dir / f"eval-{_digest(paths, onnx_dir)}.npz"
    if cache.exists():
        with np.load(cache) as data:
            if "groups" in data:  # caches written before the groups were extracted are redone
                return ImageFeatures(HeadOutputs.from_packed(data["packed"]), data["pixels"], data["groups"])
    feats = extract(paths, onnx_dir, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    assert feats.groups is not None  # extract() always fills them
    np.savez(tmp, packed=feats.heads.packed(), pixels=feats.pixels, groups=feats.groups)
    tmp.replace(cache)
    return feats
