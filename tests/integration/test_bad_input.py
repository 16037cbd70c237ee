"""Bad input through the session gateway: every kind gets a clear INVALID_ARGUMENT (or the size limit's
RESOURCE_EXHAUSTED), the odd-but-valid images work, and the gateway keeps serving everyone else.

Empty / too long user ids, too many images, rating 6, NaN and unspecified scales are already covered in
test_gateway.py::test_request_validation_maps_to_status_codes; this file adds the rest of the bad inputs
listed in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import Photo

INVALID = grpc.StatusCode.INVALID_ARGUMENT
STARS, UNIT = pb.RATING_SCALE_STARS_1_5, pb.RATING_SCALE_UNIT


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)]
    with grpc.insecure_channel(gateway.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.PersonalizationStub:
    return pb_grpc.PersonalizationStub(channel)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A one-colour grayscale PNG header of width × height with the first rows of its (highly
    compressible) data: a few KB that would decode to `width × height` bytes."""
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


def score_code(stub: pb_grpc.PersonalizationStub, data: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        stub.Score(pb.ScoreRequest(user_id="u", images=[pb.Image(data=data)], generic_only=True), timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def bad_images(photo: Photo) -> dict[str, tuple[bytes, str]]:
    """name → (bytes, a word the error must contain)."""
    jpeg = photo.path.read_bytes()
    small = Image.new("RGB", (64, 48), (200, 30, 30))
    rng = np.random.default_rng(8)
    return {
        "zero bytes": (b"", "neither data nor digest"),
        "truncated JPEG": (jpeg[: len(jpeg) // 3], "JPEG"),
        "random bytes": (rng.bytes(4096), "unsupported image format"),
        "JPEG header then garbage": (b"\xff\xd8\xff" + rng.bytes(2048), "JPEG"),
        "PNG bomb 30000x30000": (png_bomb(), "limit"),
        "huge dimensions 10000x6000": (png_bomb(10_000, 6_000), "limit"),
        "extreme aspect 40000x1": (encode(Image.new("L", (40_000, 1)), "PNG"), "20:1"),
        "GIF": (encode(small, "GIF"), "GIF"),
        "TIFF": (encode(small, "TIFF"), "TIFF"),
        "BMP": (encode(small, "BMP"), "BMP"),
        "SVG": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "SVG"),
        "FITS": (b"SIMPLE  =                    T" + b" " * 2850, "FITS"),
        "HEIC": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + rng.bytes(512), "HEIC"),
        "over the 20 MB image limit": (b"\xff\xd8\xff" + b"\x00" * (21 << 20), "MB limit"),
    }


def test_each_bad_image_is_invalid_argument_with_a_reason(
    stub: pb_grpc.PersonalizationStub, channel: grpc.Channel, photos: list[Photo]
) -> None:
    for name, (data, reason) in bad_images(photos[720]).items():
        code, details = score_code(stub, data)
        assert code == INVALID, (name, code, details)
        assert reason in details, (name, details)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_odd_but_valid_images_work(stub: pb_grpc.PersonalizationStub, photos: list[Photo]) -> None:
    photo = Image.open(photos[721].path).convert("RGB").resize((320, 240))
    pixels = np.asarray(photo)
    sixteen = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    upright = encode(photo, "JPEG", quality=95)
    # Stored sideways with EXIF orientation 6 ("rotate 90° clockwise to display"): must score as upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    valid = {
        "16-bit PNG": encode(sixteen, "PNG"),
        "CMYK JPEG": encode(photo.convert("CMYK"), "JPEG"),
        "grayscale JPEG": encode(photo.convert("L"), "JPEG"),
        "grayscale+alpha PNG": encode(photo.convert("LA"), "PNG"),
        "RGBA PNG": encode(rgba, "PNG"),
        "palette PNG": encode(photo.convert("P"), "PNG"),
        "WebP": encode(photo, "WEBP"),
        "upright JPEG": upright,
        "EXIF-rotated JPEG": sideways,
    }
    reply = stub.Score(
        pb.ScoreRequest(user_id="u", images=[pb.Image(id=k, data=v) for k, v in valid.items()]), timeout=120
    )
    scores = {s.id: s.generic_score for s in reply.scores}
    assert set(scores) == set(valid) and all(np.isfinite(list(scores.values())))
    assert scores["EXIF-rotated JPEG"] == pytest.approx(scores["upright JPEG"], abs=0.02)


def test_a_message_over_the_size_limit_is_refused_and_the_gateway_carries_on(
    stub: pb_grpc.PersonalizationStub, photos: list[Photo]
) -> None:
    big = pb.ScoreRequest(user_id="u", images=[pb.Image(data=b"\xff\xd8\xff" + b"\x00" * (65 << 20))])
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(big, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own max_receive_message_length
    reply = stub.Score(
        pb.ScoreRequest(user_id="u", images=[pb.Image(data=photos[722].path.read_bytes())]), timeout=60
    )
    assert len(reply.scores) == 1


def raw_call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Sends `payload` as the serialized request of `method` (bypassing the client's own checks)."""
    call = channel.unary_unary(f"/piaa.v1.Personalization/{method}", request_serializer=None)
    try:
        call(payload, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_user_id_that_is_not_utf8_on_the_wire_is_invalid_argument(channel: grpc.Channel) -> None:
    """protobuf strings must be UTF-8; a hand-built message with raw bytes in user_id (field 1) reaches the
    server, which answers INVALID_ARGUMENT (gRPC's own deserializer would have made it INTERNAL/UNKNOWN)."""
    user_id = b"\xff\xfe\xc3("
    for method in ("GetProfile", "DeleteProfile", "Score", "AddRatings"):
        code, details = raw_call(channel, method, b"\x0a" + bytes([len(user_id)]) + user_id)
        assert code == INVALID, (method, code, details)
        assert "not a valid" in details
    code, _ = raw_call(channel, "GetProfile", b"\x0a\x05ab")  # length past the end of the message
    assert code == INVALID
    ok, _ = raw_call(channel, "GetProfile", b"\x0a\x05caf\xc3\xa9")  # "café"
    assert ok == grpc.StatusCode.OK


def test_bad_ratings_are_refused_and_write_nothing(
    stub: pb_grpc.PersonalizationStub, photos: list[Photo]
) -> None:
    good = pb.Rating(image=pb.Image(data=photos[723].path.read_bytes()), value=4, scale=STARS)
    for value, scale in (
        (float("inf"), STARS),
        (float("-inf"), UNIT),
        (0.0, STARS),
        (-0.1, UNIT),
        (5.5, STARS),
    ):
        # One bad rating among good ones: the whole call is refused before any of it is stored.
        request = pb.AddRatingsRequest(
            user_id="careful", ratings=[good, pb.Rating(image=good.image, value=value, scale=scale), good]
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.AddRatings(request, timeout=60)
        assert err.value.code() == INVALID, (value, scale)
    assert not stub.GetProfile(pb.GetProfileRequest(user_id="careful"), timeout=30).exists


async def test_a_storm_of_bad_input_leaves_good_requests_unaffected(
    gateway: GatewayProcess, photos: list[Photo]
) -> None:
    bad = [data for data, _ in bad_images(photos[724]).values() if len(data) < (1 << 20)]
    goods = [p.path.read_bytes() for p in photos[725:729]]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        astub = pb_grpc.PersonalizationStub(channel)

        async def score(data: bytes) -> grpc.StatusCode:
            try:
                await astub.Score(pb.ScoreRequest(user_id="u", images=[pb.Image(data=data)]), timeout=120)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(score(d) for d in [*bad, *bad, *goods]))
    assert codes[: 2 * len(bad)] == [INVALID] * (2 * len(bad))
    assert codes[2 * len(bad) :] == [grpc.StatusCode.OK] * len(goods)


ALLOWED = {grpc.StatusCode.OK, INVALID, grpc.StatusCode.NOT_FOUND}
"""What a fuzzed request may get: never INTERNAL, UNKNOWN or a dropped connection."""


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(
        ["Score", "AddRatings", "ScoreForUsers", "RankAlbum", "GetProfile", "SuggestImagesToRate"]
    ),
    payload=st.binary(max_size=300),
)
def test_fuzzed_raw_requests_get_a_client_error_never_internal(
    channel: grpc.Channel, method: str, payload: bytes
) -> None:
    code, details = raw_call(channel, method, payload)
    assert code in ALLOWED, (method, payload, code, details)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    user_id=st.text(max_size=70),
    images=st.lists(
        st.one_of(
            st.binary(max_size=200).map(lambda b: pb.Image(data=b)),
            st.text(max_size=70).map(lambda t: pb.Image(digest=t)),
            st.builds(pb.Image, id=st.text(max_size=10)),
        ),
        max_size=4,
    ),
    value=st.floats(allow_nan=True, allow_infinity=True),
    scale=st.sampled_from([0, 1, 2, 7]),
)
def test_fuzzed_structured_requests_get_a_client_error_never_internal(
    stub: pb_grpc.PersonalizationStub, user_id: str, images: list[pb.Image], value: float, scale: int
) -> None:
    ratings = [pb.Rating(image=i, value=value, scale=scale) for i in images]  # type: ignore[arg-type]
    calls = [
        (stub.Score, pb.ScoreRequest(user_id=user_id, images=images)),
        (stub.AddRatings, pb.AddRatingsRequest(user_id=user_id, ratings=ratings)),
    ]
    for call, request in calls:
        try:
            call(request, timeout=30)
        except grpc.RpcError as err:
            assert err.code() in ALLOWED, (request, err.code(), err.details())
