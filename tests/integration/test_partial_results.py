"""Albums with a broken photo, against the real stack: allow_partial scores the rest and names the broken
one in place; without it the call fails as before; the CLI lists the failures and exits with EXIT_PARTIAL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from piaa_client import AsyncClient, Client, cli
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.errors import InvalidRequest
from piaa_client.types import Rating
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import Photo

BROKEN = "broken.jpg"
BAD_AT = 5
"""Where the broken photo sits in the album (request order)."""


@pytest.fixture(scope="module")
def album(photos: list[Photo]) -> list[tuple[str, bytes]]:
    """(id, bytes) of 12 real photos with a truncated JPEG (a real photo's first third) at BAD_AT."""
    good = [(p.path.name, p.path.read_bytes()) for p in photos[3::61][:12]]
    jpeg = photos[700].path.read_bytes()
    return [*good[:BAD_AT], (BROKEN, jpeg[: len(jpeg) // 3]), *good[BAD_AT:]]


@pytest.fixture(scope="module")
def user(gateway: GatewayProcess, photos: list[Photo]) -> str:
    """A user with 12 ratings, so the album is personalized."""
    user_id = f"partial-{uuid.uuid4().hex[:8]}"
    with Client(gateway.address, timeout=120) as client:
        client.add_ratings(user_id, [Rating(p.path, 1 + i % 5) for i, p in enumerate(photos[400::31][:12])])
    return user_id


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.PersonalizationStub]:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(gateway.address, options=options) as channel:
        yield pb_grpc.PersonalizationStub(channel)


def images(album: list[tuple[str, bytes]]) -> list[pb.Image]:
    return [pb.Image(data=data, id=name) for name, data in album]


def test_score_with_allow_partial_returns_the_broken_photo_in_place(
    stub: pb_grpc.PersonalizationStub, album: list[tuple[str, bytes]], user: str
) -> None:
    reply = stub.Score(pb.ScoreRequest(user_id=user, images=images(album), allow_partial=True), timeout=120)
    assert [s.id for s in reply.scores] == [name for name, _ in album]
    bad = reply.scores[BAD_AT]
    assert bad.HasField("error") and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert BROKEN in bad.error.message and "JPEG" in bad.error.message
    assert len(bad.digest) == 64 and bad.score == 0 and not bad.attributes
    good = [s for i, s in enumerate(reply.scores) if i != BAD_AT]
    assert not any(s.HasField("error") for s in good)
    assert all(s.personalized for s in good)
    # The others score exactly as they do in an album without the broken photo.
    alone = stub.Score(
        pb.ScoreRequest(user_id=user, images=images(album)[:BAD_AT] + images(album)[BAD_AT + 1 :])
    )
    assert [(s.id, s.score) for s in good] == [(s.id, s.score) for s in alone.scores]


def test_rank_with_allow_partial_ranks_the_rest_and_lists_the_broken_one_after(
    stub: pb_grpc.PersonalizationStub, album: list[tuple[str, bytes]], user: str
) -> None:
    request = pb.RankAlbumRequest(user_id=user, images=images(album), top_k=5, allow_partial=True)
    ranked = stub.RankAlbum(request, timeout=120).ranked
    assert len(ranked) == 6
    assert ranked[5].id == BROKEN and ranked[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    good = [pb.Image(data=d, id=n) for n, d in album if n != BROKEN]
    expected = stub.RankAlbum(pb.RankAlbumRequest(user_id=user, images=good, top_k=5), timeout=120).ranked
    assert [(s.id, s.score) for s in ranked[:5]] == [(s.id, s.score) for s in expected]
    scores = [s.score for s in ranked[:5]]
    assert scores == sorted(scores, reverse=True)


def test_without_allow_partial_the_broken_photo_fails_the_call(
    stub: pb_grpc.PersonalizationStub, album: list[tuple[str, bytes]], user: str
) -> None:
    for call in (
        lambda: stub.Score(pb.ScoreRequest(user_id=user, images=images(album)), timeout=120),
        lambda: stub.RankAlbum(pb.RankAlbumRequest(user_id=user, images=images(album)), timeout=120),
    ):
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert BROKEN in (failure.value.details() or "")


async def test_clients_type_the_error(
    gateway: GatewayProcess, album: list[tuple[str, bytes]], user: str
) -> None:
    data = [d for _, d in album]
    with Client(gateway.address, timeout=120) as client:
        scores = client.score(user, data, allow_partial=True)
        with pytest.raises(InvalidRequest, match="INVALID_ARGUMENT"):
            client.rank_album(user, data)
    async with AsyncClient(gateway.address, timeout=120) as aclient:
        ranked = await aclient.rank_album(user, data, allow_partial=True)
    failed = scores[BAD_AT]
    assert (
        failed.error is not None
        and failed.error.code == "INVALID_ARGUMENT"
        and "JPEG" in failed.error.message
    )
    assert [s.error for s in scores].count(None) == len(album) - 1
    assert ranked[-1].error == failed.error and ranked[-1].digest == failed.digest
    assert all(s.error is None for s in ranked[:-1])


@pytest.fixture
def folder(album: list[tuple[str, bytes]], tmp_path: Path) -> Path:
    """The album as a folder of files (the broken one among them)."""
    root = tmp_path / "album"
    root.mkdir()
    for name, data in album:
        (root / name).write_bytes(data)
    return root


def test_cli_scores_a_folder_with_a_broken_file_and_lists_it(
    gateway: GatewayProcess, folder: Path, user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--server", gateway.address, "--user", user, "--timeout", "120"]
    assert cli.main(["score", *common, "--json", str(folder)]) == cli.EXIT_PARTIAL
    out, err = capsys.readouterr()
    results = {r["id"]: r for r in json.loads(out)}
    assert len(results) == 13 and results[BROKEN]["error"]["code"] == "INVALID_ARGUMENT"
    assert sum(r["error"] is None and r["personalized"] for r in results.values()) == 12
    assert "could not score 1 of 13 images" in err and f"{BROKEN}: INVALID_ARGUMENT" in err

    report = tmp_path / "report.html"
    assert cli.main(["rank", *common, str(folder), "--top", "3", "--html", str(report)]) == cli.EXIT_PARTIAL
    out, err = capsys.readouterr()
    table = [line.split() for line in out.splitlines()[2:5]]
    assert [row[0] for row in table] == ["1", "2", "3"] and BROKEN not in out
    assert f"{BROKEN}: INVALID_ARGUMENT" in err
    page = report.read_text()
    assert "Could not be scored (1)" in page and BROKEN in page

    assert cli.main(["score", *common, "--strict", str(folder)]) == cli.EXIT_SERVER
    _, err = capsys.readouterr()
    assert "INVALID_ARGUMENT" in err and BROKEN in err


def test_cli_exits_zero_when_every_file_scores(
    gateway: GatewayProcess, folder: Path, user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / BROKEN).unlink()
    assert cli.main(["rank", "--server", gateway.address, "--user", user, str(folder)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 + 12 and "could not score" not in err
