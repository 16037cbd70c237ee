"""Sync and async PIAA clients: twins with the same method names, one per RPC, typed results.

with Client("127.0.0.1:50151") as piaa:
    scores = piaa.score("alice", ["beach.jpg", "dog.jpg"])

async with AsyncClient("127.0.0.1:50151") as piaa:
    scores = await piaa.score("alice", ["beach.jpg"])
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from piaa_client import calls
from piaa_client import types as t
from piaa_client.api.v1 import piaa_pb2_grpc
from piaa_client.calls import DEFAULT_RETRY, RetryPolicy
from piaa_client.defaults import DEFAULT_TARGET, DEFAULT_TIMEOUT_S
from piaa_client.errors import PiaaError, from_rpc_error

R = TypeVar("R")
_END = object()
"""Ends the requests of a sync score stream (the sentinel of its outbox)."""


def _credentials(
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _post(stream: calls.ScoreStreamState, outbox: queue.SimpleQueue[Any]) -> None:
    """Queues what the stream may send now for grpc's sending thread, and the end once there is no more."""
    for request in stream.to_send():
        outbox.put(request)
    if stream.exhausted:
        outbox.put(_END)


class _ClientBase:
    """What both twins share: target, deadline, credentials, metadata, retry policy, the stub."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_key: bytes | None = None,
        client_certificate: bytes | None = None,
        token: str | None = None,
        tenant: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        """`tls` with optional roots (and a client key and certificate for mutual TLS); `token` is sent as
        a bearer token; `timeout` is the default deadline in seconds of every call, retries included;
        `retry` is how gRPC retries the calls (every RPC: AddRatings carries a request id)."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.target = target
        self._timeout = timeout
        self._metadata = calls.metadata(token, tenant)
        self._retry = retry
        self._options = calls.channel_options(retry)
        credentials = _credentials(root_certificates, client_key, client_certificate) if tls else None
        self._channel = self._open_channel(target, credentials)
        self._stub = piaa_pb2_grpc.PersonalizationStub(self._channel)

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> Any:
        raise NotImplementedError


