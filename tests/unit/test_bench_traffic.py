"""piaa_bench.traffic (what the Locust users send) and piaa_bench.slo (a run's objective as an exit code)."""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from piaa_bench.slo import Observed, Slo, breaches
from piaa_bench.traffic import Traffic, UploadSizes, ZipfSampler, photo_pool, synthetic_photo


def test_zipf_probabilities_fall_with_rank_and_draws_follow_them() -> None:
    zipf = ZipfSampler(100, 1.1)
    probs = [zipf.probability(k) for k in range(100)]
    assert sum(probs) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(probs))
    assert probs[0] / probs[9] == pytest.approx(10**1.1)
    rng = random.Random(1)
    counts = Counter(zipf.draw(rng) for _ in range(40_000))
    assert set(counts) <= set(range(100))
    for rank in (0, 1, 9):
        assert counts[rank] / 40_000 == pytest.approx(probs[rank], rel=0.1)


def test_zipf_with_exponent_zero_is_uniform_and_bad_laws_are_refused() -> None:
    zipf = ZipfSampler(4, 0.0)
    assert [zipf.probability(k) for k in range(4)] == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError):
        ZipfSampler(0, 1.0)
    with pytest.raises(ValueError):
        ZipfSampler(3, -1.0)


def test_upload_sizes_stay_within_bounds_around_the_median() -> None:
    sizes = UploadSizes(median_px=800)
    rng = random.Random(2)
    drawn = [sizes.draw(rng) for _ in range(2000)]
    longs = sorted(max(w, h) for w, h in drawn)
    assert longs[0] >= sizes.min_px and longs[-1] <= sizes.max_px
    assert 700 <= longs[len(longs) // 2] <= 900
    assert any(w < h for w, h in drawn) and any(w > h for w, h in drawn)  # portraits and landscapes


def test_synthetic_photo_is_a_jpeg_of_the_size_asked_that_compresses_like_a_photo() -> None:
    data = synthetic_photo((1024, 768), random.Random(3))
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (1024, 768), "RGB")
    assert 20_000 < len(data) < 1024 * 768 * 3 // 8  # far below what noise costs, above a flat fill


def _write_photos(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (60 + i, 40), (i * 20, 100, 50)).save(folder / f"p{i}.png")
    (folder / "labels.csv").write_text("not a photo\n")


def test_photo_pool_from_a_folder_at_upload_sizes_or_as_they_are(tmp_path: Path) -> None:
    _write_photos(tmp_path / "photos", 6)
    sizes = UploadSizes(median_px=400, min_px=300, max_px=500)
    resized, source = photo_pool(tmp_path / "photos", 3, sizes, random.Random(4))
    assert len(resized) == 3 and "upload sizes" in source
    for data in resized:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and 300 <= max(image.size) <= 500
    raw, source = photo_pool(tmp_path / "photos", 3, None, random.Random(4))
    files = sorted((tmp_path / "photos").glob("*.png"))
    assert raw == [files[i].read_bytes() for i in (0, 2, 4)]  # spread over the folder
    assert "as they are" in source


def test_photo_pool_without_a_folder_generates_and_an_empty_folder_fails(tmp_path: Path) -> None:
    photos, source = photo_pool(None, 2, UploadSizes(median_px=320, max_px=400), random.Random(5))
    assert len(photos) == 2 and "synthetic" in source
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        photo_pool(tmp_path / "empty", 2, None, random.Random(5))


def test_traffic_repeats_popular_photos_at_the_share_asked_and_makes_the_rest_unique() -> None:
    pool = [b"\xff\xd8photo-%d\xff\xd9" % i for i in range(8)]
    traffic = Traffic(pool, users=50, repeat_share=0.3, popular=4, run_id="r1")
    rng = random.Random(6)
    images = traffic.images(rng, 5000)
    repeats = [i for i in images if i in pool]
    fresh = [i for i in images if i not in pool]
    assert len(repeats) / len(images) == pytest.approx(0.3, abs=0.03)
    assert set(repeats) <= set(pool[:4])  # only the popular part of the pool comes back
    assert Counter(repeats).most_common(1)[0][0] == pool[0]
    assert len(set(fresh)) == len(fresh)  # every upload is new to the gateway's cache
    assert all(any(f.startswith(p) for p in pool) for f in fresh)  # ...and still a pool photo to a decoder


def test_traffic_users_are_zipf_popular_ids() -> None:
    traffic = Traffic([b"x"], users=1000, user_zipf_s=1.1, user_prefix="u")
    rng = random.Random(7)
    counts = Counter(traffic.user(rng) for _ in range(20_000))
    assert counts.most_common(1)[0][0] == "u0"
    assert len(counts) > 200  # the long tail shows up
    with pytest.raises(ValueError):
        Traffic([b"x"], repeat_share=1.5)


ALL_OK = {"Score": Observed(100, 0, 40.0), "RankAlbum": Observed(10, 0, 300.0)}


def test_no_objective_never_breaches() -> None:
    assert breaches(Slo(), {}, Observed(0, 0, 0.0), 0.0) == []
    assert not Slo().active


def test_p99_is_checked_per_rpc_and_rpcs_narrow_it() -> None:
    total = Observed(110, 0, 290.0)
    assert breaches(Slo(p99_ms=100), ALL_OK, total, 5.0) == ["RankAlbum: p99 300 ms > 100 ms"]
    assert breaches(Slo(p99_ms=100, rpcs=("Score",)), ALL_OK, total, 5.0) == []
    assert breaches(Slo(p99_ms=100, rpcs=("ScoreStream",)), ALL_OK, total, 5.0) == [
        "ScoreStream: no requests (its p99 cannot be checked)"
    ]


def test_error_ratio_and_rate_bounds() -> None:
    total = Observed(1000, 2, 50.0)
    assert breaches(Slo(max_error_ratio=0.002), ALL_OK, total, 5.0) == []
    assert breaches(Slo(max_error_ratio=0.001), ALL_OK, total, 5.0) == [
        "error ratio 0.0020 (2 of 1000) > 0.001"
    ]
    assert breaches(Slo(min_rps=10), ALL_OK, total, 9.5) == ["rate 9.50 requests/s < 10"]
    assert breaches(Slo(min_rps=10), ALL_OK, total, 10.0) == []


def test_a_run_without_requests_misses_any_objective_and_bad_bounds_are_refused() -> None:
    assert breaches(Slo(max_error_ratio=0.5), {}, Observed(0, 0, 0.0), 0.0) == ["no requests were made"]
    with pytest.raises(ValueError):
        Slo(p99_ms=-1)
    with pytest.raises(ValueError):
        Slo(min_rps=float("nan"))
