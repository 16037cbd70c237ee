"""One description per RPC (request, reply parser, idempotency), shared by the sync and async clients."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from piaa_client import types as t
from piaa_client.api.v1 import piaa_pb2 as pb

R = TypeVar("R")

DEFAULT_PORT = 50151
DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, applied only to idempotent calls that failed retryably."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """The sleep before each retry (max_attempts - 1 of them)."""
        ceiling = self.initial_backoff_s
        for _ in range(self.max_attempts - 1):
            yield random.uniform(0, ceiling)
            ceiling = min(self.max_backoff_s, ceiling * self.multiplier)


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Call(Generic[R]):
    """A prepared call: which RPC, its request, how to read the reply, and whether retrying is safe."""

    method: str
    request: Any
    parse: Callable[[Any], R]
    idempotent: bool


def score(user_id: str, images: Iterable[t.ImageInput], generic_only: bool) -> Call[list[t.ImageScore]]:
    request = pb.ScoreRequest(user_id=user_id, images=t.image_messages(images), generic_only=generic_only)
    return Call("Score", request, lambda r: t.image_scores(r.scores), idempotent=True)


def score_for_users(image: t.ImageInput, user_ids: Sequence[str]) -> Call[t.UsersScores]:
    request = pb.ScoreForUsersRequest(image=t.image_message(image), user_ids=list(user_ids))

    def parse(reply: pb.ScoreForUsersResponse) -> t.UsersScores:
        return t.UsersScores(t.image_score(reply.image), [t.user_score(s) for s in reply.scores])

    return Call("ScoreForUsers", request, parse, idempotent=True)


def rank_album(user_id: str, images: Iterable[t.ImageInput], top_k: int) -> Call[list[t.ImageScore]]:
    request = pb.RankAlbumRequest(user_id=user_id, images=t.image_messages(images), top_k=top_k)
    return Call("RankAlbum", request, lambda r: t.image_scores(r.ranked), idempotent=True)


def add_ratings(user_id: str, ratings: Iterable[t.Rating]) -> Call[t.RatingsReceipt]:
    request = pb.AddRatingsRequest(user_id=user_id, ratings=[t.rating_message(r) for r in ratings])

    def parse(reply: pb.AddRatingsResponse) -> t.RatingsReceipt:
        return t.RatingsReceipt(t.profile(reply.profile), list(reply.digests))

    # Not idempotent: a retry after a lost reply would record the ratings twice.
    return Call("AddRatings", request, parse, idempotent=False)


def suggest_images_to_rate(
    user_id: str, candidates: Iterable[t.ImageInput], k: int
) -> Call[list[t.Suggestion]]:
    request = pb.SuggestImagesToRateRequest(user_id=user_id, candidates=t.image_messages(candidates), k=k)
    return Call(
        "SuggestImagesToRate", request, lambda r: [t.suggestion(s) for s in r.suggestions], idempotent=True
    )


def get_profile(user_id: str) -> Call[t.Profile]:
    return Call("GetProfile", pb.GetProfileRequest(user_id=user_id), t.profile, idempotent=True)


def delete_profile(user_id: str) -> Call[bool]:
    request = pb.DeleteProfileRequest(user_id=user_id)
    return Call("DeleteProfile", request, lambda r: bool(r.deleted), idempotent=True)


def metadata(token: str | None, tenant: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata: the bearer token and, where the deployment uses it, the tenant."""
    items = []
    if token:
        items.append(("authorization", f"Bearer {token}"))
    if tenant:
        items.append(("x-piaa-tenant", tenant))
    return tuple(items)


CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
