"""The gRPC servicer: translates piaa.v1 messages to service calls and back, nothing else."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.features import ATTRIBUTES
from piaa_personalization.api.auth import current_tenant
from piaa_personalization.config import GatewayConfig
from piaa_personalization.core.memory import Lru
from piaa_personalization.core.metrics import TIMING_METADATA_KEY, TIMING_REQUEST_KEY, Timings
from piaa_personalization.core.personalizer import Head, check_tenant
from piaa_personalization.core.service import (
    Call,
    Failed,
    ImageRef,
    PersonalizationService,
    ProfileView,
    RatingIn,
    Scored,
)
from piaa_personalization.errors import InvalidArgument, ServiceError, ShuttingDown

log = logging.getLogger(__name__)


def _image(message: pb.Image) -> ImageRef:
    source = message.WhichOneof("source")
    if source == "data":
        return ImageRef(id=message.id, data=message.data)
    if source == "digest":
        return ImageRef(id=message.id, digest=message.digest)
    return ImageRef(id=message.id)


def _scale(value: int) -> str:
    # proto3 enums are open: an unknown number reaches us as-is and must be refused, not crash.
    try:
        return str(pb.RatingScale.Name(value))
    except ValueError:
        raise InvalidArgument(f"rating scale {value} is not a RatingScale value") from None


DRAINING = "the gateway is draining: send the call again"
"""The message of the UNAVAILABLE that refuses a call or stream opened during a drain."""
STREAM_DRAINED = "the gateway is draining: send the unanswered requests again"
"""The message of the UNAVAILABLE that ends a stream that was open when the drain began."""


def public_message(err: ServiceError, method: str) -> str:
    """What a caller reads of `err` (ServiceError.public_message); when that is not the error's own
    message, the message is logged here (with the traceback for an INTERNAL error)."""
    shown = err.public_message()
    if shown != str(err):
        internal = err.status == "INTERNAL"
        level = logging.ERROR if internal else logging.WARNING
        log.log(level, "%s answered %s: %s", method, err.status, err, exc_info=err if internal else None)
    return shown


def _reason(reason: str | None) -> Any:
    if reason is None:
        return pb.FALLBACK_REASON_UNSPECIFIED
    return pb.FallbackReason.Value("FALLBACK_REASON_" + reason.upper())


_ANALYSES: Lru[tuple[Head, bytes]] = Lru(20_000)
"""Serialized image-only part of ImageScore by digest, with the Head it was built from (a digest whose
Head object changed, as after a switch of feature space, is built again)."""


def _image_score(s: Scored | Failed) -> pb.ImageScore:
    if isinstance(s, Failed):
        code = grpc.StatusCode[s.status].value[0]
        return pb.ImageScore(id=s.id, digest=s.digest, error=pb.ImageError(code=code, message=s.message))
    a = s.analysis
    # What depends only on the image (digest, generic score, 10 named attributes, content) is built once
    # per image and parsed back per answer: ~10x cheaper than building the named attribute messages.
    known = _ANALYSES.get(a.digest)
    if known is None or known[0] is not a.head:
        analysis = pb.ImageScore(
            digest=a.digest,
            generic_score=a.head.generic,
            attributes=[
                pb.Attribute(name=n, value=float(v))
                for n, v in zip(ATTRIBUTES, a.head.attributes, strict=True)
            ],
            content=a.head.content.tolist(),
        )
        known = (a.head, analysis.SerializeToString())
        _ANALYSES.put(a.digest, known)
    message = pb.ImageScore.FromString(known[1])
    message.id = a.id
    message.score = s.score
    message.personalized = s.personalized
    message.fallback_reason = _reason(s.reason)
    return message


def _profile(p: ProfileView) -> pb.Profile:
    def factors(items: list[tuple[str, float]]) -> list[pb.TasteFactor]:
        return [pb.TasteFactor(name=n, weight=float(w)) for n, w in items]

    return pb.Profile(
        user_id=p.user_id,
        num_ratings=p.num_ratings,
        feature_space_version=p.feature_space_version,
        updated_at=p.updated_at,
        exists=p.exists,
        likes=factors(p.likes),
        dislikes=factors(p.dislikes),
        weights=factors(p.weights),
    )


class PersonalizationServicer(pb_grpc.PersonalizationServicer):
    """The Personalization service of piaa.v1 over a PersonalizationService (which knows no gRPC).

    Errors are raised as ServiceError and mapped to status codes by server.ErrorInterceptor.
    """

    def __init__(self, service: PersonalizationService, config: GatewayConfig) -> None:
        self.service = service
        self.config = config
        self._streams: set[asyncio.Task[None]] = set()
        self._draining = False

    @property
    def draining(self) -> bool:
        """Whether drain() was called: new calls and streams are refused."""
        return self._draining

    def _call(self, context: grpc.aio.ServicerContext) -> Call:
        """The call's tenant, deadline and timings; raises ShuttingDown once draining (every handler calls
        this first, so nothing is done for a refused call and the caller may resend it anywhere)."""
        if self._draining:
            raise ShuttingDown(DRAINING)
        tenant = current_tenant()  # set by auth.AuthInterceptor from the API key
        keyless = tenant is None  # no keys file: the tenant header, else the default (development only)
        tenant = self.config.default_tenant if tenant is None else tenant
        report = False
        for key, value in context.invocation_metadata() or ():
            if key == TIMING_REQUEST_KEY:
                report = True
            elif keyless and key == self.config.tenant_header and value:
                tenant = str(value)
        check_tenant(tenant)
        remaining = context.time_remaining()
        timeout = self.config.default_timeout_s if remaining is None else min(remaining, 1e6)
        return Call(tenant, time.monotonic() + timeout, Timings(), report_timings=report)

    @staticmethod
    def _finish(context: grpc.aio.ServicerContext, call: Call) -> None:
        if call.report_timings:
            context.set_trailing_metadata(((TIMING_METADATA_KEY, call.timings.header()),))

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:  # noqa: N802
        call = self._call(context)
        response = await self._score(call, request)
        self._finish(context, call)
        return response

    async def _score(self, call: Call, request: pb.ScoreRequest) -> pb.ScoreResponse:
        scored = await self.service.score(
            call,
            request.user_id,
            [_image(m) for m in request.images],
            generic_only=request.generic_only,
            allow_partial=request.allow_partial,
        )
        return pb.ScoreResponse(
            scores=[_image_score(s) for s in scored],
            feature_space_version=next(
                (s.analysis.feature_space for s in scored if isinstance(s, Scored)),
                self.service.space.feature_space,
            ),
        )

    async def ScoreStream(  # noqa: N802
        self, requests: AsyncIterator[pb.ScoreRequest | ServiceError], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        """Each request answered as Score would answer it, in order, up to max_stream_in_flight at once.

        The interceptors hand over each request parsed and admitted, or the ServiceError that refused it
        (not protobuf, over the tenant's rate), which becomes that request's answer. On drain() the stream
        stops reading, answers what it read, and ends with UNAVAILABLE; a stream opened after drain() is
        refused with UNAVAILABLE before it reads anything.
        """
        tenant = self._call(context).tenant  # once per stream; refuses it when draining
        # Each request gets the default timeout, within the stream's own deadline if the client set one.
        remaining = context.time_remaining()
        until = math.inf if remaining is None else time.monotonic() + remaining
        answers: asyncio.Queue[asyncio.Future[pb.ScoreStreamResponse] | BaseException | None] = (
            asyncio.Queue()
        )
        window = asyncio.Semaphore(self.config.max_stream_in_flight)
        reader = asyncio.create_task(self._read_stream(requests, tenant, until, window, answers))
        # drain() may cancel the reader before its first step, when its except clause never runs: say so here.
        reader.add_done_callback(
            lambda task: answers.put_nowait(ShuttingDown(STREAM_DRAINED)) if task.cancelled() else None
        )
        self._streams.add(reader)  # in the same step as the draining check: drain() cannot fall between
        try:
            while (answer := await answers.get()) is not None:
                if isinstance(answer, BaseException):
                    raise answer
                yield await answer
                window.release()
        finally:
            self._streams.discard(reader)
            reader.cancel()
            while not answers.empty():
                if isinstance(left := answers.get_nowait(), asyncio.Future):
                    left.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.ScoreRequest | ServiceError],
        tenant: str,
        until: float,
        window: asyncio.Semaphore,
        answers: asyncio.Queue[asyncio.Future[pb.ScoreStreamResponse] | BaseException | None],
    ) -> None:
        """Reads requests while the window has room and queues each one's answer (a running task)."""
        try:
            while True:
                await window.acquire()
                request = await anext(requests, None)
                if request is None:
                    break
                answers.put_nowait(asyncio.ensure_future(self._stream_answer(tenant, until, request)))
        except asyncio.CancelledError:  # drain(): what was read is answered, then the client resends
            answers.put_nowait(ShuttingDown(STREAM_DRAINED))
        except BaseException as err:  # the stream broke (cancelled by the client, a transport error)
            answers.put_nowait(err)
        else:
            answers.put_nowait(None)

    async def _stream_answer(
        self, tenant: str, until: float, request: pb.ScoreRequest | ServiceError
    ) -> pb.ScoreStreamResponse:
        try:
            if isinstance(request, ServiceError):
                raise request
            call = Call(tenant, min(time.monotonic() + self.config.default_timeout_s, until), Timings())
            return pb.ScoreStreamResponse(response=await self._score(call, request))
        except ServiceError as err:
            code = grpc.StatusCode[err.status].value[0]
            message = public_message(err, "ScoreStream")
            return pb.ScoreStreamResponse(error=pb.CallError(code=code, message=message))
        except Exception:
            log.exception("unexpected error in ScoreStream")
            code = grpc.StatusCode.INTERNAL.value[0]
            return pb.ScoreStreamResponse(error=pb.CallError(code=code, message="internal error"))

    def drain(self) -> None:
        """From now on every new call and ScoreStream is refused with UNAVAILABLE (nothing done: the client
        sends it again, elsewhere); every open ScoreStream stops reading requests, answers what it read
        and then ends with UNAVAILABLE, so its client sends the rest to another gateway."""
        self._draining = True
        for reader in self._streams:
            reader.cancel()

    async def ScoreForUsers(  # noqa: N802
        self, request: pb.ScoreForUsersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreForUsersResponse:
        call = self._call(context)
        generic, users = await self.service.score_for_users(
            call, _image(request.image), list(request.user_ids)
        )
        self._finish(context, call)
        return pb.ScoreForUsersResponse(
            image=_image_score(generic),
            scores=[
                pb.UserScore(
                    user_id=u.user_id,
                    score=u.score,
                    personalized=u.personalized,
                    fallback_reason=_reason(u.reason),
                )
                for u in users
            ],
        )

    async def RankAlbum(  # noqa: N802
        self, request: pb.RankAlbumRequest, context: grpc.aio.ServicerContext
    ) -> pb.RankAlbumResponse:
        call = self._call(context)
        ranked = await self.service.rank_album(
            call, request.user_id, [_image(m) for m in request.images], request.top_k, request.allow_partial
        )
        self._finish(context, call)
        return pb.RankAlbumResponse(ranked=[_image_score(s) for s in ranked])

    async def AddRatings(  # noqa: N802
        self, request: pb.AddRatingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddRatingsResponse:
        call = self._call(context)
        ratings = [
            RatingIn(image=_image(r.image), value=r.value, scale=_scale(r.scale)) for r in request.ratings
        ]
        receipt = await self.service.add_ratings(call, request.user_id, ratings, request.request_id)
        self._finish(context, call)
        return pb.AddRatingsResponse(
            profile=_profile(receipt.profile), digests=receipt.digests, replayed=receipt.replayed
        )

    async def SuggestImagesToRate(  # noqa: N802
        self, request: pb.SuggestImagesToRateRequest, context: grpc.aio.ServicerContext
    ) -> pb.SuggestImagesToRateResponse:
        call = self._call(context)
        picks = await self.service.suggest(
            call, request.user_id, [_image(m) for m in request.candidates], request.k
        )
        self._finish(context, call)
        return pb.SuggestImagesToRateResponse(
            suggestions=[pb.Suggestion(id=p.id, digest=p.digest, uncertainty=p.uncertainty) for p in picks]
        )

    async def GetProfile(  # noqa: N802
        self, request: pb.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.Profile:
        call = self._call(context)
        profile = await self.service.get_profile(call, request.user_id)
        self._finish(context, call)
        return _profile(profile)

    async def DeleteProfile(  # noqa: N802
        self, request: pb.DeleteProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteProfileResponse:
        call = self._call(context)
        removed = await self.service.delete_profile(call, request.user_id)
        self._finish(context, call)
        return pb.DeleteProfileResponse(deleted=removed > 0, keys_removed=removed)
