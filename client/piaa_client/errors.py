"""The client's exception tree: every gRPC failure becomes one PiaaError subclass, tagged retryable or not."""

from __future__ import annotations

import grpc


class PiaaError(Exception):
    """Base of every error the client raises. `code` is the gRPC status the server returned."""

    retryable = False

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(PiaaError):
    """The request was refused as it stands (bad image, bad rating, bad user id): fix it, do not retry."""


class NotFound(PiaaError):
    """The user or image digest is unknown to the service."""


class Unauthenticated(PiaaError):
    """Missing or wrong credentials."""


class PermissionDenied(PiaaError):
    """The credentials do not allow this call."""


class Overloaded(PiaaError):
    """The service shed the request (RESOURCE_EXHAUSTED); retry later with backoff."""

    retryable = True


class Unavailable(PiaaError):
    """The service or one of its dependencies could not be reached."""

    retryable = True


class DeadlineExceeded(PiaaError):
    """The call did not finish within its deadline."""


class ServerError(PiaaError):
    """Any other failure on the server side."""


_BY_CODE: dict[grpc.StatusCode, type[PiaaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


STATUS_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
"""grpc.StatusCode by its google.rpc.Code number (what ImageError and CallError carry)."""


def from_status(code: int, message: str) -> PiaaError:
    """The PiaaError of a status given by number (a ScoreStream answer's CallError)."""
    status = STATUS_BY_NUMBER.get(code)
    cls = _BY_CODE.get(status, ServerError) if status is not None else ServerError
    return cls(f"{status.name if status is not None else code}: {message}", status)


def from_rpc_error(error: grpc.RpcError) -> PiaaError:
    """Maps a failed call (sync or async) to the matching PiaaError."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, ServerError) if code is not None else ServerError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{name}: {details}", code)
