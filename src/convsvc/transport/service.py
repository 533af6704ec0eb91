"""The handler table for ConversationService.

Built here rather than by the generated ``add_..._to_server`` for three reasons: every method
is wrapped once, at start-up, with the error mapping, the shutdown gate and metrics (no
per-call interceptor cost); requests are parsed inside that wrapper, so bytes that do not
parse get INVALID_ARGUMENT instead of grpc's UNKNOWN; and the event-returning methods send
pre-encoded bytes (see ``codec``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from convsvc.errors import (
    Cancelled,
    ConvsvcError,
    DeadlineExceeded,
    InvalidArgument,
    Unavailable,
)
from convsvc.metrics import Metrics
from convsvc.storage import (
    ConversationLogError,
    LogInterrupted,
    OwnerMoved,
    StorageError,
    StoreUnavailable,
)
from convsvc.transport.access import (
    ANONYMOUS,
    MUTATIONS,
    UNIDENTIFIED,
    Access,
    Auditor,
    Caller,
    current_caller,
    forwarded,
)
from convsvc.transport.credentials import HeldToken, until_ended
from convsvc.transport.servicer import ConversationServicer
from convsvc.transport.status import (
    RelayedStatus,
    database_unavailable,
    internal_error,
    log_conflict,
    owner_moved,
    storage_failure,
    to_grpc_status,
)
from convsvc.v1 import conversation_service_pb2 as pb

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConversationService"].full_name
_PRE_ENCODED = {"SearchEvents", "StreamEvents", "Connect"}


def _identity(data: bytes) -> bytes:
    return data


def _serializer(response_type: Any) -> Callable[[Any], bytes]:
    """Serializes a response message; bytes (an answer relayed from another node) pass."""

    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else response.SerializeToString()

    return serialize


OnStorageFailure = Callable[[], Awaitable[None]]


class CallGate:
    """Counts the calls being handled and, once closed for shutdown, turns new ones away with
    UNAVAILABLE/SHUTTING_DOWN (which clients retry elsewhere) while those in flight finish."""

    QUIET_SECONDS = 0.1
    """How long no call may arrive before the drain ends: a call grpc has received but not
    yet handed to us would be cancelled by the stop that follows, not refused."""

    def __init__(self) -> None:
        self.closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrivals = 0

    def enter(self) -> None:
        self._arrivals += 1
        if self.closed:
            raise Unavailable(
                "the server is shutting down; retry on another server or later",
                reason="SHUTTING_DOWN",
            )
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def close_and_drain(self, timeout: float) -> bool:
        """Refuses new calls and waits up to ``timeout`` until none is in flight and none
        has arrived for a moment; True if that happened in time."""
        self.closed = True
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                remaining = deadline - asyncio.get_running_loop().time()
                await asyncio.wait_for(self._idle.wait(), max(remaining, 0))
                seen = self._arrivals
                # Time is what is waited for here: grpc gives no signal of calls it holds.
                await asyncio.sleep(min(self.QUIET_SECONDS, max(remaining, 0)))
            except TimeoutError:
                return False
            if self._arrivals == seen and self._idle.is_set():
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False


def parse_request(request_type: Any, data: bytes) -> Any:
    """Parses request bytes; bad bytes are INVALID_ARGUMENT (MALFORMED_REQUEST), not UNKNOWN."""
    try:
        return request_type.FromString(data)
    except Exception as exc:  # DecodeError, or RecursionError from nesting: the bytes are bad
        raise InvalidArgument(
            f"the request is not a valid {request_type.DESCRIPTOR.full_name} message "
            f"({type(exc).__name__})",
            reason="MALFORMED_REQUEST",
        ) from None


class Guard:
    """What every call goes through: the shutdown gate, request parsing, who calls and what
    they may do, the audit log, metrics, and errors mapped to statuses."""

    def __init__(
        self,
        gate: CallGate,
        on_storage_failure: OnStorageFailure | None,
        access: Access | None,
        auditor: Auditor | None,
        metrics: Metrics,
    ) -> None:
        self.gate = gate
        self.on_storage_failure = on_storage_failure
        self.access = access
        self.auditor = auditor
        self._calls = metrics.rpc_calls
        self._seconds = metrics.rpc_seconds
        self._ok_counters: dict[str, Any] = {}
        self._timers: dict[str, Any] = {}

    def call(
        self, method: str, context: grpc.aio.ServicerContext, *, unary: bool = False
    ) -> GuardedCall:
        """``async with guard.call(...) as call``: the block handles one call and fills in
        what it learns (request, caller, response); an error it raises becomes the call's
        status. A ``unary`` call is timed and recorded in the audit log here (streams record
        what they do themselves)."""
        return GuardedCall(self, method, context, unary)

    def _ok(self, method: str) -> Any:
        counter = self._ok_counters.get(method)
        if counter is None:  # labels() takes a lock: looked up once per method
            counter = self._ok_counters[method] = self._calls.labels(method, "OK")
        return counter

    def _timer(self, method: str) -> Any:
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = self._seconds.labels(method)
        return timer

    async def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        if self.access is None:
            return ANONYMOUS
        caller = await self.access.identify(context)
        current_caller.set(caller)
        return caller

    def authorize(self, method: str, request: Any, caller: Caller) -> None:
        """Checks (and binds) the request to what the caller may do."""
        if self.access is not None:
            self.access.authorize(method, request, caller)

    def holding(self, caller: Caller) -> contextlib.AbstractContextManager[HeldToken | None]:
        """A stream's hold on its caller's scoped token (see transport.credentials)."""
        if self.access is None:
            return contextlib.nullcontext()
        return self.access.streams.hold(caller.scope)

    def audit_refused(
        self, method: str, context: grpc.aio.ServicerContext, error: ConvsvcError
    ) -> None:
        """A stream refused before it did anything (its credentials), as a mutation."""
        if self.auditor is not None and not forwarded(context):
            self.auditor.record(method, None, UNIDENTIFIED, error)

    async def _enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            self.gate.enter()
        except ConvsvcError as exc:
            await self._abort(method, context, exc)

    def _audit(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        call: GuardedCall,
        error: ConvsvcError | RelayedStatus | None,
    ) -> None:
        # A call another node forwarded was audited where it arrived.
        if self.auditor is not None and method in MUTATIONS and not forwarded(context):
            self.auditor.record(method, call.request, call.caller, error, call.response)

    async def _as_error(self, method: str, exc: Exception) -> ConvsvcError | RelayedStatus:
        """What a failed call answers (logging what the caller cannot act on)."""
        if isinstance(exc, ConvsvcError | RelayedStatus):  # RelayedStatus: another node's
            return exc
        if isinstance(exc, OwnerMoved):
            return owner_moved(exc)
        if isinstance(exc, LogInterrupted | StoreUnavailable):
            # The database is away: this node recovers by itself once it is back.
            log.warning("rpc.database_unavailable", method=method, error=str(exc))
            return database_unavailable()
        if isinstance(exc, ConversationLogError):
            # One conversation's log conflicted; the node and its other conversations are fine.
            log.error("rpc.log_conflict", method=method, conversation_id=exc.conversation_id)
            return log_conflict(exc)
        if isinstance(exc, StorageError):
            log.error("rpc.storage_failed", method=method, error=str(exc))
            if self.on_storage_failure is not None:
                await self.on_storage_failure()
            return storage_failure(exc)
        log.exception("rpc.internal_error", method=method)
        return internal_error()

    async def _abort(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        error: ConvsvcError | RelayedStatus,
    ) -> None:
        if isinstance(error, RelayedStatus):
            self._calls.labels(method, error.code.name).inc()
            await context.abort(
                error.code, error.details, trailing_metadata=error.trailing_metadata
            )
            return
        status = to_grpc_status(error)
        self._calls.labels(method, status.code.name).inc()
        await context.abort_with_status(status)


def _gone(context: grpc.aio.ServicerContext) -> ConvsvcError:
    """Why a call ended without an answer: its deadline passed, or its caller left."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        return DeadlineExceeded(
            "the call's deadline passed before it was answered", reason="DEADLINE_EXCEEDED"
        )
    return Cancelled("the caller went away before the answer", reason="CANCELLED")


