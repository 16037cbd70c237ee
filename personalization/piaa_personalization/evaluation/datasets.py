"""Rating datasets in the field's formats: FLICKR-AES and REAL-CUR, read into one `Ratings` table.

FLICKR-AES (Ren et al. 2017): `FLICKR-AES_image_labeled_by_each_worker.csv` with the header
`worker,imagePair,score` (spaces after the commas are accepted), one row per (worker, image), `score` in
1..5 stars, `imagePair` the image's file name inside the image folder.

REAL-CUR, as this loader accepts it: a root folder with one sub-folder per album owner; each holds the
owner's photos and a `ratings.csv` with the header `image,score` (file name in that folder, 1..5 stars).
A `ratings.txt` with one `<file name> <score>` per line (whitespace separated, no header) is accepted
instead. Images without a rating are ignored; a rating of a missing file is an error.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

FLICKR_AES_CSV = "FLICKR-AES_image_labeled_by_each_worker.csv"


class DatasetError(ValueError):
    """A dataset file that is missing, malformed, or names images that do not exist."""


@dataclass(frozen=True)
class Ratings:
    """Star ratings of images by raters: parallel arrays rater [M], image [M], stars [M] (1..5) indexing
    `raters` (ids) and `images` (files). Each (rater, image) pair appears once."""

    raters: tuple[str, ...]
    images: tuple[Path, ...]
    rater: NDArray[np.int64]
    image: NDArray[np.int64]
    stars: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.rater.shape[0])

    def of(self, rater: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """(image indices, stars) of one rater, in file order."""
        mask = self.rater == rater
        return self.image[mask], self.stars[mask]

    def counts(self) -> NDArray[np.int64]:
        """Ratings per rater [R]."""
        return np.bincount(self.rater, minlength=len(self.raters)).astype(np.int64)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, Path, float]]) -> Ratings:
        """From (rater id, image path, stars) rows; raises DatasetError on stars outside 1..5 or a
        repeated (rater, image) pair. Raters and images are indexed in order of first appearance."""
        raters: dict[str, int] = {}
        images: dict[Path, int] = {}
        r_idx, i_idx, stars, seen = [], [], [], set()
        for rater, path, value in rows:
            if not 1.0 <= value <= 5.0:
                raise DatasetError(f"{rater}/{path.name}: score {value} outside 1..5")
            r = raters.setdefault(rater, len(raters))
            i = images.setdefault(path, len(images))
            if (r, i) in seen:
                raise DatasetError(f"{rater} rated {path.name} twice")
            seen.add((r, i))
            r_idx.append(r)
            i_idx.append(i)
            stars.append(value)
        if not stars:
            raise DatasetError("no ratings")
        return cls(
            tuple(raters),
            tuple(images),
            np.asarray(r_idx, np.int64),
            np.asarray(i_idx, np.int64),
            np.asarray(stars, np.float64),
        )


def _score(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{where}: score {text!r} is not a number") from None


def load_flickr_aes(csv_file: Path, image_dir: Path) -> Ratings:
    """Reads FLICKR-AES's per-worker CSV; images are looked up in `image_dir`.
    Raises DatasetError on a missing file or column, a bad score, or an image missing from the folder."""
    if not csv_file.is_file():
        raise DatasetError(f"{csv_file} does not exist")
    rows = []
    with csv_file.open(newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields = {name.strip() for name in reader.fieldnames or ()}
        if not {"worker", "imagePair", "score"} <= fields:
            raise DatasetError(f"{csv_file}: expected columns worker, imagePair, score; got {sorted(fields)}")
        for n, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            path = image_dir / row["imagePair"]
            if not path.is_file():
                raise DatasetError(f"{csv_file}:{n}: image {row['imagePair']} not in {image_dir}")
            rows.append((row["worker"], path, _score(row["score"], f"{csv_file}:{n}")))
    return Ratings.from_rows(rows)


def _album_rows(folder: Path) -> list[tuple[str, Path, float]]:
    owner = folder.name
    rows = []
    if (folder / "ratings.csv").is_file():
        with (folder / "ratings.csv").open(newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            if not {"image", "score"} <= set(reader.fieldnames or ()):
                raise DatasetError(f"{folder}/ratings.csv: expected columns image, score")
            pairs = [(r["image"], r["score"]) for r in reader]
    elif (folder / "ratings.txt").is_file():
        lines = (folder / "ratings.txt").read_text().splitlines()
        pairs = [tuple(line.split()) for line in lines if line.strip()]  # type: ignore[misc]
        if any(len(p) != 2 for p in pairs):
            raise DatasetError(f"{folder}/ratings.txt: every line must be '<file> <score>'")
    else:
        raise DatasetError(f"{folder}: no ratings.csv or ratings.txt")
    for name, score in pairs:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{folder}: rated image {name} does not exist")
        rows.append((owner, path, _score(score, f"{folder}/{name}")))
    return rows


def load_real_cur(root: Path) -> Ratings:
    """Reads REAL-CUR albums (one sub-folder per owner, see the module docstring), owners sorted by name.
    Raises DatasetError when the root has no album folders or an album is malformed."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    albums = sorted(p for p in root.iterdir() if p.is_dir())
    if not albums:
        raise DatasetError(f"{root}: no album folders")
    return Ratings.from_rows(row for album in albums for row in _album_rows(album))


def read_worker_list(path: Path) -> list[str]:
    """Worker ids, one per line (blank lines and '#' comments ignored): the test raters of a split."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]
