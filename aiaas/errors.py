"""The error types of aiaas, shared by the services and the SDK, and the one table of their gRPC statuses.

Each `ErrorCode` is named after the gRPC status it travels as (INVALID_ARGUMENT travels as
`grpc.StatusCode.INVALID_ARGUMENT`): that naming is the status table. The server side builds its
`STATUS_BY_CODE` from it (services.common.interceptors) and `error_from_rpc` reads it backwards, so
an error keeps its type across a call. No grpc import here: core modules raise these freely.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNIMPLEMENTED = "unimplemented"
    OUT_OF_RANGE = "out_of_range"
    DATA_LOSS = "data_loss"
    INTERNAL = "internal"

    @property
    def status_name(self) -> str:
        """The name of the gRPC status this code travels as."""
        return self.name


class AiaasError(Exception):
    """Root of every error a service reports to its caller on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Extra trailing metadata for the caller (e.g. a retry-after hint).
        self.metadata = dict(metadata or {})


class InvalidArgument(AiaasError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(AiaasError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(AiaasError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(AiaasError):
    code = ErrorCode.FAILED_PRECONDITION


class Aborted(AiaasError):
    """A concurrent change won (e.g. a compare-and-set lost); the caller may retry."""

    code = ErrorCode.ABORTED


class Unauthenticated(AiaasError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(AiaasError):
    code = ErrorCode.PERMISSION_DENIED


class ResourceExhausted(AiaasError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(AiaasError):
    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(AiaasError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(AiaasError):
    code = ErrorCode.CANCELLED


class Unimplemented(AiaasError):
    code = ErrorCode.UNIMPLEMENTED


class OutOfRange(AiaasError):
    code = ErrorCode.OUT_OF_RANGE


class DataLoss(AiaasError):
    """Stored data no longer matches its recorded hash."""

    code = ErrorCode.DATA_LOSS


class Internal(AiaasError):
    code = ErrorCode.INTERNAL


ERROR_BY_CODE: dict[ErrorCode, type[AiaasError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Aborted, Unauthenticated,
                PermissionDenied, ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled, Unimplemented,
                OutOfRange, DataLoss, Internal)
}
_ERROR_BY_STATUS_NAME: dict[str, type[AiaasError]] = {code.status_name: cls for code, cls in ERROR_BY_CODE.items()}


def error_for_status(status: object) -> type[AiaasError]:
    """The error type of a gRPC status: a `grpc.StatusCode`, its name, or tritonclient's "StatusCode.X".

    Statuses with no code of ours (UNKNOWN, OK) are Internal.
    """
    name = getattr(status, "name", None) or str(status or "")
    return _ERROR_BY_STATUS_NAME.get(name.removeprefix("StatusCode."), Internal)


def error_from_rpc(exc: BaseException, context: str = "") -> AiaasError:
    """The `AiaasError` a failed call stands for, its message prefixed with `context` when given.

    Takes a `grpc.RpcError` (`.code()`, `.details()`), tritonclient's InferenceServerException
    (`.status()`, `.message()`) or an `AiaasError` (returned as is); anything else is Internal.
    """
    if isinstance(exc, AiaasError):
        return exc
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None)
    if callable(code) and callable(getattr(exc, "details", None)):
        found, details = code(), exc.details()  # type: ignore[attr-defined]
    elif callable(status) and callable(getattr(exc, "message", None)):
        found, details = status(), exc.message()  # type: ignore[attr-defined]
    else:
        found, details = None, str(exc)
    name = getattr(found, "name", None) or str(found or "").removeprefix("StatusCode.") or "UNKNOWN"
    message = details or name
    return error_for_status(found)(f"{context}: {message}" if context else message)