class Client(_ClientBase):
    """Blocking client. Every call has one deadline (`timeout`, seconds) over all its attempts and raises a
    PiaaError subclass."""

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> Any:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, self._options)
        return grpc.insecure_channel(target, self._options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _invoke(self, call: calls.Call[R], timeout: float | None) -> R:
        method: Any = getattr(self._stub, call.method)
        try:
            reply = method(call.request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
        return call.parse(reply)

    def score(
        self,
        user_id: str,
        images: Iterable[t.ImageInput],
        *,
        generic_only: bool = False,
        allow_partial: bool = False,
        timeout: float | None = None,
    ) -> list[t.ImageScore]:
        """Scores images for a user, one result per image in order; generic scores (with the reason) when
        the user has no usable profile. A bad image raises InvalidRequest (NotFound for an unknown digest),
        unless `allow_partial`: then it comes back in its place with `error` set."""
        return self._invoke(calls.score(user_id, images, generic_only, allow_partial), timeout)

    def score_stream(
        self,
        jobs: Iterable[calls.ScoreJob],
        *,
        generic_only: bool = False,
        allow_partial: bool = False,
        window: int = calls.STREAM_WINDOW,
        timeout: float | None = None,
    ) -> Iterator[list[t.ImageScore] | PiaaError]:
        """Scores many (user_id, images) requests on one ScoreStream, `window` of them in flight: one answer
        per request, in order, either its scores or the PiaaError that `score` would have raised for it (the
        stream goes on). For a client that scores at a high rate: a request on an open stream costs the
        gateway less than a call. A stream that ends with UNAVAILABLE (a draining gateway, a lost connection)
        is opened again after the retry policy's backoff and the requests it did not answer are sent first;
        after max_attempts such failures in a row the Unavailable error is raised. `timeout` bounds each
        stream (default: none; every request gets the gateway's default deadline)."""
        stream = calls.ScoreStreamState(jobs, generic_only, allow_partial, window)
        failures = 0
        while True:
            stream.reopen()
            outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # read by grpc's sending thread
            _post(stream, outbox)
            answers = self._stub.ScoreStream(iter(outbox.get, _END), timeout=timeout, metadata=self._metadata)
            try:
                for answer in answers:
                    failures = 0
                    yield stream.answered(answer)
                    _post(stream, outbox)
                if not stream.finished:
                    raise stream.ended_early()
                return
            except grpc.RpcError as rpc_error:
                failures += 1
                if rpc_error.code() != grpc.StatusCode.UNAVAILABLE or failures >= self._retry.max_attempts:
                    raise from_rpc_error(rpc_error) from None
            finally:
                outbox.put(_END)  # grpc's sending thread stops waiting for more
                answers.cancel()
            time.sleep(self._retry.backoff_s(failures))

    def score_for_users(
        self, image: t.ImageInput, user_ids: Sequence[str], *, timeout: float | None = None
    ) -> t.UsersScores:
        """Scores one image for many users with one feature extraction."""
        return self._invoke(calls.score_for_users(image, user_ids), timeout)

    def rank_album(
        self,
        user_id: str,
        images: Iterable[t.ImageInput],
        top_k: int = 0,
        *,
        allow_partial: bool = False,
        timeout: float | None = None,
    ) -> list[t.ImageScore]:
        """The album ordered by the user's taste, best first; top_k > 0 keeps only the best top_k. With
        `allow_partial` the images that could not be scored follow, in request order, `error` set."""
        return self._invoke(calls.rank_album(user_id, images, top_k, allow_partial), timeout)

    def add_ratings(
        self,
        user_id: str,
        ratings: Iterable[t.Rating],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> t.RatingsReceipt:
        """Records ratings and returns the updated profile. The call carries `request_id` (default: a
        fresh UUID4), so it is retried like the other calls and a repeat records nothing (the receipt
        says `replayed`); reusing an id for other ratings within 24 h raises InvalidRequest."""
        return self._invoke(calls.add_ratings(user_id, ratings, request_id), timeout)

    def suggest_images_to_rate(
        self, user_id: str, candidates: Iterable[t.ImageInput], k: int, *, timeout: float | None = None
    ) -> list[t.Suggestion]:
        """The k candidates whose ratings would teach the user's model most, most informative first."""
        return self._invoke(calls.suggest_images_to_rate(user_id, candidates, k), timeout)

    def get_profile(self, user_id: str, *, timeout: float | None = None) -> t.Profile:
        """The user's profile; `exists` is False for an unknown user."""
        return self._invoke(calls.get_profile(user_id), timeout)

    def delete_profile(self, user_id: str, *, timeout: float | None = None) -> bool:
        """Removes everything stored for the user; True when there was something to remove."""
        return self._invoke(calls.delete_profile(user_id), timeout)


class AsyncClient(_ClientBase):
    """asyncio twin of Client: same constructor, same methods, awaited."""

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> Any:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, self._options)
        return grpc.aio.insecure_channel(target, self._options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _invoke(self, call: calls.Call[R], timeout: float | None) -> R:
        method: Any = getattr(self._stub, call.method)
        try:
            reply = await method(call.request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None
        return call.parse(reply)

    async def score(
        self,
        user_id: str,
        images: Iterable[t.ImageInput],
        *,
        generic_only: bool = False,
        allow_partial: bool = False,
        timeout: float | None = None,
    ) -> list[t.ImageScore]:
        """Scores images for a user, one result per image in order; generic scores (with the reason) when
        the user has no usable profile. A bad image raises InvalidRequest (NotFound for an unknown digest),
        unless `allow_partial`: then it comes back in its place with `error` set."""
        return await self._invoke(calls.score(user_id, images, generic_only, allow_partial), timeout)

    async def score_stream(
        self,
        jobs: Iterable[calls.ScoreJob],
        *,
        generic_only: bool = False,
        allow_partial: bool = False,
        window: int = calls.STREAM_WINDOW,
        timeout: float | None = None,
    ) -> AsyncIterator[list[t.ImageScore] | PiaaError]:
        """Client.score_stream's twin: an async iterator of the answers, in request order."""
        stream = calls.ScoreStreamState(jobs, generic_only, allow_partial, window)
        failures = 0
        while True:
            stream.reopen()
            call = self._stub.ScoreStream(timeout=timeout, metadata=self._metadata)
            closed = False
            try:
                while True:
                    for request in stream.to_send():
                        await call.write(request)
                    if stream.exhausted and not closed:
                        await call.done_writing()
                        closed = True
                    if stream.finished:
                        return
                    answer = await call.read()
                    if answer is grpc.aio.EOF:
                        raise stream.ended_early()
                    failures = 0
                    yield stream.answered(answer)
            except grpc.RpcError as rpc_error:
                failures += 1
                if rpc_error.code() != grpc.StatusCode.UNAVAILABLE or failures >= self._retry.max_attempts:
                    raise from_rpc_error(rpc_error) from None
            finally:
                call.cancel()
            await asyncio.sleep(self._retry.backoff_s(failures))

    async def score_for_users(
        self, image: t.ImageInput, user_ids: Sequence[str], *, timeout: float | None = None
    ) -> t.UsersScores:
        """Scores one image for many users with one feature extraction."""
        return await self._invoke(calls.score_for_users(image, user_ids), timeout)

    async def rank_album(
        self,
        user_id: str,
        images: Iterable[t.ImageInput],
        top_k: int = 0,
        *,
        allow_partial: bool = False,
        timeout: float | None = None,
    ) -> list[t.ImageScore]:
        """The album ordered by the user's taste, best first; top_k > 0 keeps only the best top_k. With
        `allow_partial` the images that could not be scored follow, in request order, `error` set."""
        return await self._invoke(calls.rank_album(user_id, images, top_k, allow_partial), timeout)

    async def add_ratings(
        self,
        user_id: str,
        ratings: Iterable[t.Rating],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> t.RatingsReceipt:
        """Records ratings and returns the updated profile. The call carries `request_id` (default: a
        fresh UUID4), so it is retried like the other calls and a repeat records nothing (the receipt
        says `replayed`); reusing an id for other ratings within 24 h raises InvalidRequest."""
        return await self._invoke(calls.add_ratings(user_id, ratings, request_id), timeout)

    async def suggest_images_to_rate(
        self, user_id: str, candidates: Iterable[t.ImageInput], k: int, *, timeout: float | None = None
    ) -> list[t.Suggestion]:
        """The k candidates whose ratings would teach the user's model most, most informative first."""
        return await self._invoke(calls.suggest_images_to_rate(user_id, candidates, k), timeout)

    async def get_profile(self, user_id: str, *, timeout: float | None = None) -> t.Profile:
        """The user's profile; `exists` is False for an unknown user."""
        return await self._invoke(calls.get_profile(user_id), timeout)

    async def delete_profile(self, user_id: str, *, timeout: float | None = None) -> bool:
        """Removes everything stored for the user; True when there was something to remove."""
        return await self._invoke(calls.delete_profile(user_id), timeout)
