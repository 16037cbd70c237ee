"""The album report renders in headless Chromium with its thumbnails and bars (no network needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from piaa_client.features import ATTRIBUTES, CONTENT_NAMES
from piaa_client.report import album_report
from piaa_client.types import ImageScore, Profile, TasteFactor
from tests.browser import measure, screenshot
from tests.fixtures.photos import Photo

pytestmark = pytest.mark.browser


def _scores(photos: list[Photo]) -> list[ImageScore]:
    return [
        ImageScore(p.path.name, f"{i:064x}", 0.9 - 0.1 * i, 0.5, {}, (), True, None)
        for i, p in enumerate(photos)
    ]


def _profile() -> Profile:
    weights = [TasteFactor(n, 0.05 * (i - 9)) for i, n in enumerate(ATTRIBUTES + CONTENT_NAMES)]
    return Profile("alice", True, 12, "fs1", 0.0, weights[-3:], weights[:3], weights)


def test_report_shows_thumbnails_and_bars(photos: list[Photo], tmp_path: Path) -> None:
    album = photos[:6]
    scores = _scores(album)
    with_photos = tmp_path / "report.html"
    with_photos.write_text(
        album_report(
            "alice",
            scores,
            {p.path.name: p.path.read_bytes() for p in album},
            _profile(),
            {album[0].path.name: 1.0},
        )
    )
    assert "http" not in with_photos.read_text().replace("http-equiv", "")  # self-contained
    without_photos = tmp_path / "bare.html"
    without_photos.write_text(album_report("alice", scores, {}, _profile()))

    shown = measure(screenshot(with_photos, tmp_path / "report.png"))
    bare = measure(screenshot(without_photos, tmp_path / "bare.png"))

    assert shown.bar_pixels["personalized"] > 2000, shown
    assert shown.bar_pixels["generic"] > 2000, shown
    assert shown.bar_pixels["rating"] > 200, shown
    # Six thumbnails bring over ten thousand textured, coloured pixels; the bare page has a few hundred.
    assert shown.photo_pixels > max(10_000, 20 * bare.photo_pixels), (shown, bare)
