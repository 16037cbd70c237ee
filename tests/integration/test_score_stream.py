"""ScoreStream against the real stack: the same answers as Score, in request order; a request that Score
would fail is answered with its error in place and the stream goes on; the key is checked when the
stream opens and the rate limit per request; a draining gateway answers what it read and ends the stream
with UNAVAILABLE; every request is counted in the metrics with its own code."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from piaa_client import AsyncClient, Client
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.calls import RetryPolicy
from piaa_client.errors import InvalidRequest, PiaaError, Unavailable
from piaa_client.types import ImageScore, Rating
from piaa_common.process import free_port
from piaa_personalization.api.auth import hash_key, new_key
from piaa_personalization.store.redis_server import RedisServer
from piaa_triton.server import TritonServer
from tests.fixtures.gateway import GatewayProcess, start_gateway
from tests.fixtures.photos import Photo

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@pytest.fixture(scope="module")
def user(gateway: GatewayProcess, photos: list[Photo]) -> str:
    """A user with 12 ratings, so their scores are personalized."""
    user_id = f"stream-{uuid.uuid4().hex[:8]}"
    with Client(gateway.address, timeout=120) as client:
        client.add_ratings(user_id, [Rating(p.path, 1 + i % 5) for i, p in enumerate(photos[410::29][:12])])
    return user_id


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.PersonalizationStub]:
    with grpc.insecure_channel(gateway.address, options=OPTIONS) as channel:
        yield pb_grpc.PersonalizationStub(channel)


def _image(photo: Photo) -> pb.Image:
    return pb.Image(id=photo.path.name, data=photo.path.read_bytes())


def _requests(user: str, photos: list[Photo]) -> list[pb.ScoreRequest]:
    """A mix of what a client sends: one photo, several, generic only, by digest after the bytes."""
    album = [_image(p) for p in photos[600:606]]
    broken = pb.Image(id="broken.jpg", data=album[0].data[: len(album[0].data) // 3])
    return [
        pb.ScoreRequest(user_id=user, images=album[:1]),
        pb.ScoreRequest(user_id=user, images=album[1:5]),
        pb.ScoreRequest(user_id=user, images=[album[2], broken]),  # Score fails this one: INVALID_ARGUMENT
        pb.ScoreRequest(user_id="", images=album[:1]),  # and this one: no user
        pb.ScoreRequest(user_id=user, images=album[5:], generic_only=True),
        pb.ScoreRequest(user_id=user, images=[album[2], broken], allow_partial=True),
        pb.ScoreRequest(user_id=user, images=album[:2]),
    ]


def _unary(stub: pb_grpc.PersonalizationStub, request: pb.ScoreRequest) -> pb.ScoreStreamResponse:
    """What Score answers, in ScoreStream's form."""
    try:
        return pb.ScoreStreamResponse(response=stub.Score(request, timeout=120))
    except grpc.RpcError as err:
        return pb.ScoreStreamResponse(error=pb.CallError(code=err.code().value[0], message=err.details()))


def test_a_stream_answers_every_request_in_order_as_score_does(
    stub: pb_grpc.PersonalizationStub, user: str, photos: list[Photo]
) -> None:
    requests = _requests(user, photos)
    expected = [_unary(stub, r) for r in requests]  # also puts every photo into the feature cache
    assert [e.WhichOneof("result") for e in expected] == ["response"] * 2 + ["error"] * 2 + ["response"] * 3
    answers = list(stub.ScoreStream(iter(requests), timeout=120))
    assert answers == expected
    assert answers[2].error.code == INVALID_ARGUMENT and "broken.jpg" in answers[2].error.message
    assert all(s.personalized for s in answers[1].response.scores)
    assert not any(s.personalized for s in answers[4].response.scores)


