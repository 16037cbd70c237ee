"""Bounded fuzzing of image decoding and request parsing: any bytes give a result or the one documented
error (ImageError / DecodeError), never another exception, a hang or a huge allocation."""

from __future__ import annotations

import io

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_triton.imaging import ImageError, ImageLimits, preprocess

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seed(fmt: str, mode: str = "RGB", size: tuple[int, int] = (40, 30), **params: object) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


SEEDS = [
    _seed("JPEG"),
    _seed("JPEG", progressive=True),
    _seed("JPEG", "CMYK"),
    _seed("PNG"),
    _seed("PNG", "RGBA"),
    _seed("PNG", "P"),
    _seed("WEBP"),
]


def _check(data: bytes) -> None:
    try:
        tensor = preprocess(data, LIMITS)
    except ImageError as err:
        assert str(err)  # a message a caller can read
        return
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_image_error(data: bytes) -> None:
    _check(data)


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 10_000),
)
def test_mutated_real_images_decode_or_raise_image_error(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut)]) if cut % 3 == 0 else bytes(data))


REQUESTS = [pb.ScoreRequest, pb.AddRatingsRequest, pb.ScoreForUsersRequest, pb.RankAlbumRequest]


@FUZZ
@given(st.sampled_from(REQUESTS), st.binary(max_size=512))
def test_request_parsing_gives_a_message_or_decode_error(kind: type, data: bytes) -> None:
    """What server.ErrorInterceptor relies on: parsing raises nothing but DecodeError (→ INVALID_ARGUMENT)."""
    try:
        message = kind.FromString(data)
    except DecodeError:
        return
    for field in message.DESCRIPTOR.fields:  # strings that parsed are valid UTF-8
        value = getattr(message, field.name)
        if isinstance(value, str):
            value.encode("utf-8")


def test_a_string_field_with_invalid_utf8_is_a_decode_error() -> None:
    raw = b"\x0a\x03\xff\xfe\xfd"  # field 1 (user_id), length 3, not UTF-8
    try:
        pb.ScoreRequest.FromString(raw)
    except DecodeError:
        return
    raise AssertionError("protobuf accepted a non-UTF-8 string")


def test_extreme_aspect_ratios_are_refused_before_resizing() -> None:
    """A 120-byte 40000×1 PNG would resize to 10 G pixels (MemoryError, or Triton's stub killed)."""
    for size in ((40_000, 1), (1, 5_000), (2_100, 100)):
        buffer = io.BytesIO()
        Image.new("L", size, 128).save(buffer, format="PNG")
        try:
            preprocess(buffer.getvalue())
        except ImageError as err:
            assert "20:1" in str(err)
        else:
            raise AssertionError(f"{size} was accepted")
    wide = io.BytesIO()
    Image.new("L", (2_000, 100), 128).save(wide, format="PNG")  # 20:1 is still a panorama we take
    assert preprocess(wide.getvalue()).shape == (3, 224, 224)
