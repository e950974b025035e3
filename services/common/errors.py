"""One error root for every service. Core code raises these; one interceptor maps them to gRPC.

Core modules never import grpc: an error carries a transport-neutral `ErrorCode`, and
`services.common.interceptors.STATUS_BY_CODE` is the single table that maps it to a status.
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
