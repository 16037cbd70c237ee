"""AADB and FLICKR-AES loaders, and refitting the heads on their human labels when a user has them.

AADB (Kong et al., ECCV 2016): label files `imgList{Train,Validation,TestNew}Regression_<attr>.txt`, one
`<image file> <value>` per line, attributes in [-1, 1] (the official files spell BalancingElements as
"BalacingElements"), the overall score in `..._score.txt` in [0, 1].
FLICKR-AES (Ren et al., ICCV 2017): `FLICKR-AES_image_labeled_by_each_worker.csv` with the columns
`worker, imagePair, score` (1–5 stars; the header has spaces after the commas); images in `40K/`.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from piaa_client.features import ATTRIBUTES, BACKBONE_FEATURE, BACKBONE_INPUT
from piaa_export.exceptions import DatasetError
from piaa_export.extract import IMAGE_SUFFIXES, data_fingerprint
from piaa_export.fitting import TrainConfig, fit_attributes, split_photos
from piaa_export.heads import HeadWeights
from piaa_export.runtime import session

FLICKR_AES_CSV = "FLICKR-AES_image_labeled_by_each_worker.csv"
AADB_SPELLINGS = {"BalacingElements": "BalancingElements"}
_AADB_FILE = re.compile(r"imgList(Train|Validation|TestNew|Test)Regression_(\w+)\.txt$")


@dataclass(frozen=True)
class AadbDataset:
    """AADB images with their 10 attributes (ATTRIBUTES order, [-1, 1]), overall score and split."""

    images: list[Path]
    attributes: np.ndarray  # [N, 10]
    score: np.ndarray  # [N], NaN when the score file is absent
    split: list[str]  # "train", "validation" or "test"


@dataclass(frozen=True)
class FlickrAesDataset:
    """FLICKR-AES images with the mean of their workers' 1–5 star ratings."""

    images: list[Path]
    mean_score: np.ndarray  # [N]
    ratings: np.ndarray  # [N] how many workers rated each image
    by_worker: dict[str, list[tuple[str, float]]]  # worker → [(image file, score)], for personalization


def _index_images(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}


def load_aadb(root: Path) -> AadbDataset:
    """Reads every AADB regression label file under `root` and finds each image by file name.

    Images listed in the label files but absent from disk are dropped; an image needs all 10 attributes.
    Raises DatasetError when no label files are found or no labelled image exists.
    """
    split_names = {"Train": "train", "Validation": "validation", "TestNew": "test", "Test": "test"}
    values: dict[str, dict[str, float]] = defaultdict(dict)
    split: dict[str, str] = {}
    found = False
    for path in sorted(root.rglob("imgList*Regression_*.txt")):
        match = _AADB_FILE.search(path.name)
        if not match:
            continue
        found = True
        name = AADB_SPELLINGS.get(match.group(2), match.group(2))
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DatasetError(f"{path}:{line_no}: expected '<image> <value>', got {line!r}")
            try:
                values[parts[0]][name] = float(parts[1])
            except ValueError:
                raise DatasetError(f"{path}:{line_no}: {parts[1]!r} is not a number") from None
            split[parts[0]] = split_names[match.group(1)]
    if not found:
        raise DatasetError(f"no AADB label files (imgList*Regression_<attribute>.txt) under {root}")
    on_disk = _index_images(root)
    names = sorted(n for n, v in values.items() if n in on_disk and all(a in v for a in ATTRIBUTES))
    if not names:
        raise DatasetError(f"no AADB image under {root} has all 10 attribute labels")
    return AadbDataset(
        images=[on_disk[n] for n in names],
        attributes=np.array([[values[n][a] for a in ATTRIBUTES] for n in names]),
        score=np.array([values[n].get("score", np.nan) for n in names]),
        split=[split[n] for n in names],
    )