class GuardedCall:
    """One call in its guard (see ``Guard.call``), and what it learned as it went."""

    __slots__ = (
        "_context",
        "_guard",
        "_method",
        "_started",
        "_unary",
        "caller",
        "request",
        "response",
    )

    def __init__(
        self, guard: Guard, method: str, context: grpc.aio.ServicerContext, unary: bool
    ) -> None:
        self._guard = guard
        self._method = method
        self._context = context
        self._unary = unary
        self._started = 0.0
        self.request: Any = None
        self.caller: Caller = UNIDENTIFIED
        self.response: Any = None

    async def __aenter__(self) -> GuardedCall:
        self._started = time.perf_counter()
        await self._guard._enter(self._method, self._context)
        return self

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        guard, method, context = self._guard, self._method, self._context
        guard.gate.leave()
        if isinstance(exc, grpc.aio.AbortError):
            return
        if isinstance(exc, asyncio.CancelledError):
            # The caller went away (a cancel, its deadline): what it asked for is audited
            # with that outcome (the effect may still happen, e.g. a send a worker logs).
            if self._unary and self.request is not None:
                guard._audit(method, context, self, _gone(context))
            guard._calls.labels(method, "CANCELLED").inc()
            return
        if exc is not None and not isinstance(exc, Exception):
            return  # KeyboardInterrupt and the like
        error = await guard._as_error(method, exc) if exc is not None else None
        if self._unary and self.request is not None:
            guard._audit(method, context, self, error)
        if error is not None:
            await guard._abort(method, context, error)  # raises the call's status
        guard._ok(method).inc()
        if self._unary:
            guard._timer(method).observe(time.perf_counter() - self._started)


