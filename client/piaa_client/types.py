"""Typed inputs and results of the client, and their translation to and from the v1 messages."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

import grpc

from piaa_client.api.v1 import piaa_pb2 as pb

Scale = Literal["stars", "unit"]
"""How a rating value is given: 1–5 stars, or already on [0, 1]."""

_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_SCALES = {"stars": pb.RATING_SCALE_STARS_1_5, "unit": pb.RATING_SCALE_UNIT}
_REASONS = {
    pb.FALLBACK_REASON_UNSPECIFIED: None,
    pb.FALLBACK_REASON_NO_PROFILE: "no_profile",
    pb.FALLBACK_REASON_STALE_PROFILE: "stale_profile",
    pb.FALLBACK_REASON_STORE_UNAVAILABLE: "store_unavailable",
    pb.FALLBACK_REASON_DISABLED: "disabled",
}


@dataclass(frozen=True)
class ImageRef:
    """An image the service has already seen, named by the SHA-256 digest of its bytes."""

    digest: str
    id: str = ""


ImageInput: TypeAlias = bytes | str | os.PathLike[str] | ImageRef
"""Raw encoded bytes, a path to an image file, or a reference to an image already sent."""


@dataclass(frozen=True)
class Rating:
    """One rating of one image by the user."""

    image: ImageInput
    value: float
    scale: Scale = "stars"


@dataclass(frozen=True)
class ImageError:
    """Why the service could not score one image of a call with allow_partial."""

    code: str
    """The gRPC status name the whole call would have failed with: INVALID_ARGUMENT or NOT_FOUND."""
    message: str


@dataclass(frozen=True)
class ImageScore:
    """Everything the service returned for one image; with `error` set, only id and digest besides."""

    id: str
    digest: str
    score: float
    generic_score: float
    attributes: dict[str, float]
    content: tuple[float, ...]
    personalized: bool
    fallback_reason: str | None
    error: ImageError | None = None


@dataclass(frozen=True)
class UserScore:
    """One user's score of an image."""

    user_id: str
    score: float
    personalized: bool
    fallback_reason: str | None


@dataclass(frozen=True)
class UsersScores:
    """The result of ScoreForUsers: the image's generic analysis and one score per user."""

    image: ImageScore
    scores: list[UserScore]


@dataclass(frozen=True)
class TasteFactor:
    """A feature of the model and how much it moves the user's score relative to the crowd."""

    name: str
    weight: float


@dataclass(frozen=True)
class Profile:
    """A user's profile and taste."""

    user_id: str
    exists: bool
    num_ratings: int
    feature_space_version: str
    updated_at: float
    likes: list[TasteFactor] = field(default_factory=list)
    dislikes: list[TasteFactor] = field(default_factory=list)
    weights: list[TasteFactor] = field(default_factory=list)


@dataclass(frozen=True)
class RatingsReceipt:
    """What AddRatings returns: the updated profile and the digest of every rated image."""

    profile: Profile
    digests: list[str]
    replayed: bool = False
    """True when the call's request id had recorded these ratings already (nothing recorded now)."""
    request_id: str = ""
    """The id the call carried; send it again with the same ratings to retry safely within 24 h."""


@dataclass(frozen=True)
class Suggestion:
    """An image the user should rate next, and how uncertain their model is about it."""

    id: str
    digest: str
    uncertainty: float


def digest_of(data: bytes) -> str:
    """The service's name for an image: lower-case hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def image_message(image: ImageInput) -> pb.Image:
    """Builds the Image message; a path is read here, so an unreadable file fails before any call."""
    if isinstance(image, ImageRef):
        return pb.Image(digest=image.digest, id=image.id)
    if isinstance(image, bytes):
        return pb.Image(data=image)
    path = Path(image)
    return pb.Image(data=path.read_bytes(), id=path.name)


def image_messages(images: Iterable[ImageInput]) -> list[pb.Image]:
    return [image_message(image) for image in images]


def rating_message(rating: Rating) -> pb.Rating:
    if rating.scale not in _SCALES:
        raise ValueError(f"unknown rating scale {rating.scale!r}: use 'stars' or 'unit'")
    if not math.isfinite(rating.value):
        raise ValueError(f"rating value must be a finite number, got {rating.value}")
    return pb.Rating(image=image_message(rating.image), value=rating.value, scale=_SCALES[rating.scale])


def _image_error(message: pb.ImageError) -> ImageError:
    return ImageError(_STATUS_NAMES.get(message.code, f"CODE_{message.code}"), message.message)


def image_score(message: pb.ImageScore) -> ImageScore:
    return ImageScore(
        id=message.id,
        digest=message.digest,
        score=message.score,
        generic_score=message.generic_score,
        attributes={a.name: a.value for a in message.attributes},
        content=tuple(message.content),
        personalized=message.personalized,
        fallback_reason=_REASONS.get(message.fallback_reason, "unknown"),
        error=_image_error(message.error) if message.HasField("error") else None,
    )


def image_scores(messages: Sequence[pb.ImageScore]) -> list[ImageScore]:
    return [image_score(m) for m in messages]


def user_score(message: pb.UserScore) -> UserScore:
    return UserScore(
        user_id=message.user_id,
        score=message.score,
        personalized=message.personalized,
        fallback_reason=_REASONS.get(message.fallback_reason, "unknown"),
    )


def _factors(messages: Iterable[pb.TasteFactor]) -> list[TasteFactor]:
    return [TasteFactor(m.name, m.weight) for m in messages]


def profile(message: pb.Profile) -> Profile:
    return Profile(
        user_id=message.user_id,
        exists=message.exists,
        num_ratings=message.num_ratings,
        feature_space_version=message.feature_space_version,
        updated_at=message.updated_at,
        likes=_factors(message.likes),
        dislikes=_factors(message.dislikes),
        weights=_factors(message.weights),
    )


def suggestion(message: pb.Suggestion) -> Suggestion:
    return Suggestion(id=message.id, digest=message.digest, uncertainty=message.uncertainty)
