"""Training targets: graded degradations (RankIQA) and the pixel measures behind the attribute head."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from piaa_client.features import ATTRIBUTES
from piaa_export import measures
from piaa_export.degradations import DEGRADATIONS, LEVELS, degrade, to_serving_scale
from piaa_triton.imaging import decode, preprocess, to_tensor
from tests.fixtures.photos import Photo


@pytest.fixture(scope="module")
def photo(photos: list[Photo]) -> Image.Image:
    return to_serving_scale(decode(photos[3].path.read_bytes()))


def test_serving_scale_then_to_tensor_is_exactly_preprocess(photos: list[Photo]) -> None:
    # Training tensors go decode → serving scale → (degrade) → to_tensor; undegraded this must be the
    # serving path bit for bit, or the heads would be fitted on features the server never produces.
    for p in photos[:3]:
        data = p.path.read_bytes()
        np.testing.assert_array_equal(to_tensor(to_serving_scale(decode(data))), preprocess(data))


@pytest.mark.parametrize("name", [n for n in DEGRADATIONS if n != "bad_crop"])
def test_degradations_are_graded_and_deterministic(photo: Image.Image, name: str) -> None:
    original = np.asarray(photo, dtype=np.float64)
    distances = []
    for level in LEVELS:
        a = degrade(photo, name, level, np.random.default_rng(7))
        b = degrade(photo, name, level, np.random.default_rng(7))
        assert a.size == photo.size and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
        distances.append(np.abs(np.asarray(a, dtype=np.float64) - original).mean())
    assert 0 < distances[0] < distances[1], distances


def test_bad_crop_zooms_further_at_level_two() -> None:
    # Gradation of a crop is how much of the frame survives, not a pixel distance: a flat photo with a
    # centred square shows how far each level zooms into a corner.
    frame = np.zeros((256, 384, 3), np.uint8)
    frame[96:160, 160:224] = 255
    image = Image.fromarray(frame)
    mild = degrade(image, "bad_crop", 1, np.random.default_rng(1))
    strong = degrade(image, "bad_crop", 2, np.random.default_rng(1))
    assert mild.size == strong.size == image.size
    assert np.asarray(mild).mean() != frame.mean()
    assert np.array_equal(
        np.asarray(strong), np.asarray(degrade(image, "bad_crop", 2, np.random.default_rng(1)))
    )
    lit = [float((np.asarray(x) > 127).mean()) for x in (image, mild, strong)]
    assert lit[0] != lit[1] != lit[2]


def test_unknown_level_is_refused(photo: Image.Image) -> None:
    with pytest.raises(ValueError, match="level"):
        degrade(photo, "blur", 3, np.random.default_rng(0))


def rgb(array: np.ndarray) -> np.ndarray:
    return np.clip(array, 0, 255).astype(np.uint8)


def test_colorfulness_orders_grey_below_colour() -> None:
    rng = np.random.default_rng(0)
    grey = rgb(np.repeat(rng.uniform(0, 255, (64, 64, 1)), 3, axis=2))
    colour = rgb(rng.uniform(0, 255, (64, 64, 3)))
    assert measures.colorfulness(grey) == pytest.approx(0.0, abs=1e-9)
    assert measures.colorfulness(colour) > 50


def test_light_prefers_mid_exposure_without_clipping() -> None:
    rng = np.random.default_rng(0)
    mid = rgb(rng.normal(128, 40, (64, 64, 3)))
    dark = rgb(rng.normal(15, 10, (64, 64, 3)))
    blown = rgb(rng.normal(245, 10, (64, 64, 3)))
    assert measures.light(mid) > measures.light(dark)
    assert measures.light(mid) > measures.light(blown)


def test_depth_of_field_rewards_sharp_centre_and_soft_surround() -> None:
    rng = np.random.default_rng(0)
    sharp = Image.fromarray(rgb(rng.uniform(0, 255, (128, 128, 3))))
    soft = sharp.filter(ImageFilter.GaussianBlur(4))
    shallow = np.asarray(soft).copy()
    shallow[32:96, 32:96] = np.asarray(sharp)[32:96, 32:96]
    inverted = np.asarray(sharp).copy()
    inverted[32:96, 32:96] = np.asarray(soft)[32:96, 32:96]
    assert measures.depth_of_field(shallow) > 0 > measures.depth_of_field(inverted)


def test_symmetry_of_a_mirrored_image() -> None:
    rng = np.random.default_rng(0)
    half = rgb(rng.uniform(0, 255, (96, 48, 3)))
    mirrored = np.concatenate([half, half[:, ::-1]], axis=1)
    assert measures.symmetry(mirrored) > 0.95
    assert abs(measures.symmetry(rgb(rng.uniform(0, 255, (96, 96, 3))))) < 0.2


def test_color_harmony_of_one_hue_beats_a_rainbow() -> None:
    one_hue = np.zeros((64, 64, 3), np.uint8)
    one_hue[..., 0] = 200
    one_hue[..., 1] = np.linspace(0, 80, 64).astype(np.uint8)[None, :]
    rainbow = np.asarray(
        Image.fromarray(
            np.stack(
                [np.tile(np.linspace(0, 255, 64), (64, 1)), np.full((64, 64), 255), np.full((64, 64), 255)],
                -1,
            ).astype(np.uint8),
            "HSV",
        ).convert("RGB")
    )
    assert measures.color_harmony(one_hue) == pytest.approx(0.0, abs=1e-9)
    assert measures.color_harmony(rainbow) < -5.0  # degrees outside the best template, on average
    assert measures.color_harmony(np.full((8, 8, 3), 90, np.uint8)) == 0.0  # grey fits every template


def test_repetition_finds_periodic_patterns() -> None:
    x = np.arange(128)
    stripes = rgb(np.repeat((127 + 120 * np.sin(2 * np.pi * x / 16))[None, :, None], 128, 0).repeat(3, 2))
    noise = rgb(np.random.default_rng(0).uniform(0, 255, (128, 128, 3)))
    assert measures.repetition(stripes) > measures.repetition(noise) + 0.3


def test_saliency_measures_follow_the_subject() -> None:
    def blob_at(cx: float, cy: float) -> np.ndarray:
        y, x = np.mgrid[0:96, 0:128]
        blob = 230 * np.exp(-(((x - cx * 128) ** 2 + (y - cy * 96) ** 2) / (2 * 6.0**2)))
        return rgb(np.repeat((20 + blob)[..., None], 3, axis=2))

    centre, third, corner = blob_at(0.5, 0.5), blob_at(1 / 3, 1 / 3), blob_at(0.1, 0.1)
    assert measures.rule_of_thirds(third) > measures.rule_of_thirds(centre)
    assert measures.balancing_elements(centre) > measures.balancing_elements(corner)
    flat = rgb(np.random.default_rng(0).uniform(0, 255, (96, 128, 3)))
    assert measures.object_emphasis(centre) > measures.object_emphasis(flat)


def test_attribute_measures_cover_every_attribute(photo: Image.Image) -> None:
    logits = np.zeros(1000, np.float32)
    logits[3] = 5.0
    values = measures.attribute_measures(np.asarray(photo), logits)
    assert values.shape == (len(ATTRIBUTES),) and np.all(np.isfinite(values))
    assert set(measures.PIXEL_MEASURES) | {"Content"} == set(ATTRIBUTES)
    assert values[ATTRIBUTES.index("Content")] == pytest.approx(measures.imagenet_confidence(logits))


def test_jpeg_degradation_really_encodes(photo: Image.Image) -> None:
    out = degrade(photo, "jpeg", 2, np.random.default_rng(0))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    assert buffer.tell() > 0 and np.asarray(out).std() > 0
