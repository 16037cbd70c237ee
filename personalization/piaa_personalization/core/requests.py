"""Request validation for the service: user ids, user and image counts, image bytes or digests."""

from __future__ import annotations

from collections.abc import Sequence

from piaa_personalization.config import GatewayConfig
from piaa_personalization.core.memory import DigestMemo
from piaa_personalization.core.types import Failed, ImageRef
from piaa_personalization.errors import InvalidArgument

_HEX = frozenset("0123456789abcdef")


class RequestChecker:
    """Checks a request's users and images against the GatewayConfig limits; gives each image its digest
    (remembered in `digests`, so a repeated photo is not hashed with SHA-256 again)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.digests = DigestMemo(config.feature_memory_size)

    def user(self, user_id: str) -> None:
        """Raises InvalidArgument when `user_id` is empty or longer than max_user_id_bytes in UTF-8."""
        size = len(user_id.encode("utf-8"))
        if size == 0:
            raise InvalidArgument("user_id is empty")
        if size > self.config.max_user_id_bytes:
            raise InvalidArgument(f"user_id is {size} bytes; at most {self.config.max_user_id_bytes}")

    def users(self, user_ids: Sequence[str]) -> None:
        """Raises InvalidArgument for no users, more than max_users_per_request, or a bad user id."""
        if not user_ids:
            raise InvalidArgument("no user_ids given")
        if len(user_ids) > self.config.max_users_per_request:
            raise InvalidArgument(f"{len(user_ids)} users; at most {self.config.max_users_per_request}")
        for user in user_ids:
            self.user(user)

    def images(self, images: Sequence[ImageRef], what: str = "images") -> list[ImageRef]:
        """Each image with its digest; raises InvalidArgument for a count out of bounds or the first
        malformed image (`what` names the request field in the message)."""
        out = []
        for checked in self.images_partial(images, what):
            if isinstance(checked, Failed):
                raise InvalidArgument(checked.message)
            out.append(checked)
        return out

    def images_partial(self, images: Sequence[ImageRef], what: str) -> list[ImageRef | Failed]:
        """Each image with its digest, or Failed in its place when it is malformed; raises InvalidArgument
        for a count out of bounds."""
        if not images:
            raise InvalidArgument(f"no {what} given")
        if len(images) > self.config.max_images_per_request:
            raise InvalidArgument(
                f"{len(images)} {what}; at most {self.config.max_images_per_request} per request"
            )
        out: list[ImageRef | Failed] = []
        for i, image in enumerate(images):
            if image.data:
                out.append(ImageRef(image.id, image.data, self.digests.sha256_hex(image.data)))
            elif image.digest:
                digest = image.digest.lower()
                if len(digest) != 64 or not set(digest) <= _HEX:
                    message = f"{what}[{i}]: digest is not a hex SHA-256"
                    out.append(Failed(image.id, "", InvalidArgument.status, message))
                else:
                    out.append(ImageRef(image.id, None, digest))
            else:
                message = f"{what}[{i}] has neither data nor digest"
                out.append(Failed(image.id, "", InvalidArgument.status, message))
        return out
