"""Each RPC's request and reply parser, and the retry policy as gRPC service config; both clients use them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from piaa_client import types as t
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.defaults import MAX_MESSAGE_BYTES, TENANT_HEADER

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