def load_flickr_aes(root: Path) -> FlickrAesDataset:
    """Reads FLICKR-AES_image_labeled_by_each_worker.csv under `root`; per-image mean of the 1–5 scores.

    Raises DatasetError when the CSV is missing, lacks a column, holds a score outside 1..5, or none of
    its images are on disk.
    """
    found = sorted(root.rglob(FLICKR_AES_CSV))
    if not found:
        raise DatasetError(f"{FLICKR_AES_CSV} not found under {root}")
    scores: dict[str, list[float]] = defaultdict(list)
    by_worker: dict[str, list[tuple[str, float]]] = defaultdict(list)
    with found[0].open(newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header = [h.strip() for h in next(reader, [])]
        if not {"worker", "imagePair", "score"} <= set(header):
            raise DatasetError(f"{found[0]} needs the columns worker, imagePair, score; has {header}")
        col = {h: header.index(h) for h in ("worker", "imagePair", "score")}
        for line_no, row in enumerate(reader, 2):
            if not row:
                continue
            image, worker = row[col["imagePair"]].strip(), row[col["worker"]].strip()
            try:
                score = float(row[col["score"]])
            except (ValueError, IndexError):
                raise DatasetError(f"{found[0]}:{line_no}: bad row {row!r}") from None
            if not 1.0 <= score <= 5.0:
                raise DatasetError(f"{found[0]}:{line_no}: score {score} is outside 1..5 stars")
            scores[image].append(score)
            by_worker[worker].append((image, score))
    on_disk = _index_images(root)
    names = sorted(n for n in scores if n in on_disk)
    if not names:
        raise DatasetError(f"none of the {len(scores)} rated FLICKR-AES images is under {root}")
    return FlickrAesDataset(
        images=[on_disk[n] for n in names],
        mean_score=np.array([np.mean(scores[n]) for n in names]),
        ratings=np.array([len(scores[n]) for n in names]),
        by_worker=dict(by_worker),
    )


def image_features(files: Sequence[Path], backbone_onnx: Path, progress: bool = False) -> np.ndarray:
    """Pooled features [N, 1280] of image files through imaging.preprocess and the ONNX backbone."""
    from piaa_triton.imaging import ImageError, preprocess

    sess = session(backbone_onnx)
    out = []
    for path in tqdm(files, desc="features", unit="image", disable=not progress):
        try:
            tensor = preprocess(path.read_bytes())
        except ImageError as err:
            raise DatasetError(f"{path}: {err}") from None
        out.append(sess.run([BACKBONE_FEATURE.name], {BACKBONE_INPUT.name: tensor[None]})[0][0])
    return np.stack(out).astype(np.float64)


def fit_generic_on_ratings(
    features: np.ndarray, mean_score: np.ndarray, train: np.ndarray
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """generic = sigmoid(f·w + b) fitted by ridge regression on the logit of (score - 1) / 4.

    Returns (w, b, metrics: held-out Spearman against the mean ratings)."""
    target = np.clip((mean_score - 1.0) / 4.0, 0.02, 0.98)
    logit = np.log(target / (1 - target))
    # Reuse the attribute fit (standardize, RidgeCV, fold) on a one-column target, without its clip.
    w, b, _ = fit_attributes(features, logit[:, None] / 10.0, train, names=("generic",))
    w, b0 = w[0] * 10.0, float(b[0]) * 10.0
    held = ~train
    rho = stats.spearmanr(features[held] @ w + b0, mean_score[held]).statistic if held.sum() > 2 else None
    return w, b0, {"heldout_spearman": None if rho is None else round(float(rho), 4)}


def refit_on_datasets(
    weights: HeadWeights, config: TrainConfig, backbone_onnx: Path, cache_dir: Path, progress: bool = False
) -> tuple[HeadWeights, dict[str, Any], dict[str, Any]]:
    """Replaces the attribute head with one fitted on AADB and/or the generic head with FLICKR-AES.

    Returns (weights, metrics, sources). The content and embedding heads stay as fitted on the photos.
    """
    metrics: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    if config.aadb is not None:
        aadb = load_aadb(config.aadb)
        feats = image_features(aadb.images, backbone_onnx, progress)
        train = np.array([s != "test" for s in aadb.split])
        if train.all() or not train.any():
            train = split_photos(len(aadb.images), config.holdout, config.seed)
        w, b, m = fit_attributes(feats, aadb.attributes, train)
        weights = replace(weights, attributes_w=w.astype(np.float32), attributes_b=b.astype(np.float32))
        metrics["aadb"] = m | {"images": len(aadb.images), "heldout_images": int((~train).sum())}
        sources["aadb"] = {"count": len(aadb.images), "sha256": data_fingerprint(aadb.images)}
    if config.flickr_aes is not None:
        flickr = load_flickr_aes(config.flickr_aes)
        feats = image_features(flickr.images, backbone_onnx, progress)
        train = split_photos(len(flickr.images), config.holdout, config.seed)
        w, b_generic, m = fit_generic_on_ratings(feats, flickr.mean_score, train)
        weights = replace(
            weights, generic_w=w.astype(np.float32), generic_b=np.asarray(b_generic, dtype=np.float32)
        )
        metrics["flickr_aes"] = m | {"images": len(flickr.images), "heldout_images": int((~train).sum())}
        sources["flickr_aes"] = {"count": len(flickr.images), "sha256": data_fingerprint(flickr.images)}
    return weights.validate(), metrics, sources
