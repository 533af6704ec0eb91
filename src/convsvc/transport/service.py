"""The handler table for ConversationService.

Built here rather than by the generated ``add_..._to_server`` for two reasons: every method is
wrapped once, at start-up, with the error mapping and metrics (no per-call interceptor cost),
and the event-returning methods send pre-encoded bytes (see ``codec``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Histogram

from convsvc.errors import ConvsvcError
from convsvc.storage import StorageError
from convsvc.transport.servicer import ConversationServicer
from convsvc.transport.status import internal_error, storage_failure, to_grpc_status
from convsvc.v1 import conversation_service_pb2 as pb

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ConversationService"].full_name
_PRE_ENCODED = {"SearchEvents", "StreamEvents"}

CALLS = Counter("convsvc_rpc_calls_total", "RPCs handled", ["method", "code"])
LATENCY = Histogram(
    "convsvc_rpc_seconds",
    "Time to answer unary RPCs",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)


def _identity(data: bytes) -> bytes:
    return data


OnStorageFailure = Callable[[], Awaitable[None]]


async def _abort(
    method: str,
    context: grpc.aio.ServicerContext,
    exc: Exception,
    on_storage_failure: OnStorageFailure | None,
) -> None:
    if isinstance(exc, ConvsvcError):
        error = exc
    elif isinstance(exc, StorageError):
        log.error("rpc.storage_failed", method=method, error=str(exc))
        if on_storage_failure is not None:
            await on_storage_failure()
        error = storage_failure(exc)
    else:
        log.exception("rpc.internal_error", method=method)
        error = internal_error()
    status = to_grpc_status(error)
    CALLS.labels(method, status.code.name).inc()
    await context.abort_with_status(status)


def _guard_unary(
    method: str,
    fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    on_storage_failure: OnStorageFailure | None,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    latency = LATENCY.labels(method)
    ok = CALLS.labels(method, "OK")

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            response = await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc, on_storage_failure)
            raise  # unreachable: abort raises
        ok.inc()
        latency.observe(time.perf_counter() - started)
        return response

    return handle


def _guard_stream(
    method: str,
    fn: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    on_storage_failure: OnStorageFailure | None,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in fn(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc, on_storage_failure)
        CALLS.labels(method, "OK").inc()

    return handle


def conversation_service_handler(
    servicer: ConversationServicer, on_storage_failure: OnStorageFailure | None = None
) -> grpc.GenericRpcHandler:
    """The generic handler serving every ConversationService method.

    ``on_storage_failure`` runs when a call fails because the store did (health reporting).
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    service = pb.DESCRIPTOR.services_by_name["ConversationService"]
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        serialize = _identity if method.name in _PRE_ENCODED else response_type.SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(method.name, behaviour, on_storage_failure),
                request_deserializer=request_type.FromString,
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(method.name, behaviour, on_storage_failure),
                request_deserializer=request_type.FromString,
                response_serializer=serialize,
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
