"""The client's pure parts: message translation, validation, retry policy, error mapping, CLI input checks."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from piaa_client import calls, cli, errors
from piaa_client import types as t
from piaa_client.api.v1 import piaa_pb2 as pb


def test_image_inputs_become_messages(tmp_path: Path) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"\xff\xd8\xffdata")
    assert t.image_message(photo) == pb.Image(data=b"\xff\xd8\xffdata", id="a.jpg")
    assert t.image_message(str(photo)).id == "a.jpg"
    assert t.image_message(b"raw").data == b"raw"
    assert t.image_message(t.ImageRef("ab" * 32, "x")) == pb.Image(digest="ab" * 32, id="x")


def test_unreadable_image_fails_before_any_call(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        calls.score("u", [tmp_path / "missing.jpg"], generic_only=False)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_ratings_are_refused_client_side(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        t.rating_message(t.Rating(b"x", value))


def test_unknown_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        t.rating_message(t.Rating(b"x", 3, "percent"))  # type: ignore[arg-type]


def test_score_reply_is_typed() -> None:
    reply = pb.ScoreResponse(
        scores=[
            pb.ImageScore(
                id="a",
                digest="d",
                score=0.75,
                generic_score=0.5,
                attributes=[pb.Attribute(name="Light", value=0.25)],
                content=[0.5, 0.5],
                personalized=False,
                fallback_reason=pb.FALLBACK_REASON_STALE_PROFILE,
            )
        ]
    )
    (score,) = calls.score("u", [b"x"], generic_only=False).parse(reply)
    assert score.attributes == {"Light": 0.25}
    assert score.content == (0.5, 0.5)
    assert score.fallback_reason == "stale_profile"
    assert not score.personalized


def test_only_add_ratings_is_not_idempotent() -> None:
    assert not calls.add_ratings("u", [t.Rating(b"x", 3)]).idempotent
    for call in (
        calls.score("u", [b"x"], False),
        calls.rank_album("u", [b"x"], 0),
        calls.get_profile("u"),
        calls.delete_profile("u"),
        calls.suggest_images_to_rate("u", [b"x"], 1),
        calls.score_for_users(b"x", ["u"]),
    ):
        assert call.idempotent, call.method


def test_retry_delays_grow_and_stay_bounded() -> None:
    policy = calls.RetryPolicy(max_attempts=6, initial_backoff_s=0.1, max_backoff_s=0.4, multiplier=2)
    delays = list(policy.delays())
    assert len(delays) == 5
    ceilings = [0.1, 0.2, 0.4, 0.4, 0.4]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert list(calls.NO_RETRY.delays()) == []


def test_metadata_carries_token_and_tenant() -> None:
    assert calls.metadata("s3cret", "acme") == (("authorization", "Bearer s3cret"), ("x-piaa-tenant", "acme"))
    assert calls.metadata(None, None) == ()


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "boom"


@pytest.mark.parametrize(
    ("code", "cls", "retryable"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequest, False),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Overloaded, True),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded, False),
        (grpc.StatusCode.INTERNAL, errors.ServerError, False),
    ],
)
def test_status_codes_map_to_the_exception_tree(
    code: grpc.StatusCode, cls: type[errors.PiaaError], retryable: bool
) -> None:
    error = errors.from_rpc_error(_FakeRpcError(code))
    assert type(error) is cls
    assert error.retryable is retryable
    assert "boom" in str(error)


def test_cli_reports_missing_files_and_bad_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["score", "--user", "u", str(tmp_path / "nope.jpg")]) == cli.EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "r.csv"
    bad.write_text("file,stars\na.jpg,3\n")
    assert cli.main(["rate", "--user", "u", str(bad)]) == cli.EXIT_USAGE
    assert "path,rating" in capsys.readouterr().err
    (tmp_path / "a.jpg").write_bytes(b"x")
    bad.write_text("path,rating\na.jpg,three\n")
    assert cli.main(["rate", "--user", "u", str(bad)]) == cli.EXIT_USAGE
    assert "not a number" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["rank", "--user", "u", str(empty)]) == cli.EXIT_USAGE
    assert "no images" in capsys.readouterr().err
