"""The demo's album and its simulated rater, made from photos that ship with the product's dependencies.

The photos are scikit-image's bundled sample photos (only the files are read; skimage is not imported)
and variants made from them: crops, and degraded copies (blur, darkening, desaturation, noise).

The simulated rater, "Vivid Vera", has a documented taste defined on pixels, not on our models' outputs:
she likes colourful, warm, sharp, well-exposed photos and dislikes grey, cold, blurred or dark ones.
Her stars are that taste plus Gaussian noise, rounded to 1..5.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from piaa_export.quantize import SAMPLE_PHOTO_FILES

RATER_NAME = "vivid-vera"
RATER_TASTE = (
    "likes colourful, warm, sharp and well-exposed photos; dislikes grey, cold, blurred or dark ones"
)


def sample_photo_dir() -> Path:
    """Where scikit-image keeps its bundled sample photos."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: run `make setup`, or pass PHOTOS=dir to make demo")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _variants(name: str, image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    side = min(width, height)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 28, (height, width, 3))
    return {
        "original": image,
        "crop": image.crop(
            ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        ),
        "blurred": image.filter(ImageFilter.GaussianBlur(radius=max(2, side // 80))),
        "dark": ImageEnhance.Brightness(image).enhance(0.45),
        "grey": ImageEnhance.Color(image).enhance(0.0),
        "vivid": ImageEnhance.Color(image).enhance(1.6),
        "noisy": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
    }


def make_album(out_dir: Path, source_dir: Path | None = None) -> list[Path]:
    """Writes the demo album as JPEGs into out_dir and returns their paths (sorted).

    With source_dir, the user's own photos (JPEG/PNG/WebP) are used instead of the bundled ones, as is.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if source_dir is not None:
        photos = sorted(
            p for p in source_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}
        )
        if not photos:
            raise RuntimeError(f"no JPEG, PNG or WebP photos in {source_dir}")
        return photos
    written = []
    for file_name in SAMPLE_PHOTO_FILES:
        image = Image.open(sample_photo_dir() / file_name).convert("RGB")
        stem = Path(file_name).stem
        for variant, picture in _variants(stem, image).items():
            path = out_dir / f"{stem}-{variant}.jpg"
            if not path.exists():
                picture.save(path, "JPEG", quality=90)
            written.append(path)
    return sorted(written)


@dataclass(frozen=True)
class PixelStats:
    """What the rater looks at, each on roughly [0, 1]."""

    colourfulness: float
    warmth: float
    sharpness: float
    brightness: float


def pixel_stats(data: bytes) -> PixelStats:
    """Colourfulness (Hasler–Süsstrunk), warmth (red over blue), sharpness (gradient energy), brightness."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((256, 256))
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    grey = rgb.mean(axis=2)
    gradient = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    return PixelStats(
        colourfulness=float(min(1.0, colourfulness / 0.35)),
        warmth=float(np.clip(0.5 + (r.mean() - b.mean()), 0, 1)),
        sharpness=float(min(1.0, gradient / 0.12)),
        brightness=float(grey.mean()),
    )


def rate(data: bytes, rng: np.random.Generator, noise: float = 0.35) -> int:
    """Vivid Vera's stars for one photo: her taste on the pixel statistics, plus noise, rounded to 1..5."""
    s = pixel_stats(data)
    exposure = 1.0 - 2.0 * abs(s.brightness - 0.5)
    taste = 1.6 * s.colourfulness + 0.8 * s.warmth + 1.0 * s.sharpness + 0.8 * exposure
    stars = 0.4 + 5.0 * taste / 4.2 + rng.normal(0.0, noise)
    return int(np.clip(np.rint(stars), 1, 5))


def write_ratings(photos: list[Path], csv_path: Path, seed: int = 7) -> dict[str, int]:
    """Rates photos as Vivid Vera, writes `path,rating` (paths relative to the CSV); returns name → stars."""
    rng = np.random.default_rng(seed)
    stars = {p.name: rate(p.read_bytes(), rng) for p in photos}
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "rating"])
        for photo in photos:
            writer.writerow([os.path.relpath(photo.resolve(), csv_path.parent.resolve()), stars[photo.name]])
    return stars
