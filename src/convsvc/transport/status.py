"""The one place where convsvc errors become gRPC statuses with google.rpc.ErrorInfo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from convsvc import errors
from convsvc.storage import ConversationLogError, OwnerMoved, StorageError

ERROR_DOMAIN = "convsvc.v1"

_CODES: list[tuple[type[errors.ConvsvcError], int]] = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Aborted, code_pb2.ABORTED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.Unimplemented, code_pb2.UNIMPLEMENTED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.Cancelled, code_pb2.CANCELLED),
]


def _code_for(error: errors.ConvsvcError) -> int:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return int(code)
    return int(code_pb2.INTERNAL)


def to_grpc_status(error: errors.ConvsvcError) -> grpc.Status:
    """A status carrying the error's message and an ErrorInfo with its stable reason."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=_code_for(error), message=error.message, details=[detail])
    return rpc_status.to_status(status)


class RelayedStatus(Exception):
    """A status another node answered, relayed to the caller unchanged."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[Any, ...]
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata

    def naming(self, extra: dict[str, str]) -> RelayedStatus:
        """The same status with ``extra`` added to its ErrorInfo's metadata (which node
        answered); reason and message unchanged: they are the caller's to act on."""
        trailing: list[Any] = []
        for key, value in self.trailing_metadata:
            if key == _DETAILS:
                status = status_pb2.Status.FromString(value)
                for detail, info in _error_infos(status):
                    for name, said in extra.items():
                        if name not in info.metadata:
                            info.metadata[name] = said
                    detail.Pack(info)
                value = status.SerializeToString()
            trailing.append((key, value))
        return RelayedStatus(self.code, self.details, tuple(trailing))

    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        for key, value in self.trailing_metadata:
            if key == _DETAILS:
                for _, info in _error_infos(status_pb2.Status.FromString(value)):
                    return info
        return None


_DETAILS = "grpc-status-details-bin"


def _error_infos(
    status: status_pb2.Status,
) -> Iterator[tuple[any_pb2.Any, error_details_pb2.ErrorInfo]]:
    """The ErrorInfo details of a status, each with the detail that packs it."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            yield detail, info


def failure_parts(
    error: errors.ConvsvcError | RelayedStatus,
) -> tuple[str, str, str, dict[str, str]]:
    """(code name, reason, message, metadata) of an error, for answers inside a stream."""
    if isinstance(error, RelayedStatus):
        info = error.error_info()
        reason = info.reason if info is not None else error.code.name
        metadata = dict(info.metadata) if info is not None else {}
        return error.code.name, reason, error.details, metadata
    return to_grpc_status(error).code.name, error.reason, error.message, dict(error.metadata)


def storage_failure(error: StorageError) -> errors.ConvsvcError:
    return errors.Unavailable(
        "the event store failed; this server accepts no more writes (see its log)",
        reason="STORAGE_FAILED",
    )


def log_conflict(error: ConversationLogError) -> errors.ConvsvcError:
    cid = error.conversation_id
    return errors.Aborted(
        f"conversation {cid}'s log conflicted with what is stored (another writer?); the "
        "write was not made and the conversation was stopped: start it again to continue",
        reason="LOG_CONFLICT",
        metadata={"conversation_id": cid},
    )


def owner_moved(error: OwnerMoved) -> errors.ConvsvcError:
    metadata = {"conversation_id": error.conversation_id}
    if error.owner_address:
        metadata["owner_address"] = error.owner_address
    return errors.Unavailable(str(error), reason="OWNER_MOVED", metadata=metadata)


def database_unavailable() -> errors.ConvsvcError:
    return errors.Unavailable(
        "the database cannot be reached; this node recovers by itself once it is back: retry",
        reason="DATABASE_UNAVAILABLE",
    )


def internal_error() -> errors.ConvsvcError:
    return errors.ConvsvcError("internal error: the server logged the details", reason="INTERNAL")
