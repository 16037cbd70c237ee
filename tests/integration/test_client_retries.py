"""The clients' retries are gRPC's own: a real piaa.v1 server on loopback that fails the first calls."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from piaa_client import AsyncClient, Client, RetryPolicy
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc
from piaa_client.errors import DeadlineExceeded, Overloaded, Unavailable
from piaa_client.types import Rating

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)
"""Short backoffs, so the tests measure the server's failures, not the waits between attempts."""


class FlakyServicer(piaa_pb2_grpc.PersonalizationServicer):
    """Fails the first `failures` calls of each method with `code` (after `delay_s`), then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.delay_s = 0.0
        self.calls: Counter[str] = Counter()
        self.request_bytes: list[int] = []
        self.request_ids: list[str] = []
        self._lock = threading.Lock()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls[method] += 1
            fail = self.calls[method] <= self.failures
        if fail:
            time.sleep(self.delay_s)
            context.abort(self.code, f"{method} attempt {self.calls[method]} refused")

    def GetProfile(self, request: pb.GetProfileRequest, context: grpc.ServicerContext) -> pb.Profile:
        self._attempt("GetProfile", context)
        return pb.Profile(user_id=request.user_id, exists=True, num_ratings=3)

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self._attempt("Score", context)
        self.request_bytes.append(request.ByteSize())
        scores = [pb.ImageScore(id=image.id, score=0.5, generic_score=0.5) for image in request.images]
        return pb.ScoreResponse(scores=scores)

    def AddRatings(
        self, request: pb.AddRatingsRequest, context: grpc.ServicerContext
    ) -> pb.AddRatingsResponse:
        self.request_ids.append(request.request_id)
        self._attempt("AddRatings", context)
        return pb.AddRatingsResponse(profile=pb.Profile(user_id=request.user_id, exists=True))


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyServicer, str]]:
    servicer = FlakyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    piaa_pb2_grpc.add_PersonalizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_an_idempotent_call_is_retried_until_it_succeeds(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    servicer.failures = 3
    with Client(address, retry=FAST) as client:
        profile = client.get_profile("alice")
    assert profile.exists and profile.num_ratings == 3
    assert servicer.calls["GetProfile"] == 4


def test_retries_stop_at_max_attempts(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    servicer.failures = 10
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with Client(address, retry=policy) as client, pytest.raises(Unavailable, match="attempt 3 refused"):
        client.get_profile("alice")
    assert servicer.calls["GetProfile"] == 3


def test_an_overloaded_server_is_retried_too(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    servicer.failures, servicer.code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(address, retry=FAST) as client:
        assert [s.score for s in client.score("alice", [b"photo"])] == [0.5]
    assert servicer.calls["Score"] == 2


def test_a_request_larger_than_grpcs_default_retry_buffer_is_still_retried(
    flaky: tuple[FlakyServicer, str],
) -> None:
    servicer, address = flaky
    servicer.failures = 1
    photo = bytes(range(256)) * 4096  # 1 MiB, four times gRPC's default per-call retry buffer
    with Client(address, retry=FAST) as client:
        assert len(client.score("alice", [photo])) == 1
    assert servicer.calls["Score"] == 2 and servicer.request_bytes[0] > len(photo)


def test_add_ratings_is_retried_with_one_request_id_per_logical_call(
    flaky: tuple[FlakyServicer, str],
) -> None:
    servicer, address = flaky
    servicer.failures = 2
    with Client(address, retry=FAST) as client:
        receipt = client.add_ratings("alice", [Rating(b"photo", 5)])
        assert servicer.calls["AddRatings"] == 3
        client.add_ratings("alice", [Rating(b"photo", 5)])  # the next logical call
        client.add_ratings("alice", [Rating(b"photo", 5)], request_id="mine-1")
    first, retry1, retry2, second, mine = servicer.request_ids
    assert first == retry1 == retry2 == receipt.request_id and len(first) == 36
    assert second not in (first, "") and mine == "mine-1"


def test_no_retry_policy_makes_one_attempt(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    servicer.failures, servicer.code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(address, retry=RetryPolicy(max_attempts=1)) as client, pytest.raises(Overloaded):
        client.score("alice", [b"photo"])
    assert servicer.calls["Score"] == 1


def test_one_deadline_spans_every_attempt(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    # Each attempt fails after 0.4 s: five attempts need 2 s, the deadline allows 1 s in all.
    servicer.failures, servicer.delay_s = 10, 0.4
    with Client(address, timeout=1.0, retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.01)) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.get_profile("alice")
        elapsed = time.monotonic() - started
    assert 2 <= servicer.calls["GetProfile"] <= 3  # retried, but only while the deadline lasted
    assert elapsed < 1.8, elapsed  # per-attempt deadlines would have run to 2 s


async def test_async_twin_retries_the_same_way(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    servicer.failures = 2
    async with AsyncClient(address, retry=FAST) as client:
        profile = await client.get_profile("alice")
        assert profile.exists
        assert servicer.calls["GetProfile"] == 3
        await client.add_ratings("alice", [Rating(b"photo", 5)])
    assert servicer.calls["AddRatings"] == 3
    assert len(set(servicer.request_ids)) == 1 and servicer.request_ids[0]


async def test_async_twin_has_one_deadline_across_attempts(flaky: tuple[FlakyServicer, str]) -> None:
    servicer, address = flaky
    servicer.failures, servicer.delay_s = 10, 0.4
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.01)
    async with AsyncClient(address, timeout=1.0, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.get_profile("alice")
        elapsed = time.monotonic() - started
    assert 2 <= servicer.calls["GetProfile"] <= 3
    assert elapsed < 1.8, elapsed