def _guard_unary(
    method: str,
    request_type: Any,
    fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    guard: Guard,
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        async with guard.call(method, context, unary=True) as call:
            call.request = parse_request(request_type, data)
            call.caller = await guard.identify(context)
            guard.authorize(method, call.request, call.caller)
            call.response = await fn(call.request, context)
        return call.response

    return handle


def _guard_stream(
    method: str,
    request_type: Any,
    fn: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    guard: Guard,
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    # An async generator function itself: that is how grpc.aio tells a streaming handler.
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with guard.call(method, context):
            request = parse_request(request_type, data)
            caller = await guard.identify(context)
            guard.authorize(method, request, caller)
            with guard.holding(caller) as held:
                async for response in until_ended(held, fn(request, context)):
                    yield response

    return handle


def _guard_bidi(
    method: str,
    request_type: Any,
    fn: Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]],
    guard: Guard,
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handle(
        request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for data in request_iterator:
                yield parse_request(request_type, data)

        async with guard.call(method, context):
            try:
                caller = await guard.identify(context)
            except ConvsvcError as refused:
                guard.audit_refused(method, context, refused)
                raise
            # What the caller may do is checked (and audited) by the stream as it opens.
            with guard.holding(caller) as held:
                async for response in until_ended(held, fn(parsed(), context)):
                    yield response

    return handle


def conversation_service_handler(
    servicer: ConversationServicer,
    gate: CallGate,
    metrics: Metrics,
    on_storage_failure: OnStorageFailure | None = None,
) -> grpc.GenericRpcHandler:
    """The generic handler serving every ConversationService method.

    ``gate`` admits calls until shutdown; ``metrics`` counts and times them;
    ``on_storage_failure`` runs when a call fails because the store did (health reporting);
    the servicer's access and auditor (when secured) decide who may call and record what
    they did.
    """
    guard = Guard(gate, on_storage_failure, servicer.access, servicer.auditor, metrics)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    service = pb.DESCRIPTOR.services_by_name["ConversationService"]
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        serialize = _identity if method.name in _PRE_ENCODED else _serializer(response_type)
        behaviour = getattr(servicer, method.name)
        # No request_deserializer: the guards parse, so that bad bytes get a clear status.
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _guard_bidi(method.name, request_type, behaviour, guard),
                response_serializer=serialize,
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(method.name, request_type, behaviour, guard),
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(method.name, request_type, behaviour, guard),
                response_serializer=serialize,
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
