"""The errors convsvc raises on purpose.

Each expected failure is a subclass of :class:`ConvsvcError` carrying a stable ``reason``; the
transport maps each class to exactly one gRPC status (see ``transport.status``). Anything else
that escapes is a bug and is reported as INTERNAL without details.
"""

from __future__ import annotations

from collections.abc import Mapping


class ConvsvcError(Exception):
    """Root of the errors a caller can act on."""

    reason: str = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(ConvsvcError):
    """The request itself is malformed (ids, payloads, page sizes, tokens)."""

    reason = "INVALID_ARGUMENT"


class NotFound(ConvsvcError):
    """The named conversation or connection does not exist for this caller."""

    reason = "NOT_FOUND"


class FailedPrecondition(ConvsvcError):
    """The target exists but is not in a state that allows the call."""

    reason = "FAILED_PRECONDITION"


class AlreadyExists(ConvsvcError):
    """A request id was reused for a different call."""

    reason = "REQUEST_ID_CONFLICT"


class ResourceExhausted(ConvsvcError):
    """A limit was reached, e.g. a subscriber fell too far behind."""

    reason = "RESOURCE_EXHAUSTED"


class Aborted(ConvsvcError):
    """The call conflicted with a concurrent change (e.g. another writer of a log); retry
    at a higher level."""

    reason = "ABORTED"


class Unavailable(ConvsvcError):
    """The service cannot serve the call now (shutting down); retry elsewhere or later."""

    reason = "UNAVAILABLE"


class DeadlineExceeded(ConvsvcError):
    """Something the call depends on did not happen in time (e.g. a silent worker)."""

    reason = "DEADLINE_EXCEEDED"


class Unauthenticated(ConvsvcError):
    """The call lacks valid credentials."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(ConvsvcError):
    """The credentials are valid but do not allow this call."""

    reason = "PERMISSION_DENIED"


class Cancelled(ConvsvcError):
    """The caller went away (cancelled, or its connection closed) before the answer."""

    reason = "CANCELLED"


class Unimplemented(ConvsvcError):
    """The server does not offer this (in this mode)."""

    reason = "NOT_SUPPORTED"
