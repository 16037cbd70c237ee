"""Each RPC's request and reply parser, and the retry policy as gRPC service config; both clients use them."""

from __future__ import annotations

import json
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from piaa_client import types as t
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.defaults import MAX_MESSAGE_BYTES, TENANT_HEADER
from piaa_client.errors import PiaaError, ServerError, from_status

R = TypeVar("R")

SERVICE = "piaa.v1.Personalization"
"""The gRPC service's full name, as the proto declares it."""

IDEMPOTENT_METHODS = (
    "Score",
    "ScoreForUsers",
    "RankAlbum",
    "AddRatings",
    "SuggestImagesToRate",
    "GetProfile",
    "DeleteProfile",
)
"""The RPCs safe to send twice. AddRatings is, because its calls always carry a request id: the gateway
records a repeat of an id once (see AddRatingsRequest.request_id)."""

RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
"""The statuses worth retrying: the service could not be reached, or it shed the call under load."""

GRPC_MAX_ATTEMPTS = 5
"""gRPC caps maxAttempts at 5 (more is silently treated as 5), so larger values are refused here."""


def _duration(seconds: float) -> str:
    """Seconds as a protobuf JSON duration ("0.1s")."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retries for the idempotent calls: exponential backoff between attempts, all attempts within
    the call's one deadline. Rendered into the channel's service config; max_attempts=1 turns retries off."""

    max_attempts: int = 4
    """Attempts per call, the first included (1..5)."""
    initial_backoff_s: float = 0.1
    """Upper bound of the first randomized delay; later bounds grow by `multiplier` up to max_backoff_s."""
    max_backoff_s: float = 2.0
    """The largest bound of a randomized delay between attempts."""
    multiplier: float = 2.0
    """Growth of the delay bound from one retry to the next."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= GRPC_MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be within 1..{GRPC_MAX_ATTEMPTS}, got {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.multiplier <= 0:
            raise ValueError("backoffs and multiplier must be positive")

    def backoff_s(self, retry: int) -> float:
        """A randomized delay before retry number `retry` (1, 2, ...), as gRPC's own retries draw it: uniform
        up to initial_backoff_s × multiplier^(retry - 1), capped at max_backoff_s."""
        bound = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return random.uniform(0, bound)

    def method_config(self) -> list[dict[str, Any]]:
        """The service config's methodConfig: one retryPolicy naming the idempotent methods, or none."""
        if self.max_attempts == 1:
            return []
        return [
            {
                "name": [{"service": SERVICE, "method": method} for method in IDEMPOTENT_METHODS],
                "retryPolicy": {
                    "maxAttempts": self.max_attempts,
                    "initialBackoff": _duration(self.initial_backoff_s),
                    "maxBackoff": _duration(self.max_backoff_s),
                    "backoffMultiplier": self.multiplier,
                    "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
                },
            }
        ]

    def service_config(self) -> str:
        """The JSON for the channel option grpc.service_config."""
        return json.dumps({"methodConfig": self.method_config()})


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Call(Generic[R]):
    """A prepared call: which RPC, its request, how to read the reply."""

    method: str
    request: Any
    parse: Callable[[Any], R]

    @property
    def idempotent(self) -> bool:
        """Whether the channel's retry policy covers this RPC."""
        return self.method in IDEMPOTENT_METHODS


def score(
    user_id: str, images: Iterable[t.ImageInput], generic_only: bool, allow_partial: bool = False
) -> Call[list[t.ImageScore]]:
    request = pb.ScoreRequest(
        user_id=user_id,
        images=t.image_messages(images),
        generic_only=generic_only,
        allow_partial=allow_partial,
    )
    return Call("Score", request, lambda r: t.image_scores(r.scores))


ScoreJob = tuple[str, Iterable[t.ImageInput]]
"""One request of a score stream: (user_id, images)."""

STREAM_WINDOW = 8
"""Requests a client keeps in flight on one ScoreStream by default. The gateway reads up to its
max_stream_in_flight (32 by default) at once: a window within that never waits on the gateway's reading."""


