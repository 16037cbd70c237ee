"""The service's exception tree: each error names its gRPC status; api/server.py maps them in one place.

The names are strings (members of grpc.StatusCode) so that the service and its core import no gRPC.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service raises on purpose; callers read public_message()."""

    status = "INTERNAL"
    """Name of the grpc.StatusCode this error becomes."""
    retryable = False

    def public_message(self) -> str:
        """What the caller reads: the message, except for an INTERNAL error (ours; its message may quote a
        dependency, e.g. a Redis reply), whose message only the gateway's log gets."""
        return "internal error" if self.status == "INTERNAL" else str(self)


class InvalidArgument(ServiceError):
    """The request is malformed as it stands (user id, counts, rating values): fix it, do not retry."""

    status = "INVALID_ARGUMENT"


class ImageRejected(InvalidArgument):
    """One image could not be decoded or is outside the limits; the message says which and why."""


class NotFound(ServiceError):
    """An image digest is not (or no longer) in the feature cache: send the bytes instead."""

    status = "NOT_FOUND"


class Unavailable(ServiceError):
    """A dependency (Triton or the profile store) could not be reached; retry with backoff."""

    status = "UNAVAILABLE"
    retryable = True


class TritonUnavailable(Unavailable):
    """Triton did not answer or is not ready."""


class StoreDown(Unavailable):
    """The profile store did not answer (calls that must write fail with this; reads fall back)."""

    def public_message(self) -> str:
        # The message quotes redis-py (node addresses, replies): the log gets it, the caller does not.
        return "the profile store is unavailable: retry later"


class RequestIdReused(ServiceError):
    """An AddRatings request_id was already used, within its 24 hours, for other ratings of this user."""

    status = "FAILED_PRECONDITION"


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before its work was done."""

    status = "DEADLINE_EXCEEDED"


class Overloaded(ServiceError):
    """The gateway is draining or its queue is full; retry later."""

    status = "RESOURCE_EXHAUSTED"
    retryable = True


class ShuttingDown(Unavailable):
    """The gateway is draining and takes no new work."""


class Unauthenticated(ServiceError):
    """The call carries no API key, or one that is not in the keys file."""

    status = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller's key is valid but does not allow what it asked (another tenant's namespace)."""

    status = "PERMISSION_DENIED"


class RateLimited(Overloaded):
    """The caller's tenant used up its request rate; retry after the delay the message names."""


class DeletedMeanwhile(ServiceError):
    """AddRatings appended its ratings, then a DeleteProfile of the same user removed them before they
    were acknowledged: none was kept, and the request_id's receipt went with them, so sending the call
    again (with the same id or none) records them in a new profile."""

    status = "ABORTED"
