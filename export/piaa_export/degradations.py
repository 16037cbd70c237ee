"""Synthetic degradations with graded strength, the ranking targets of the generic head (RankIQA).

Liu, van de Weijer, Bagdanov, "RankIQA: Learning from Rankings for No-Reference Image Quality
Assessment", ICCV 2017: a less degraded version of the same photo must rank higher. The list follows
the paper (blur, noise, JPEG, exposure, saturation, contrast, crops). Each function takes an 8-bit RGB
image at serving scale (shorter side 256) and a level (1 = mild, 2 = strong) and is deterministic for
its rng.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from piaa_triton.imaging import RESIZE_SIDE

LEVELS = (1, 2)
"""Degradation strengths; 0 is the original photo."""

Degrade = Callable[[Image.Image, int, np.random.Generator], Image.Image]


def _blur(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=(1.5, 4.0)[level - 1]))


def _noise(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0.0, (12.0, 35.0)[level - 1], size=pixels.shape)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=(15, 4)[level - 1])
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _overexpose(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance((1.7, 2.8)[level - 1])


def _underexpose(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance((0.45, 0.18)[level - 1])


def _oversaturate(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Color(image).enhance((2.5, 5.0)[level - 1])


def _desaturate(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Color(image).enhance((0.4, 0.0)[level - 1])


def _low_contrast(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance((0.45, 0.15)[level - 1])


def _bad_crop(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    # A tight window (same aspect ratio) pushed towards a random corner: it cuts the framed subject.
    width, height = image.size
    share = (0.6, 0.35)[level - 1]
    crop_w, crop_h = round(width * share), round(height * share)
    corner_x, corner_y = rng.integers(0, 2, size=2)
    jitter = rng.uniform(0.0, 0.15, size=2)
    left = round((width - crop_w) * (corner_x * (1 - jitter[0]) + (1 - corner_x) * jitter[0]))
    top = round((height - crop_h) * (corner_y * (1 - jitter[1]) + (1 - corner_y) * jitter[1]))
    crop = image.crop((left, top, left + crop_w, top + crop_h))
    return crop.resize((width, height), Image.Resampling.BILINEAR)


DEGRADATIONS: dict[str, Degrade] = {
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
    "overexposure": _overexpose,
    "underexposure": _underexpose,
    "oversaturation": _oversaturate,
    "desaturation": _desaturate,
    "low_contrast": _low_contrast,
    "bad_crop": _bad_crop,
}
"""Every degradation by name; the order is fixed (it drives the seeded choice per photo)."""


def to_serving_scale(image: Image.Image) -> Image.Image:
    """Resizes the shorter side to RESIZE_SIDE as imaging.to_tensor does first (a no-op there afterwards)."""
    width, height = image.size
    scale = RESIZE_SIDE / min(width, height)
    size = (max(RESIZE_SIDE, round(width * scale)), max(RESIZE_SIDE, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def degrade(image: Image.Image, name: str, level: int, rng: np.random.Generator) -> Image.Image:
    """One degradation of an RGB image at serving scale. Raises KeyError/ValueError for unknown ones."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    return DEGRADATIONS[name](image, level, rng)
