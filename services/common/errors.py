"""The error types every service raises: defined once in the client package (`aiaas.errors`).

Core modules never import grpc: an error carries a transport-neutral `ErrorCode`, and
`services.common.interceptors.STATUS_BY_CODE` maps it to the status of the same name. This module
stays so that `from services.common.errors import NotFound` keeps working.
"""

from __future__ import annotations

from aiaas.errors import (
    ERROR_BY_CODE,
    Aborted,
    AiaasError,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    ErrorCode,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_for_status,
    error_from_rpc,
)

__all__ = [
    "ERROR_BY_CODE", "Aborted", "AiaasError", "AlreadyExists", "Cancelled", "DataLoss", "DeadlineExceeded",
    "ErrorCode", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound", "OutOfRange", "PermissionDenied",
    "ResourceExhausted", "Unauthenticated", "Unavailable", "Unimplemented", "error_for_status", "error_from_rpc",
]
