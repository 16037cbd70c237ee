"""Feature extraction for training, done once and cached: photos and their graded degradations → features.

Every image goes through piaa_triton.imaging (decode, then to_tensor: the serving path) and the exported
ONNX backbone in ONNX Runtime (faster than torch eager on 2 cores, and its parity with torch is checked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from piaa_client.features import BACKBONE_FEATURE, BACKBONE_INPUT, BACKBONE_LOGITS
from piaa_export.degradations import DEGRADATIONS, LEVELS, degrade, to_serving_scale
from piaa_export.exceptions import DatasetError
from piaa_export.measures import attribute_measures
from piaa_export.sources import PACKAGE_DIR, file_sha256, files_sha256
from piaa_triton.imaging import ImageError, decode, to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEGRADATION_NAMES = tuple(DEGRADATIONS)


@dataclass(frozen=True)
class TrainingData:
    """Cached features of the originals (with logits and pixel measures) and of their degraded versions."""

    names: np.ndarray  # [N] photo file names
    features: np.ndarray  # [N, 1280] originals
    logits: np.ndarray  # [N, 1000]
    measures: np.ndarray  # [N, 10] raw attribute measures, ATTRIBUTES order
    degraded_features: np.ndarray  # [M, 1280]
    degraded_measures: np.ndarray  # [M, 10] the same measures on the degraded image
    degraded_photo: np.ndarray  # [M] index into the originals
    degraded_kind: np.ndarray  # [M] index into DEGRADATION_NAMES
    degraded_level: np.ndarray  # [M] 1 = mild, 2 = strong

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> TrainingData:
        with np.load(path) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})


def list_photos(folder: Path, limit: int | None = None) -> list[Path]:
    """The image files of a folder, sorted by name, at most `limit`. Raises DatasetError when none."""
    if not folder.is_dir():
        raise DatasetError(f"photo folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no JPEG/PNG/WebP photos in {folder}")
    return files[:limit] if limit else files


def data_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over the photos' names and contents: which data the heads were trained on."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def photo_plan(index_seed: Sequence[int], per_photo: int) -> list[tuple[int, int]]:
    """The (degradation kind, level) pairs of one photo: `per_photo` kinds drawn for its seed, both levels."""
    rng = np.random.default_rng(list(index_seed))
    kinds = rng.permutation(len(DEGRADATION_NAMES))[:per_photo]
    return [(int(k), level) for k in kinds for level in LEVELS]


def extract(
    files: Sequence[Path],
    backbone_onnx: Path,
    seed: int,
    per_photo: int,
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> TrainingData:
    """Features for each photo and `per_photo` degradation kinds at every level; cached under cache_dir.

    Deterministic: each photo's degradations are drawn from a generator seeded by (seed, photo name).
    Raises DatasetError when a photo cannot be decoded.
    """
    from piaa_export.runtime import session

    key = hashlib.sha256(
        "|".join(
            [
                data_fingerprint(files),
                file_sha256(backbone_onnx),
                files_sha256([PACKAGE_DIR / n for n in ("degradations.py", "measures.py", "extract.py")]),
                str(seed),
                str(per_photo),
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"training-{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        return TrainingData.load(cache)

    sess = session(backbone_onnx)
    outputs = [BACKBONE_FEATURE.name, BACKBONE_LOGITS.name]

    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feature, logits = sess.run(outputs, {BACKBONE_INPUT.name: image[None]})
        return feature[0], logits[0]

    feats, logits, measures = [], [], []
    d_feats: list[np.ndarray] = []
    d_measures: list[np.ndarray] = []
    d_photo, d_kind, d_level = [], [], []
    for i, path in enumerate(tqdm(files, desc="features", unit="photo", disable=not progress)):
        try:
            rgb = to_serving_scale(decode(path.read_bytes()))
        except ImageError as err:
            raise DatasetError(f"{path}: {err}") from None
        feature, logit = run(to_tensor(rgb))  # to_tensor's resize is a no-op at serving scale
        feats.append(feature)
        logits.append(logit)
        measures.append(attribute_measures(np.asarray(rgb), logit))
        name_seed = int.from_bytes(hashlib.sha256(path.name.encode()).digest()[:4], "little")
        for kind, level in photo_plan((seed, name_seed), per_photo):
            rng = np.random.default_rng([seed, name_seed, kind, level])
            degraded = degrade(rgb, DEGRADATION_NAMES[kind], level, rng)
            d_feature, d_logits = run(to_tensor(degraded))
            d_feats.append(d_feature)
            d_measures.append(attribute_measures(np.asarray(degraded), d_logits))
            d_photo.append(i)
            d_kind.append(kind)
            d_level.append(level)
    data = TrainingData(
        names=np.array([p.name for p in files]),
        features=np.stack(feats).astype(np.float32),
        logits=np.stack(logits).astype(np.float32),
        measures=np.stack(measures),
        degraded_features=np.stack(d_feats).astype(np.float32),
        degraded_measures=np.stack(d_measures),
        degraded_photo=np.array(d_photo, dtype=np.int64),
        degraded_kind=np.array(d_kind, dtype=np.int64),
        degraded_level=np.array(d_level, dtype=np.int64),
    )
    if cache is not None:
        data.save(cache)
    return data
