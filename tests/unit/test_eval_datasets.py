"""Dataset loaders on generated data in exactly the FLICKR-AES and REAL-CUR formats, and the rater split."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from piaa_personalization.evaluation.datasets import (
    FLICKR_AES_CSV,
    DatasetError,
    load_flickr_aes,
    load_real_cur,
    read_worker_list,
)
from piaa_personalization.evaluation.protocol import split_raters


def _jpegs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (32, 24), (i * 20 % 256, 80, 160)).save(folder / name, "JPEG")


def _flickr(tmp_path: Path, rows: list[str], header: str = "worker, imagePair, score") -> Path:
    _jpegs(tmp_path / "40K", [f"farm1_{i}_{i:04d}.jpg" for i in range(6)])
    csv_file = tmp_path / FLICKR_AES_CSV
    csv_file.write_text("\n".join([header, *rows]) + "\n")
    return csv_file


def test_flickr_aes_reads_the_per_worker_csv(tmp_path: Path) -> None:
    rows = [f"A1B2, farm1_{i}_{i:04d}.jpg, {1 + i % 5}" for i in range(6)]
    rows += [f"C3D4, farm1_{i}_{i:04d}.jpg, {5 - i % 5}" for i in (0, 2, 4)]
    ratings = load_flickr_aes(_flickr(tmp_path, rows), tmp_path / "40K")
    assert ratings.raters == ("A1B2", "C3D4")
    assert len(ratings) == 9 and len(ratings.images) == 6
    assert ratings.counts().tolist() == [6, 3]
    images, stars = ratings.of(1)
    assert [ratings.images[i].name for i in images] == [
        "farm1_0_0000.jpg",
        "farm1_2_0002.jpg",
        "farm1_4_0004.jpg",
    ]
    assert stars.tolist() == [5.0, 3.0, 1.0]
    assert all(p.parent == tmp_path / "40K" for p in ratings.images)


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["w, farm1_0_0000.jpg, 6"], "worker, imagePair, score", "outside 1..5"),
        (["w, farm1_0_0000.jpg, x"], "worker, imagePair, score", "not a number"),
        (["w, nope.jpg, 3"], "worker, imagePair, score", "not in"),
        (["w, farm1_0_0000.jpg, 3", "w, farm1_0_0000.jpg, 4"], "worker, imagePair, score", "twice"),
        (["w, farm1_0_0000.jpg, 3"], "worker, image, score", "expected columns"),
    ],
)
def test_flickr_aes_rejects_bad_rows(tmp_path: Path, rows: list[str], header: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_flickr_aes(_flickr(tmp_path, rows, header), tmp_path / "40K")


def test_real_cur_reads_csv_and_txt_albums(tmp_path: Path) -> None:
    _jpegs(tmp_path / "bob", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "bob" / "ratings.csv").write_text("image,score\na.jpg,4\nb.jpg,2\n")  # c.jpg unrated
    _jpegs(tmp_path / "alice", ["x.jpg", "y.jpg"])
    (tmp_path / "alice" / "ratings.txt").write_text("x.jpg 5\n\ny.jpg\t1\n")
    ratings = load_real_cur(tmp_path)
    assert ratings.raters == ("alice", "bob")  # owners sorted by folder name
    assert [(ratings.raters[r], ratings.images[i].name, s) for r, i, s in
            zip(ratings.rater, ratings.image, ratings.stars, strict=True)] == [
        ("alice", "x.jpg", 5.0), ("alice", "y.jpg", 1.0), ("bob", "a.jpg", 4.0), ("bob", "b.jpg", 2.0)
    ]  # fmt: skip


def test_real_cur_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no album folders"):
        load_real_cur(tmp_path)
    _jpegs(tmp_path / "bob", ["a.jpg"])
    with pytest.raises(DatasetError, match=r"no ratings\.csv"):
        load_real_cur(tmp_path)
    (tmp_path / "bob" / "ratings.txt").write_text("a.jpg 3\nmissing.jpg 4\n")
    with pytest.raises(DatasetError, match=r"missing\.jpg does not exist"):
        load_real_cur(tmp_path)
    (tmp_path / "bob" / "ratings.txt").write_text("a.jpg 3 extra\n")
    with pytest.raises(DatasetError, match="every line"):
        load_real_cur(tmp_path)


def test_split_by_worker_list_or_at_random(tmp_path: Path) -> None:
    rows = [f"w{w}, farm1_{i}_{i:04d}.jpg, 3" for w in range(10) for i in range(6)]
    ratings = load_flickr_aes(_flickr(tmp_path, rows), tmp_path / "40K")
    listing = tmp_path / "test_workers.txt"
    listing.write_text("# the literature's test workers\nw3\n\nw7  # trailing comment\n")
    workers = read_worker_list(listing)
    assert workers == ["w3", "w7"]
    split = split_raters(ratings, test_workers=workers)
    assert [ratings.raters[i] for i in split.test] == ["w3", "w7"]
    assert len(split.train) == 8 and not set(split.train) & set(split.test)
    with pytest.raises(KeyError, match="w99"):
        split_raters(ratings, test_workers=["w3", "w99"])
    a, b = split_raters(ratings, n_test=4, seed=1), split_raters(ratings, n_test=4, seed=1)
    assert a == b and len(a.test) == 4 and sorted(a.train + a.test) == list(range(10))
    with pytest.raises(ValueError):
        split_raters(ratings, n_test=11)


def test_the_command_reports_bad_data_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from piaa_personalization.evaluation.cli import main

    assert main(["flickr-aes", "--csv", str(tmp_path / "none.csv"), "--images", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["real-cur", "--root", str(tmp_path)]) == 2