async def test_pipelined_requests_beyond_the_window_are_all_answered_in_order(
    gateway: GatewayProcess, user: str, photos: list[Photo]
) -> None:
    """100 requests written at once on one stream (window 32): new photos (Triton) and cached ones mixed,
    so later requests finish before earlier ones and must still be answered in order."""
    fresh = [_image(p) for p in photos[640:690]]
    cached = [_image(p) for p in photos[600:606]]
    requests = [
        pb.ScoreRequest(user_id=user, images=[fresh[i // 2] if i % 2 else cached[i % 6]]) for i in range(100)
    ]
    async with grpc.aio.insecure_channel(gateway.address, options=OPTIONS) as channel:
        call = pb_grpc.PersonalizationStub(channel).ScoreStream(timeout=300)
        for request in requests:
            await call.write(request)
        await call.done_writing()
        answers = [a async for a in call]
    assert len(answers) == len(requests)
    for request, answer in zip(requests, answers, strict=True):
        assert answer.WhichOneof("result") == "response", answer
        assert [s.id for s in answer.response.scores] == [i.id for i in request.images]
        assert answer.response.scores[0].personalized


def test_a_request_that_is_not_protobuf_is_answered_with_invalid_argument_in_place(
    gateway: GatewayProcess, user: str, photos: list[Photo]
) -> None:
    good = pb.ScoreRequest(user_id=user, images=[_image(photos[600])]).SerializeToString()
    not_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (user_id) holding bytes that are not UTF-8
    with grpc.insecure_channel(gateway.address, options=OPTIONS) as channel:
        raw = channel.stream_stream("/piaa.v1.Personalization/ScoreStream")
        answers = [
            pb.ScoreStreamResponse.FromString(a) for a in raw(iter([good, not_utf8, good]), timeout=60)
        ]
    assert [a.WhichOneof("result") for a in answers] == ["response", "error", "response"]
    assert answers[1].error.code == INVALID_ARGUMENT
    assert "not a valid ScoreStream message" in answers[1].error.message


def _count(metrics: str, code: str) -> float:
    found = re.search(rf'piaa_requests_total{{code="{code}",method="ScoreStream"}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def test_every_request_of_a_stream_is_counted_with_its_own_code(
    stub: pb_grpc.PersonalizationStub, gateway: GatewayProcess, user: str, photos: list[Photo]
) -> None:
    before = gateway.metrics()
    requests = _requests(user, photos)
    answers = list(stub.ScoreStream(iter(requests), timeout=120))
    after = gateway.metrics()
    failed = sum(a.HasField("error") for a in answers)
    assert _count(after, "OK") - _count(before, "OK") == len(requests) - failed
    assert _count(after, "INVALID_ARGUMENT") - _count(before, "INVALID_ARGUMENT") == failed == 2


# --- a gateway with API keys and a rate limit ------------------------------------------------------------
RATE, BURST = 0.5, 4


@pytest.fixture(scope="module")
def keyed(
    triton_server: TritonServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, str]]:
    key = new_key()
    keys: Path = tmp_path_factory.mktemp("stream-keys") / "keys"
    keys.write_text(f"{hash_key(key)} acme\n")
    gateway = start_gateway(
        redis_server.url, triton_server.grpc_url,
        "--api-keys-file", str(keys), "--rate-limit-per-s", str(RATE), "--rate-limit-burst", str(BURST),
    )  # fmt: skip
    try:
        yield gateway, key
    finally:
        assert gateway.stop() == 0, gateway.output()[-3000:]


def test_a_stream_needs_a_key_and_each_request_counts_against_the_rate_limit(
    keyed: tuple[GatewayProcess, str], photos: list[Photo]
) -> None:
    gateway, key = keyed
    requests = [pb.ScoreRequest(user_id="u", images=[_image(photos[600])]) for _ in range(BURST + 3)]
    with grpc.insecure_channel(gateway.address, options=OPTIONS) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ScoreStream(iter(requests), timeout=60))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", f"Bearer {new_key()}"),)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ScoreStream(iter(requests), metadata=wrong, timeout=60))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        mine = (("authorization", f"Bearer {key}"),)
        answers = list(stub.ScoreStream(iter(requests), metadata=mine, timeout=120))
    assert len(answers) == len(requests)
    codes = [a.error.code if a.HasField("error") else 0 for a in answers]
    assert codes[:BURST] == [0] * BURST  # the bucket's burst, then refusals in place, the stream goes on
    assert codes[BURST:].count(RESOURCE_EXHAUSTED) >= 2, codes
    assert all("rate limit" in a.error.message for a in answers if a.HasField("error"))


# --- draining ------------------------------------------------------------------------------------------
async def test_a_draining_gateway_answers_what_it_read_then_ends_the_stream_with_unavailable(
    triton_server: TritonServer, redis_server: RedisServer, user: str, photos: list[Photo]
) -> None:
    """The stream stays open and idle when SIGTERM comes: it ends at once with UNAVAILABLE (not after the
    drain's grace), after the answers to everything the gateway had read."""
    gateway = start_gateway(redis_server.url, triton_server.grpc_url, "--drain-grace-s", "30")
    sent = [pb.ScoreRequest(user_id=user, images=[_image(p)]) for p in photos[600:603]]
    try:
        async with grpc.aio.insecure_channel(gateway.address, options=OPTIONS) as channel:
            call = pb_grpc.PersonalizationStub(channel).ScoreStream(timeout=120)
            for request in sent:
                await call.write(request)
            answers = [await call.read() for _ in sent]
            assert all(a.HasField("response") for a in answers)
            stopped_at = time.monotonic()
            stopping = asyncio.get_running_loop().run_in_executor(None, gateway.stop)
            left = [a async for a in _rest(call)]
            assert left == []
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (await call.details() or "")
            assert await stopping == 0
            assert time.monotonic() - stopped_at < 20, "the stream held the drain for its whole grace"
    finally:
        gateway.close()


async def _rest(call: grpc.aio.StreamStreamCall) -> AsyncIterator[pb.ScoreStreamResponse]:
    """The answers still to come, read as the first ones were (grpc.aio refuses to mix read() and async
    iteration on one call), until the stream ends."""
    try:
        while (answer := await call.read()) is not grpc.aio.EOF:
            yield answer
    except grpc.aio.AioRpcError:
        return


# --- the Python clients --------------------------------------------------------------------------------
def _jobs(user: str, photos: list[Photo]) -> list[tuple[str, list[Path | bytes]]]:
    """20 jobs of 1-3 photos, one of them with a broken JPEG."""
    paths: list[Path | bytes] = [p.path for p in photos[600:606]]
    jobs = [(user, paths[i % 6 : i % 6 + 1 + i % 3]) for i in range(20)]
    broken = photos[600].path.read_bytes()
    jobs[7] = (user, [paths[0], broken[: len(broken) // 3]])
    return jobs


def _expected(client: Client, jobs: list[tuple[str, list[Path | bytes]]]) -> list[object]:
    out: list[object] = []
    for user_id, images in jobs:
        try:
            out.append([(s.digest, s.score) for s in client.score(user_id, images)])
        except PiaaError as err:
            out.append(type(err))
    return out


def _seen(answer: list[ImageScore] | PiaaError) -> object:
    return type(answer) if isinstance(answer, PiaaError) else [(s.digest, s.score) for s in answer]


def test_the_clients_stream_answers_like_score_does(
    gateway: GatewayProcess, user: str, photos: list[Photo]
) -> None:
    jobs = _jobs(user, photos)
    with Client(gateway.address, timeout=120) as client:
        expected = _expected(client, jobs)
        assert expected[7] is InvalidRequest
        assert [_seen(a) for a in client.score_stream(jobs, window=4)] == expected

    async def streamed() -> list[object]:
        async with AsyncClient(gateway.address, timeout=120) as client:
            return [_seen(a) async for a in client.score_stream(jobs)]

    assert asyncio.run(streamed()) == expected


def test_the_client_sends_what_a_draining_gateway_left_unanswered_to_the_next_one(
    triton_server: TritonServer, redis_server: RedisServer, user: str, photos: list[Photo]
) -> None:
    """The gateway drains after 3 answers with up to 8 requests in flight; a new gateway comes up on the
    same port; the client reopens the stream there, and every job is answered once, in order."""
    jobs = _jobs(user, photos)
    port = str(free_port())
    first = start_gateway(redis_server.url, triton_server.grpc_url, "--port", port)
    second: GatewayProcess | None = None
    try:
        with Client(first.address, timeout=120) as client:
            expected = _expected(client, jobs)
            answers = client.score_stream(jobs, window=8, timeout=120)
            seen = [_seen(next(answers)) for _ in range(3)]
            assert first.stop() == 0
            second = start_gateway(redis_server.url, triton_server.grpc_url, "--port", port)
            seen += [_seen(a) for a in answers]
        assert seen == expected
        assert _count(second.metrics(), "OK") >= 1, "the rest went to the second gateway"
    finally:
        first.close()
        if second is not None:
            second.close()


def test_the_client_gives_up_after_max_attempts_when_no_gateway_answers(photos: list[Photo]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(address, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05)) as client:
        answers = client.score_stream([("u", [photos[600].path])])
        with pytest.raises(Unavailable):
            next(answers)
