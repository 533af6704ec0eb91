"""AgentWorkerService over gRPC: one Attach stream per worker, converted to and from the
pool's messages.

Like ConversationService's table (``transport.service``), the handler parses requests itself,
so bytes that do not parse detach the worker with INVALID_ARGUMENT rather than grpc's
UNKNOWN. Attach streams are not counted by the shutdown drain: they last as long as the
worker, and a stopping server ends them (the worker reconnects elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog
from google.protobuf import duration_pb2

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.errors import ConvsvcError, DeadlineExceeded, InvalidArgument, Unavailable
from convsvc.storage import StorageError
from convsvc.transport.service import CallGate, parse_request
from convsvc.transport.status import internal_error, to_grpc_status
from convsvc.v1 import agent_worker_service_pb2 as wpb
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.workers.messages import (
    AssignMessage,
    CompletionMessage,
    DeliverMessage,
    HistoryMessage,
    IncomingEvent,
    Outgoing,
    StopMessage,
)
from convsvc.workers.pool import WorkerPool, WorkerSession

log = structlog.get_logger(__name__)

WORKER_SERVICE_NAME = wpb.DESCRIPTOR.services_by_name["AgentWorkerService"].full_name
_MAX_UNAWAITED_BATCHES = 64
"""Event batches of one worker that may wait for commit before its stream is read again."""


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _to_pb(message: Outgoing) -> wpb.AttachResponse:
    if isinstance(message, AssignMessage):
        assign = wpb.AssignLoop(
            conversation_id=message.conversation_id,
            assignment=message.assignment,
            agent_kind=message.agent_kind,
            user_id=message.user_id,
            settings=dict_to_struct(dict(message.settings)),
            next_event_id=message.next_event_id,
            replay_events=[dict_to_struct(event) for event in message.replay_events],
        )
        if message.initial_user_message is not None:
            assign.initial_user_message.CopyFrom(dict_to_struct(message.initial_user_message))
        return wpb.AttachResponse(assign=assign)
    if isinstance(message, HistoryMessage):
        return wpb.AttachResponse(
            history=wpb.LoopHistory(
                conversation_id=message.conversation_id,
                assignment=message.assignment,
                events=[pb.Event.FromString(encoded) for encoded in message.events],
            )
        )
    if isinstance(message, DeliverMessage):
        return wpb.AttachResponse(
            deliver=wpb.DeliverUserEvent(
                conversation_id=message.conversation_id,
                assignment=message.assignment,
                delivery_id=message.delivery_id,
                payload=dict_to_struct(message.payload),
                trace_parent=message.trace_parent,
            )
        )
    if isinstance(message, CompletionMessage):
        return wpb.AttachResponse(
            completion=wpb.CompletionRequest(
                conversation_id=message.conversation_id,
                assignment=message.assignment,
                request_id=message.request_id,
                service_id=message.service_id,
                llm_config=dict_to_struct(message.llm_config),
                messages=[dict_to_struct(m) for m in message.messages],
            )
        )
    assert isinstance(message, StopMessage)
    return wpb.AttachResponse(
        stop=wpb.StopLoop(conversation_id=message.conversation_id, assignment=message.assignment)
    )


class AgentWorkerServicer:
    """Attach: the hello, then two directions at once until either ends."""

    def __init__(self, pool: WorkerPool, gate: CallGate) -> None:
        self._pool = pool
        self._gate = gate

    async def Attach(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wpb.AttachResponse]:
        try:
            if self._gate.closed:
                raise Unavailable(
                    "the server is shutting down; attach to another server or later",
                    reason="SHUTTING_DOWN",
                )
            session = await self._hello(requests)
        except ConvsvcError as exc:
            await context.abort_with_status(to_grpc_status(exc))
            return
        config = self._pool.config
        yield wpb.AttachResponse(
            welcome=wpb.WorkerWelcome(
                worker_id=session.worker_id,
                ping_interval=_duration(config.ping_interval_seconds),
                silence_timeout=_duration(config.silence_timeout_seconds),
                max_event_bytes=self._pool.max_event_bytes,
            )
        )
        reader = asyncio.create_task(self._read(session, requests), name="worker-reader")
        try:
            while True:
                item = await session.next_outgoing()
                if item is None:
                    return
                if isinstance(item, ConvsvcError):
                    await context.abort_with_status(to_grpc_status(item))
                    return
                yield _to_pb(item)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._pool.detach(session, None)

    async def _hello(self, requests: AsyncIterator[bytes]) -> WorkerSession:
        timeout = self._pool.config.silence_timeout_seconds
        try:
            first = await asyncio.wait_for(anext(requests), timeout)
        except StopAsyncIteration:
            raise InvalidArgument(
                "the stream ended before a hello", reason="WORKER_PROTOCOL_VIOLATION"
            ) from None
        except TimeoutError:
            raise DeadlineExceeded(
                f"no hello within {timeout:g}s", reason="WORKER_SILENT"
            ) from None
        message = parse_request(wpb.AttachRequest, first)
        if message.WhichOneof("message") != "hello":
            raise InvalidArgument(
                "the first message of Attach must be a hello", reason="WORKER_PROTOCOL_VIOLATION"
            )
        hello = message.hello
        return self._pool.attach(hello.worker_id, hello.agent_kinds, hello.capacity)

    async def _read(self, session: WorkerSession, requests: AsyncIterator[bytes]) -> None:
        """Everything the worker says after its hello; any protocol error detaches it."""
        unawaited: list[asyncio.Future[None]] = []
        try:
            async for data in requests:
                self._pool.heard(session)
                message = parse_request(wpb.AttachRequest, data)
                kind = message.WhichOneof("message")
                if kind == "events":
                    batch = message.events
                    durable = self._pool.on_events(
                        session,
                        batch.conversation_id,
                        batch.assignment,
                        [
                            IncomingEvent(e.id, e.source, struct_to_dict(e.payload), e.delivery_id)
                            for e in batch.events
                        ],
                    )
                    if durable is not None:
                        unawaited.append(durable)
                    if len(unawaited) >= _MAX_UNAWAITED_BATCHES:
                        # A worker that emits faster than the disk commits waits here.
                        await asyncio.gather(*unawaited, return_exceptions=True)
                        unawaited.clear()
                elif kind == "status":
                    status = message.status
                    self._pool.on_status(
                        session,
                        status.conversation_id,
                        status.assignment,
                        struct_to_dict(status.status),
                    )
                elif kind == "failed":
                    failed = message.failed
                    self._pool.on_failed(
                        session, failed.conversation_id, failed.assignment, failed.message
                    )
                elif kind == "completion":
                    result = message.completion
                    self._pool.on_completion(
                        session,
                        result.conversation_id,
                        result.assignment,
                        result.request_id,
                        result.content,
                        result.error,
                    )
                elif kind == "released":
                    released = message.released
                    self._pool.on_released(session, released.conversation_id, released.assignment)
                elif kind == "hello":
                    raise InvalidArgument(
                        "hello may be sent only once", reason="WORKER_PROTOCOL_VIOLATION"
                    )
                elif kind is None:
                    raise InvalidArgument(
                        "an AttachRequest must set one message", reason="WORKER_PROTOCOL_VIOLATION"
                    )
            self._pool.detach(session, None)  # the worker half-closed: it is leaving
        except ConvsvcError as exc:
            self._pool.detach(session, exc)
        except StorageError as exc:
            log.error("worker.storage_failed", worker_id=session.worker_id, error=str(exc))
            self._pool.detach(
                session,
                Unavailable("the event store failed; attach elsewhere", reason="STORAGE_FAILED"),
            )
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, grpc.aio.AbortError):
            # The stream broke, or the writer half aborted it (it holds the reason) while
            # this half was still reading.
            self._pool.detach(session, None)
        except Exception:
            log.exception("worker.internal_error", worker_id=session.worker_id)
            self._pool.detach(session, internal_error())


def agent_worker_handler(servicer: AgentWorkerServicer) -> grpc.GenericRpcHandler:
    """The generic handler for AgentWorkerService (requests arrive as bytes)."""
    return grpc.method_handlers_generic_handler(
        WORKER_SERVICE_NAME,
        {
            "Attach": grpc.stream_stream_rpc_method_handler(
                servicer.Attach, response_serializer=wpb.AttachResponse.SerializeToString
            )
        },
    )
