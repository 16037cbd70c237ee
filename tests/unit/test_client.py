"""The client's pure parts: messages, validation, the retry service config, error mapping, CLI checks."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from piaa_client import AsyncClient, Client, calls, cli, errors
from piaa_client import types as t
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.errors import InvalidRequest, ServerError


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


def test_every_call_is_idempotent_add_ratings_by_its_request_id() -> None:
    for call in _all_calls():
        assert call.idempotent, call.method
    first, second = (calls.add_ratings("u", [t.Rating(b"x", 3)]) for _ in range(2))
    assert str(uuid.UUID(first.request.request_id, version=4)) == first.request.request_id
    assert first.request.request_id != second.request.request_id  # one fresh id per logical call
    chosen = calls.add_ratings("u", [t.Rating(b"x", 3)], request_id="order-17")
    assert chosen.request.request_id == "order-17"
    reply = pb.AddRatingsResponse(profile=pb.Profile(user_id="u", exists=True), digests=["d"], replayed=True)
    receipt = chosen.parse(reply)
    assert receipt.replayed and receipt.request_id == "order-17" and receipt.digests == ["d"]


def _all_calls() -> list[calls.Call[Any]]:
    return [
        calls.score("u", [b"x"], False),
        calls.score_for_users(b"x", ["u"]),
        calls.rank_album("u", [b"x"], 0),
        calls.add_ratings("u", [t.Rating(b"x", 3)]),
        calls.suggest_images_to_rate("u", [b"x"], 1),
        calls.get_profile("u"),
        calls.delete_profile("u"),
    ]


def test_every_rpc_of_the_proto_has_a_call() -> None:
    service = pb.DESCRIPTOR.services_by_name["Personalization"]
    assert service.full_name == calls.SERVICE
    unary = {m.name for m in service.methods if not m.client_streaming and not m.server_streaming}
    assert unary == {c.method for c in _all_calls()}
    # The stream has a method of its own in both clients.
    assert {m.name for m in service.methods} - unary == {"ScoreStream"}
    assert callable(Client.score_stream) and callable(AsyncClient.score_stream)


def test_a_score_stream_keeps_its_window_and_resends_what_was_unanswered_first() -> None:
    jobs = [("u", [b"x%d" % i]) for i in range(7)]
    stream = calls.ScoreStreamState(jobs, False, True, window=3)
    first = stream.to_send()
    assert [r.images[0].data for r in first] == [b"x0", b"x1", b"x2"] and stream.to_send() == []
    assert all(r.allow_partial and r.user_id == "u" for r in first)
    answer = pb.ScoreStreamResponse(response=pb.ScoreResponse(scores=[pb.ImageScore(id="a", score=0.5)]))
    (scored,) = stream.answered(answer)  # type: ignore[misc]
    assert scored.score == 0.5
    assert [r.images[0].data for r in stream.to_send()] == [b"x3"]
    failed = stream.answered(pb.ScoreStreamResponse(error=pb.CallError(code=3, message="bad image")))
    assert isinstance(failed, InvalidRequest) and "bad image" in str(failed)
    # The stream breaks with x2 and x3 unanswered: a new one sends them first, then goes on.
    stream.reopen()
    assert [r.images[0].data for r in stream.to_send()] == [b"x2", b"x3", b"x4"]
    for _ in range(3):
        stream.answered(answer)
    assert [r.images[0].data for r in stream.to_send()] == [b"x5", b"x6"]
    assert stream.exhausted and not stream.finished
    stream.answered(answer)
    stream.answered(answer)
    assert stream.finished
    with pytest.raises(ServerError):
        stream.answered(answer)


def test_retry_policy_renders_grpc_service_config_for_the_idempotent_calls_only() -> None:
    policy = calls.RetryPolicy(max_attempts=5, initial_backoff_s=0.05, max_backoff_s=1.5, multiplier=3)
    config = json.loads(policy.service_config())
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {(calls.SERVICE, c.method) for c in _all_calls() if c.idempotent}
    assert (calls.SERVICE, "AddRatings") in names
    assert method_config["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.05s",
        "maxBackoff": "1.5s",
        "backoffMultiplier": 3,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    # The codes the policy retries are exactly the ones the error tree calls retryable.
    retryable = {
        code.name for code in grpc.StatusCode if errors.from_rpc_error(_FakeRpcError(code)).retryable
    }
    assert set(method_config["retryPolicy"]["retryableStatusCodes"]) == retryable


def test_default_and_disabled_retry_policies() -> None:
    default = json.loads(calls.DEFAULT_RETRY.service_config())["methodConfig"][0]["retryPolicy"]
    assert (
        default["maxAttempts"] == 4 and default["initialBackoff"] == "0.1s" and default["maxBackoff"] == "2s"
    )
    assert json.loads(calls.NO_RETRY.service_config()) == {"methodConfig": []}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 6},
        {"initial_backoff_s": 0},
        {"max_backoff_s": -1},
        {"multiplier": 0},
    ],
)
def test_retry_policies_grpc_would_reject_or_cap_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        calls.RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_channel_options_turn_grpc_retries_on_with_the_policy() -> None:
    policy = calls.RetryPolicy(max_attempts=2)
    options = dict(calls.channel_options(policy))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.service_config"] == policy.service_config()
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"]
    # A request as large as the message limit still fits the retry buffer, so it stays retryable.
    assert options["grpc.per_rpc_retry_buffer_size"] >= options["grpc.max_send_message_length"]


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


def test_stream_reopens_back_off_as_grpc_retries_do() -> None:
    policy = calls.RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2)
    for retry, bound in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)):
        delays = [policy.backoff_s(retry) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays) and max(delays) > bound / 2
