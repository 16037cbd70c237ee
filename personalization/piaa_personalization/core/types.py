"""The service's request and result types (plain dataclasses; no gRPC, no Redis)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from piaa_personalization.core import personalizer
from piaa_personalization.core.metrics import Timings
from piaa_personalization.errors import DeadlineExceeded

NO_PROFILE = "no_profile"
STALE_PROFILE = "stale_profile"
STORE_UNAVAILABLE = "store_unavailable"
DISABLED = "disabled"
FALLBACK_REASONS = (NO_PROFILE, STALE_PROFILE, STORE_UNAVAILABLE, DISABLED)
"""Why a score is generic; the names of piaa.v1.FallbackReason without their prefix."""


@dataclass
class Call:
    """Per-call context: the caller's tenant, its deadline (time.monotonic() seconds) and timings."""

    tenant: str
    deadline: float
    timings: Timings = field(default_factory=Timings)
    report_timings: bool = False
    """The caller asked for the stage timings in the answer's trailers."""

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded")
        return left


@dataclass
class ImageRef:
    """An image of a request: its bytes, or the digest of bytes sent earlier."""

    id: str = ""
    data: bytes | None = None
    digest: str | None = None


@dataclass
class ImageAnalysis:
    """What the models say of one image (the generic part of every score)."""

    id: str
    digest: str
    head: personalizer.Head
    feature_space: str = ""
    """The feature space the head outputs (and so every score of this image) are in."""


@dataclass
class UserScore:
    """One user's score of one image."""

    user_id: str
    score: float
    personalized: bool
    reason: str | None


@dataclass
class Scored:
    """One image scored for one user."""

    analysis: ImageAnalysis
    score: float
    personalized: bool
    reason: str | None

    @property
    def generic(self) -> float:
        """The crowd's score of the image."""
        return self.analysis.head.generic


@dataclass
class Failed:
    """An image that could not be scored (allow_partial): its id, digest ("" when malformed) and why."""

    id: str
    digest: str
    status: str
    """Name of the gRPC status the whole call would have failed with (INVALID_ARGUMENT, NOT_FOUND)."""
    message: str


@dataclass
class RatingIn:
    """One rating as received: the image, the value and the scale's name (piaa.v1.RatingScale)."""

    image: ImageRef
    value: float
    scale: str


@dataclass
class RatingsReceipt:
    """What AddRatings answers: the profile now, the rated images' digests, and whether the call was a
    repeat of a request id that had recorded them already (nothing recorded now)."""

    profile: ProfileView
    digests: list[str]
    replayed: bool = False


@dataclass
class Suggestion:
    """An image worth rating and its predictive standard deviation."""

    id: str
    digest: str
    uncertainty: float


@dataclass
class ProfileView:
    """A profile as callers see it."""

    user_id: str
    exists: bool
    num_ratings: int = 0
    feature_space_version: str = ""
    updated_at: float = 0.0
    likes: list[tuple[str, float]] = field(default_factory=list)
    dislikes: list[tuple[str, float]] = field(default_factory=list)
    weights: list[tuple[str, float]] = field(default_factory=list)