class ScoreStreamState:
    """What a score stream sent and has not had answered, for both clients: requests are made from `jobs`
    only as the window has room, and after reopen() the unanswered ones are sent again first, so a
    gateway's drain loses and repeats nothing (Score is read-only, so a repeat would be harmless anyway)."""

    def __init__(
        self, jobs: Iterable[ScoreJob], generic_only: bool, allow_partial: bool, window: int
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._jobs = iter(jobs)
        self._flags = (generic_only, allow_partial)
        self._window = window
        self._pending: deque[pb.ScoreRequest] = deque()
        self._resend: deque[pb.ScoreRequest] = deque()
        self.exhausted = False
        """Every job was taken from `jobs`."""

    def reopen(self) -> None:
        """A new stream: whatever the last one left unanswered goes first."""
        self._resend.extendleft(reversed(self._pending))
        self._pending.clear()

    def to_send(self) -> list[pb.ScoreRequest]:
        """The requests to write now, oldest first."""
        out = []
        while len(self._pending) < self._window and (self._resend or not self.exhausted):
            if self._resend:
                request = self._resend.popleft()
            elif (job := next(self._jobs, None)) is None:
                self.exhausted = True
                break
            else:
                request = score(job[0], job[1], *self._flags).request
            self._pending.append(request)
            out.append(request)
        return out

    @property
    def finished(self) -> bool:
        """Every job was sent and answered."""
        return self.exhausted and not self._pending and not self._resend

    def answered(self, answer: pb.ScoreStreamResponse) -> list[t.ImageScore] | PiaaError:
        """The oldest unanswered request's answer: its scores or the PiaaError Score would have raised."""
        if not self._pending:
            raise ServerError("the gateway answered more requests than were sent on the stream")
        self._pending.popleft()
        return score_stream_answer(answer)

    def ended_early(self) -> ServerError:
        """The error for a stream that ended without an error while requests were unanswered."""
        return ServerError(f"the stream ended with {len(self._pending)} requests unanswered")


def score_stream_answer(answer: pb.ScoreStreamResponse) -> list[t.ImageScore] | PiaaError:
    """One ScoreStream answer: the scores, or the PiaaError Score would have raised for that request."""
    if answer.WhichOneof("result") == "error":
        return from_status(answer.error.code, answer.error.message)
    return t.image_scores(answer.response.scores)


def score_for_users(image: t.ImageInput, user_ids: Sequence[str]) -> Call[t.UsersScores]:
    request = pb.ScoreForUsersRequest(image=t.image_message(image), user_ids=list(user_ids))

    def parse(reply: pb.ScoreForUsersResponse) -> t.UsersScores:
        return t.UsersScores(t.image_score(reply.image), [t.user_score(s) for s in reply.scores])

    return Call("ScoreForUsers", request, parse)


def rank_album(
    user_id: str, images: Iterable[t.ImageInput], top_k: int, allow_partial: bool = False
) -> Call[list[t.ImageScore]]:
    request = pb.RankAlbumRequest(
        user_id=user_id, images=t.image_messages(images), top_k=top_k, allow_partial=allow_partial
    )
    return Call("RankAlbum", request, lambda r: t.image_scores(r.ranked))


def add_ratings(
    user_id: str, ratings: Iterable[t.Rating], request_id: str | None = None
) -> Call[t.RatingsReceipt]:
    """The AddRatings call with `request_id`, or a fresh UUID4: every attempt of this logical call carries
    the same id, so a retry after a lost reply cannot record the ratings twice."""
    request_id = request_id or str(uuid.uuid4())
    request = pb.AddRatingsRequest(
        user_id=user_id, ratings=[t.rating_message(r) for r in ratings], request_id=request_id
    )

    def parse(reply: pb.AddRatingsResponse) -> t.RatingsReceipt:
        return t.RatingsReceipt(t.profile(reply.profile), list(reply.digests), reply.replayed, request_id)

    return Call("AddRatings", request, parse)


def suggest_images_to_rate(
    user_id: str, candidates: Iterable[t.ImageInput], k: int
) -> Call[list[t.Suggestion]]:
    request = pb.SuggestImagesToRateRequest(user_id=user_id, candidates=t.image_messages(candidates), k=k)
    return Call("SuggestImagesToRate", request, lambda r: [t.suggestion(s) for s in r.suggestions])


def get_profile(user_id: str) -> Call[t.Profile]:
    return Call("GetProfile", pb.GetProfileRequest(user_id=user_id), t.profile)


def delete_profile(user_id: str) -> Call[bool]:
    request = pb.DeleteProfileRequest(user_id=user_id)
    return Call("DeleteProfile", request, lambda r: bool(r.deleted))


def metadata(token: str | None, tenant: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata: the bearer token and, where the deployment uses it, the tenant."""
    items = []
    if token:
        items.append(("authorization", f"Bearer {token}"))
    if tenant:
        items.append((TENANT_HEADER, tenant))
    return tuple(items)


def channel_options(retry: RetryPolicy) -> tuple[tuple[str, Any], ...]:
    """Options of the client's channel: the message size limits and gRPC's retries as `retry` says."""
    return (
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry.service_config()),
        # gRPC stops retrying a call once its request outgrows this buffer (256 KiB by default), and requests
        # carry photos: room for the largest message keeps every idempotent call retryable.
        ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
    )
