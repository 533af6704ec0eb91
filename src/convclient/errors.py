"""The client's errors: one root, one subclass per gRPC status a caller may handle.

The stable ``reason`` and ``metadata`` come from the google.rpc.ErrorInfo the server attaches.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ConvsvcClientError(Exception):
    """A call to convsvc failed; ``code`` is the gRPC status, ``reason`` the stable reason."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


class InvalidArgumentError(ConvsvcClientError):
    pass


class NotFoundError(ConvsvcClientError):
    pass


class FailedPreconditionError(ConvsvcClientError):
    pass


class AlreadyExistsError(ConvsvcClientError):
    pass


class ResourceExhaustedError(ConvsvcClientError):
    pass


class UnauthenticatedError(ConvsvcClientError):
    pass


class PermissionDeniedError(ConvsvcClientError):
    pass


class ServiceUnavailableError(ConvsvcClientError):
    """The service could not be reached or did not answer in time; safe to try again later."""


_BY_CODE: dict[grpc.StatusCode, type[ConvsvcClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailableError,
}


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # a status that does not match the call's code: ignore its details
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def error_for_code(
    code: grpc.StatusCode, message: str, *, reason: str = "", metadata: dict[str, str] | None = None
) -> ConvsvcClientError:
    """The typed error for a status code (e.g. a send's failure inside a stream)."""
    return _BY_CODE.get(code, ConvsvcClientError)(
        message, code=code, reason=reason, metadata=metadata
    )


def from_rpc_error(error: grpc.RpcError, *, address: str, timeout: float) -> ConvsvcClientError:
    """The typed error for a failed call, with a message a person can act on."""
    call: Any = error
    code: grpc.StatusCode = call.code()
    details: str = call.details() or ""
    info = _error_info(error)
    reason = info.reason if info is not None else ""
    metadata = dict(info.metadata) if info is not None else {}
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not reason:
        message = f"convsvc at {address} did not answer within {timeout:g} s"
    elif code == grpc.StatusCode.UNAVAILABLE and not reason:
        message = f"convsvc at {address} is unreachable: {details}"
    else:
        message = details or code.name
    return error_for_code(code, message, reason=reason, metadata=metadata)
