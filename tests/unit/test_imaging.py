"""piaa_triton.imaging: decoding rules (orientation, colour modes, draft decode) and what is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from piaa_client.features import BACKBONE_INPUT
from piaa_triton.imaging import (
    ImageError,
    ImageLimits,
    decode,
    preprocess,
    sniff_format,
)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(mode: str, size: tuple[int, int], color: object) -> Image.Image:
    return Image.new(mode, size, color)  # type: ignore[arg-type]


def test_preprocess_returns_the_backbone_tensor() -> None:
    # uint8 RGB, channels first, not normalized: the backbone's graph normalizes (BACKBONE_INPUT.dtype).
    tensor = preprocess(encode(solid("RGB", (320, 300), (255, 0, 127)), "PNG"))
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.dtype(BACKBONE_INPUT.dtype) == np.uint8
    assert tensor.flags.c_contiguous
    np.testing.assert_array_equal(tensor[:, 100, 100], [255, 0, 127])


def test_exif_orientation_is_applied() -> None:
    # A 400×300 picture whose EXIF says "rotate 90°": it must come out 300×400, its left half on top.
    image = solid("RGB", (400, 300), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 200, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to view
    upright = decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (300, 400)
    pixels = np.asarray(upright, dtype=np.float32)
    assert pixels[:150].mean() > 200 and pixels[250:].mean() < 50


@pytest.mark.parametrize(
    ("mode", "color", "fmt", "expected_rgb"),
    [
        ("L", 200, "JPEG", (200, 200, 200)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("RGBA", (0, 0, 255, 0), "PNG", (255, 255, 255)),  # transparent → white background
        ("RGBA", (0, 0, 255, 255), "PNG", (0, 0, 255)),
        ("LA", (0, 0), "PNG", (255, 255, 255)),
        ("RGB", (10, 200, 30), "WEBP", (10, 200, 30)),
    ],
)
def test_colour_modes_become_rgb(mode: str, color: object, fmt: str, expected_rgb: tuple[int, ...]) -> None:
    params = {"quality": 100} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "WEBP":
        params["lossless"] = True
    image = decode(encode(solid(mode, (300, 260), color), fmt, **params))
    assert image.mode == "RGB"
    np.testing.assert_allclose(np.asarray(image)[130, 150], expected_rgb, atol=3)


def test_palette_with_transparency_becomes_rgb() -> None:
    image = solid("P", (300, 300), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    image.paste(0, (0, 0, 150, 300))
    rgb = np.asarray(decode(encode(image, "PNG", transparency=0)))
    np.testing.assert_array_equal(rgb[10, 10], [255, 255, 255])  # transparent index over white
    np.testing.assert_array_equal(rgb[10, 290], [255, 0, 0])


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    wide = np.full((280, 300), 65535 // 2, dtype=np.uint16)
    rgb = np.asarray(decode(encode(Image.fromarray(wide), "PNG")))
    assert rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb[140, 150], [128, 128, 128], atol=1)


def test_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    large = encode(solid("RGB", (4000, 3000), (90, 120, 150)), "JPEG", quality=80)
    image = decode(large)
    assert min(image.size) >= 256
    assert image.size[0] <= 1000, "draft mode should have decoded at 1/4 or 1/8 scale"
    np.testing.assert_allclose(np.asarray(image)[100, 100], (90, 120, 150), atol=3)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("GIF", "GIF"), ("TIFF", "TIFF"), ("BMP", "BMP")],
)
def test_other_formats_are_refused_by_name(fmt: str, name: str) -> None:
    data = encode(solid("RGB", (300, 300), (1, 2, 3)), fmt)
    assert sniff_format(data) is None
    with pytest.raises(ImageError, match=rf"unsupported image format \({name}\).*JPEG, PNG or WebP"):
        preprocess(data)


def test_svg_is_refused() -> None:
    svg = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="300"><rect width="9" height="9"/></svg>'
    )
    with pytest.raises(ImageError, match=r"unsupported image format \(SVG\)"):
        preprocess(svg)


def test_limits_are_enforced_before_decoding() -> None:
    data = encode(solid("RGB", (600, 500), (0, 0, 0)), "PNG")
    with pytest.raises(ImageError, match=r"over the .* MB limit"):
        decode(data, ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(ImageError, match=r"600×500 = 0 MP, over the 0 MP limit"):
        decode(data, ImageLimits(max_pixels=600 * 500 - 1))


@pytest.mark.parametrize(
    ("side", "message"), [(8000, "64 MP, over the 50 MP limit"), (20000, "decompression bomb")]
)
def test_decompression_bomb_is_refused_from_its_header(side: int, message: str) -> None:
    # A one-bit PNG: a few kB encoded, tens or hundreds of MP decoded (20000² trips Pillow's own guard).
    bomb = encode(Image.new("1", (side, side)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match=message):
        preprocess(bomb)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "cannot decode JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "cannot decode PNG"),
    ],
)
def test_corrupt_bytes_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        preprocess(data)


def test_truncated_jpeg_is_refused() -> None:
    data = encode(solid("RGB", (400, 300), (5, 6, 7)), "JPEG")
    with pytest.raises(ImageError, match="cannot decode JPEG"):
        preprocess(data[: len(data) // 2])


@settings(max_examples=25, deadline=None)
@given(width=st.integers(1, 900), height=st.integers(1, 900))
def test_any_size_gives_the_backbone_shape(width: int, height: int) -> None:
    data = encode(solid("RGB", (width, height), (40, 80, 160)), "PNG")
    if max(width, height) > ImageLimits().max_aspect_ratio * min(width, height):
        with pytest.raises(ImageError, match="20:1"):  # see test_fuzz_imaging: resizing would explode
            preprocess(data)
        return
    tensor = preprocess(data)
    assert tensor.shape == (3, 224, 224)
    assert np.isfinite(tensor).all()
