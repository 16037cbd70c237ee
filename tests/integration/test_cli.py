"""The `piaa` CLI and the Python clients against the real stack (gateway, Triton, Redis over loopback)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from piaa_client import AsyncClient, Client, cli
from piaa_client.errors import InvalidRequest
from piaa_client.features import ATTRIBUTES, NUM_CONTENT_CLUSTERS
from piaa_client.types import ImageRef, Rating
from tests.browser import measure, screenshot
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import Photo

ANIMALS = range(398)  # ImageNet classes 0-397 are animals


@pytest.fixture
def user() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def album(photos: list[Photo], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 12-photo album and a ratings CSV for 20 other photos (animals 5 stars, the rest 1)."""
    root = tmp_path_factory.mktemp("album")
    album_dir, rated_dir = root / "album", root / "rated"
    album_dir.mkdir()
    rated_dir.mkdir()
    for photo in photos[::67][:12]:
        shutil.copy(photo.path, album_dir / photo.path.name)
    rows = ["path,rating"]
    for photo in photos[5::40][:20]:
        shutil.copy(photo.path, rated_dir / photo.path.name)
        rows.append(f"rated/{photo.path.name},{5 if photo.imagenet_index in ANIMALS else 1}")
    (root / "ratings.csv").write_text("\n".join(rows) + "\n")
    return album_dir, root / "ratings.csv"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_in_a_journey(
    gateway: GatewayProcess,
    album: tuple[Path, Path],
    user: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    album_dir, ratings = album
    common = ["--server", gateway.address, "--user", user]

    code, out, _ = run_cli(capsys, "profile", *common)
    assert code == 0 and "no profile" in out

    code, out, _ = run_cli(capsys, "score", *common, "--json", str(album_dir))
    assert code == 0
    scored = json.loads(out)
    assert len(scored) == 12
    assert all(s["fallback_reason"] == "no_profile" and not s["personalized"] for s in scored)
    assert (
        set(scored[0]["attributes"]) == set(ATTRIBUTES) and len(scored[0]["content"]) == NUM_CONTENT_CLUSTERS
    )

    code, out, _ = run_cli(capsys, "rate", *common, str(ratings), "--scale", "stars")
    assert code == 0 and "recorded 20 ratings" in out

    code, out, _ = run_cli(capsys, "profile", *common, "--json")
    profile = json.loads(out)
    assert code == 0 and profile["num_ratings"] == 20 and profile["exists"]

    # A named import run again (as after a failure part-way) records nothing twice; an unnamed run records.
    named = [*common, str(ratings), "--import-id", "album-2026", "--json"]
    code, out, _ = run_cli(capsys, "rate", *named)
    assert code == 0 and json.loads(out)["already_recorded"] == 0 and json.loads(out)["num_ratings"] == 40
    code, out, _ = run_cli(capsys, "rate", *named)
    assert code == 0 and json.loads(out)["already_recorded"] == 20 and json.loads(out)["num_ratings"] == 40
    code, out, _ = run_cli(capsys, "rate", *named[:-1])  # the same, in words
    assert code == 0 and "(20 were recorded by this import before" in out and "holds 40" in out
    code, out, _ = run_cli(capsys, "rate", *common, str(ratings))
    assert code == 0 and "by this import before" not in out and "profile now holds 60" in out

    report = tmp_path / "report.html"
    code, out, _ = run_cli(capsys, "rank", *common, str(album_dir), "--top", "5", "--html", str(report))
    assert code == 0 and "report written" in out
    table = [line.split() for line in out.splitlines()[2:7]]
    assert [row[0] for row in table] == ["1", "2", "3", "4", "5"]
    assert all(row[-1] == "yes" for row in table)  # personalized after the ratings
    scores = [float(row[2]) for row in table]
    assert scores == sorted(scores, reverse=True)
    shown = measure(screenshot(report, tmp_path / "report.png"))
    assert shown.bar_pixels["personalized"] > 1000 and shown.photo_pixels > 5000, shown

    code, out, _ = run_cli(capsys, "suggest", *common, str(album_dir), "-k", "3", "--json")
    suggestions = json.loads(out)
    assert code == 0 and len(suggestions) == 3
    assert len({s["digest"] for s in suggestions}) == 3

    code, out, _ = run_cli(capsys, "forget", *common)
    assert code == 0 and "deleted" in out
    code, out, _ = run_cli(capsys, "profile", *common)
    assert "no profile" in out


def test_error_paths(
    gateway: GatewayProcess, user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    code, _, err = run_cli(capsys, "score", "--server", gateway.address, "--user", user, str(broken))
    assert code == cli.EXIT_PARTIAL and "broken.jpg: INVALID_ARGUMENT" in err
    code, _, err = run_cli(
        capsys, "score", "--server", gateway.address, "--user", user, "--strict", str(broken)
    )
    assert code == cli.EXIT_SERVER and "INVALID_ARGUMENT" in err

    code, _, err = run_cli(capsys, "profile", "--server", "127.0.0.1:1", "--user", user, "--timeout", "3")
    assert code == cli.EXIT_UNAVAILABLE and "cannot reach" in err

    code, _, err = run_cli(capsys, "score", "--server", gateway.address, "--user", "", str(broken))
    assert code == cli.EXIT_SERVER and "INVALID_ARGUMENT" in err

    ratings = tmp_path / "r.csv"
    ratings.write_text("path,rating\nbroken.jpg,9\n")
    code, _, err = run_cli(capsys, "rate", "--server", gateway.address, "--user", user, str(ratings))
    assert code == cli.EXIT_SERVER and "INVALID_ARGUMENT" in err


def test_sync_client_with_digests(gateway: GatewayProcess, photos: list[Photo], user: str) -> None:
    with Client(gateway.address, timeout=60) as client:
        first = client.score(user, [photos[0].path, photos[1].path])
        assert [s.id for s in first] == [photos[0].path.name, photos[1].path.name]
        # Rate by digest: the service has seen these images, so no bytes travel again.
        receipt = client.add_ratings(user, [Rating(ImageRef(s.digest), 4.0) for s in first])
        assert receipt.profile.num_ratings == 2 and receipt.digests == [s.digest for s in first]
        with pytest.raises(InvalidRequest):
            client.add_ratings(user, [Rating(ImageRef(first[0].digest), 7.0)])  # outside 1-5 stars
        assert client.get_profile(user).num_ratings == 2
        users = client.score_for_users(photos[2].path, [user, "nobody-" + user])
        assert [u.user_id for u in users.scores] == [user, "nobody-" + user]
        assert users.scores[1].fallback_reason == "no_profile"
        assert client.delete_profile(user)


async def test_async_client_mirrors_sync(gateway: GatewayProcess, photos: list[Photo], user: str) -> None:
    async with AsyncClient(gateway.address, timeout=60) as client:
        scores = await client.score(user, [photos[3].path], generic_only=True)
        assert scores[0].fallback_reason in {"disabled", "no_profile"}
        ranked = await client.rank_album(user, [p.path for p in photos[:4]], top_k=2)
        assert len(ranked) == 2 and ranked[0].score >= ranked[1].score
        assert not (await client.get_profile(user)).exists
