"""Image decoding and preprocessing: encoded bytes → the uint8 RGB tensor the backbone takes (it normalizes).

One implementation, used by the Triton `preprocess` model, by the exporter when it computes training
features, and by the in-process benchmark baseline, so serving and training cannot disagree.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from piaa_client.features import IMAGE_SIZE

RESIZE_SIDE = 256
"""The shorter side is resized to this, then the centre IMAGE_SIZE square is cropped (EfficientNet eval)."""

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")

# Header signatures of the formats we take; anything else is refused before Pillow parses it.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


class ImageError(ValueError):
    """The bytes are not an image we accept; the message says why and is safe to return to callers."""


@dataclass(frozen=True)
class ImageLimits:
    """What an encoded image may be. Checked before and while decoding, never after."""

    max_bytes: int = 20 * 1024 * 1024
    """Largest encoded image accepted."""
    max_pixels: int = 50_000_000
    """Largest width × height accepted (a decompression bomb is refused from its header)."""
    max_aspect_ratio: float = 20.0
    """Longest side over shortest side. Resizing the shorter side to RESIZE_SIDE makes the longer one
    RESIZE_SIDE × ratio: a 120-byte 40000×1 PNG would become 10 G pixels."""


DEFAULT_LIMITS = ImageLimits()


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's magic bytes, or None."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    known = {
        b"GIF8": "GIF",
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"SIMPLE": "FITS",
        b"<svg": "SVG",
        b"<?xml": "SVG/XML",
    }
    for prefix, name in known.items():
        if data.startswith(prefix):
            return name
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF"
    return "unknown"


EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding its pixels."""

    format: str
    """"JPEG", "PNG" or "WEBP"."""
    width: int
    height: int
    mode: str
    """Pillow's mode of the stored pixels ("RGB", "L", "CMYK", ...)."""
    orientation: int
    """The EXIF orientation tag (1: upright)."""


def read_header(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[Header, Image.Image]:
    """Checks the encoded bytes against every limit that the header can tell, before any pixel is decoded.

    Returns the header and the opened (not yet loaded) image. Raises ImageError for anything empty, too
    large, of another format, unreadable, over the pixel limit or over the aspect-ratio limit. Both the
    CPU decoder and the GPU path call this, so they accept and refuse the same images with the same words.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data) / 1e6:.1f} MB, over the {limits.max_bytes / 1e6:.1f} MB limit")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"unsupported image format ({_describe(data)}): send JPEG, PNG or WebP")
    try:
        opened = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = opened.size
        orientation = int(opened.getexif().get(EXIF_ORIENTATION, 1)) if fmt == "JPEG" else 1
    except Image.DecompressionBombError:
        # Pillow refuses > 2× its own pixel cap inside open(), before our size check can run.
        raise ImageError(
            f"image is over the {limits.max_pixels / 1e6:.0f} MP limit (decompression bomb)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot decode {fmt} image: {_reason(err)}") from None
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}×{height} = {width * height / 1e6:.0f} MP, "
            f"over the {limits.max_pixels / 1e6:.0f} MP limit"
        )
    if max(width, height) > limits.max_aspect_ratio * max(1, min(width, height)):
        raise ImageError(
            f"image is {width}×{height}: sides differ by more than {limits.max_aspect_ratio:g}:1"
        )
    return Header(fmt, width, height, opened.mode, orientation), opened


def _reason(err: Exception) -> str:
    """Pillow's message without the object reprs it embeds ("<_io.BytesIO object at 0x7f...>")."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(err))


def decode(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, min_side: int = RESIZE_SIDE) -> Image.Image:
    """Decodes encoded bytes into an upright 8-bit RGB image whose shorter side is still ≥ min_side.

    JPEGs are decoded at a reduced DCT scale when they are much larger than needed (draft mode).
    Raises ImageError for anything empty, too large, of another format, or undecodable.
    """
    header, opened = read_header(data, limits)
    width, height = header.width, header.height
    try:
        if header.format == "JPEG" and min(width, height) > 2 * min_side:
            scale = min_side / min(width, height)
            opened.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        opened.load()
        return _to_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError:
        raise ImageError(
            f"image is over the {limits.max_pixels / 1e6:.0f} MP limit (decompression bomb)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot decode {header.format} image: {_reason(err)}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any mode (grayscale, 16-bit, CMYK, palette, alpha) to 8-bit RGB; alpha goes over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or wide.max() > 255 else 255.0
        image = Image.fromarray(np.clip(wide * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in {"P", "PA"}:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def to_tensor(image: Image.Image) -> np.ndarray:
    """Resizes the shorter side to RESIZE_SIDE and crops the centre square: uint8 RGB [3, 224, 224].

    No normalization here: the backbone's first operation does it (piaa_export.backbone.normalize), so
    the tensor handed between processes is a quarter of the float32 one.
    """
    width, height = image.size
    scale = RESIZE_SIDE / min(width, height)
    size = (max(IMAGE_SIZE, round(width * scale)), max(IMAGE_SIZE, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left = (size[0] - IMAGE_SIZE) // 2
    top = (size[1] - IMAGE_SIZE) // 2
    crop = resized.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def preprocess(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Encoded image bytes → the backbone's input tensor, uint8 RGB [3, 224, 224]. Raises ImageError."""
    return to_tensor(decode(data, limits))
