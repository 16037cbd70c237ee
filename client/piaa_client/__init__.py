"""PIAA client: the versioned API contract, the feature space, and sync/async clients.

from piaa_client import Client, Rating
with Client("127.0.0.1:50151") as piaa:
    piaa.add_ratings("alice", [Rating("beach.jpg", 5)])
    best = piaa.rank_album("alice", ["a.jpg", "b.jpg", "c.jpg"], top_k=1)
"""

from piaa_client.calls import RetryPolicy
from piaa_client.client import AsyncClient, Client
from piaa_client.errors import PiaaError
from piaa_client.features import FEATURE_SPACE_VERSION
from piaa_client.types import ImageError, ImageRef, ImageScore, Profile, Rating, Suggestion, UserScore

__all__ = [
    "FEATURE_SPACE_VERSION",
    "AsyncClient",
    "Client",
    "ImageError",
    "ImageRef",
    "ImageScore",
    "PiaaError",
    "Profile",
    "Rating",
    "RetryPolicy",
    "Suggestion",
    "UserScore",
]
