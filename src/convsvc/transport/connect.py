"""Connect: one bidirectional stream per connection (join, sends in, events out, disconnect).

A session is built from the servicer's own methods (JoinConversation, SendEvent,
DisconnectConnection and the event stream), so on a cluster node it is routed and followed
exactly as those calls are. Two pumps feed one bounded outbox that the stream drains:
- events: the conversation's events from the requested id on;
- sends: the client's requests, answered one at a time in order. The pump reads the next
  request only once the outbox takes the previous answer, so a client that sends faster
  than it reads is held back by HTTP/2 flow control rather than by memory.
A client that does not read its events is dropped like a slow StreamEvents subscriber.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import structlog

from convsvc.codec import encode_message_field
from convsvc.domain import StoredEvent
from convsvc.engine.subscriptions import StreamItem
from convsvc.errors import Cancelled, ConvsvcError, InvalidArgument
from convsvc.tasks import TaskOwner
from convsvc.transport.access import Access, Auditor, current_caller, forwarded
from convsvc.transport.convert import stream_items_to_bytes
from convsvc.transport.status import RelayedStatus, failure_parts
from convsvc.v1 import conversation_service_pb2 as pb

log = structlog.get_logger(__name__)

OUTBOX_BYTES = 4 * 1024 * 1024
"""Bytes of responses waiting to be written before the pumps wait (and so stop reading):
with the subscription's own bounded buffer, what a client that does not read can cost."""
DRAIN_SECONDS = 10.0
"""After the client's last send: how long the stream waits for the events its sends
appended to go out before it ends anyway."""
_EVENTS_FIELD = pb.ConnectResponse.EVENTS_FIELD_NUMBER
"""Stream messages are relayed as this field of ConnectResponse, not re-encoded."""


class ConnectHost(Protocol):
    """The servicer methods a session is made of."""

    access: Access | None
    auditor: Auditor | None
    tasks: TaskOwner
    """Owns what must outlive a session's stream (its disconnect)."""

    async def JoinConversation(self, request: Any, context: grpc.aio.ServicerContext) -> Any: ...

    async def SendEvent(self, request: Any, context: grpc.aio.ServicerContext) -> Any: ...

    async def DisconnectConnection(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any: ...

    def stream_items(
        self, request: pb.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[list[StreamItem]]: ...


def _as(message_type: Any, answer: Any) -> Any:
    """A servicer answer as a message (a forwarded one arrives as the owner's bytes)."""
    return message_type.FromString(answer) if isinstance(answer, bytes) else answer


_END = object()


class _Outbox:
    """A FIFO bounded in bytes: a put waits while what is queued and the new item would
    exceed the budget (an item alone may exceed it: it then waits for an empty queue)."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._bytes = 0
        self._changed = asyncio.Event()

    async def put(self, item: Any) -> None:
        size = len(item) if isinstance(item, bytes) else 0
        while self._items and self._bytes + size > self._budget:
            self._changed.clear()
            await self._changed.wait()
        self._items.append((item, size))
        self._bytes += size
        self._changed.set()

    async def get(self) -> Any:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        item, size = self._items.popleft()
        self._bytes -= size
        self._changed.set()
        return item


class ConnectSession:
    def __init__(
        self,
        host: ConnectHost,
        context: grpc.aio.ServicerContext,
        holders: dict[str, object],
    ) -> None:
        """``holders``: which session holds each connection id on this node (a reconnect
        with the same id takes it over, and the old session must not disconnect it)."""
        self._host = host
        self._context = context
        self._holders = holders
        self._outbox = _Outbox(OUTBOX_BYTES)
        self._delivered = -1
        self._progress = asyncio.Event()
        self._connection_id = ""
        self._user_id = ""
        self._caller = current_caller.get()

    async def run(self, requests: AsyncIterator[pb.ConnectRequest]) -> AsyncIterator[bytes]:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("request") != "open":
            error = InvalidArgument(
                "the first request of a Connect stream must be `open`",
                reason="CONNECT_OPEN_FIRST",
                metadata={"field": "open"},
            )
            self._record("Connect", None, error)
            raise error
        opening = first.open
        self._connection_id = opening.connection_id or f"connect-{uuid.uuid4().hex}"
        if self._host.access is not None:  # binds a scoped caller's user, checks its scope
            try:
                self._host.access.authorize("Connect", opening, self._caller)
            except ConvsvcError as refused:
                self._record("JoinConversation", self._join_request(opening), refused)
                raise
        self._user_id = opening.user_id
        join = self._join_request(opening)
        joined = _as(
            pb.JoinConversationResponse,
            await self._audited("JoinConversation", join, self._host.JoinConversation),
        )
        self._holders[self._connection_id] = self
        try:
            yield pb.ConnectResponse(
                opened=pb.ConnectOpened(
                    conversation=joined.conversation, connection=joined.connection
                )
            ).SerializeToString()
            start_id = (
                opening.start_id
                if opening.HasField("start_id")
                else joined.conversation.latest_event_id + 1
            )
            stream = pb.StreamEventsRequest(
                conversation_id=opening.conversation_id,
                user_id=opening.user_id,
                start_id=start_id,
                max_batch_size=opening.max_batch_size,
            )
            pumps = [
                asyncio.create_task(self._pump(self._pump_events(stream))),
                asyncio.create_task(self._pump(self._pump_sends(requests))),
            ]
            try:
                while (item := await self._outbox.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            await self._disconnect()

    def _join_request(self, opening: pb.ConnectOpen) -> pb.JoinConversationRequest:
        join = pb.JoinConversationRequest(
            conversation_id=opening.conversation_id,
            connection_id=self._connection_id,
            user_id=opening.user_id,
        )
        if opening.HasField("settings"):
            join.settings.CopyFrom(opening.settings)
        return join

    async def _pump(self, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # ends the stream with it (mapped like any call's)
            await self._outbox.put(exc)

    async def _pump_events(self, request: pb.StreamEventsRequest) -> None:
        async for items in self._host.stream_items(request, self._context):
            for message in stream_items_to_bytes(items):
                await self._outbox.put(encode_message_field(_EVENTS_FIELD, message))
            ids = [item.id for item in items if isinstance(item, StoredEvent)]
            if ids:
                self._delivered = ids[-1]
                self._progress.set()

    async def _pump_sends(self, requests: AsyncIterator[pb.ConnectRequest]) -> None:
        last_appended = -1
        async for request in requests:
            result = await self._send(request)
            last_appended = max(last_appended, result.event_id)
            await self._outbox.put(pb.ConnectResponse(send_result=result).SerializeToString())
        # The client ended its side: the events its sends appended go out before the end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                while self._delivered < last_appended:
                    self._progress.clear()
                    await self._progress.wait()
        await self._outbox.put(_END)

    async def _send(self, request: pb.ConnectRequest) -> pb.ConnectSendResult:
        if request.WhichOneof("request") != "send":
            return self._failed(
                request.send.request_id,
                InvalidArgument(
                    "a Connect stream opens once: send `send` requests after `open`",
                    reason="CONNECT_ALREADY_OPEN",
                ),
            )
        send = request.send
        event = pb.SendEventRequest(
            connection_id=self._connection_id,
            user_id=self._user_id,
            request_id=send.request_id,
            busy_policy=send.busy_policy,
        )
        if send.HasField("event"):
            event.event.CopyFrom(send.event)
        try:
            answer = _as(
                pb.SendEventResponse, await self._audited("SendEvent", event, self._host.SendEvent)
            )
        except (ConvsvcError, RelayedStatus) as exc:
            return self._failed(send.request_id, exc)
        return pb.ConnectSendResult(request_id=send.request_id, event_id=answer.event_id)

    async def _audited(
        self,
        method: str,
        request: Any,
        call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    ) -> Any:
        """Makes one of the session's calls, recorded in the audit log as that call."""
        try:
            response = await call(request, self._context)
        except (ConvsvcError, RelayedStatus) as exc:
            self._record(method, request, exc)
            raise
        except asyncio.CancelledError:
            # The stream ended (the client left, or its token ended) while the call ran.
            self._record(method, request, Cancelled("the stream ended before the answer"))
            raise
        self._record(method, request, None, response)
        return response

    def _record(
        self,
        method: str,
        request: Any,
        error: ConvsvcError | RelayedStatus | None,
        response: Any = None,
    ) -> None:
        """One entry of the audit log (a forwarded session was audited where it arrived)."""
        auditor = self._host.auditor
        if auditor is not None and not forwarded(self._context):
            auditor.record(method, request, self._caller, error, response)

    @staticmethod
    def _failed(request_id: str, error: ConvsvcError | RelayedStatus) -> pb.ConnectSendResult:
        code, reason, message, metadata = failure_parts(error)
        return pb.ConnectSendResult(
            request_id=request_id,
            event_id=-1,
            failure=pb.ConnectSendFailure(
                code=code, reason=reason, message=message, metadata=metadata
            ),
        )

    async def _disconnect(self) -> None:
        if self._holders.get(self._connection_id) is not self:
            return  # a newer stream holds the connection now
        del self._holders[self._connection_id]
        request = pb.DisconnectConnectionRequest(
            connection_id=self._connection_id, user_id=self._user_id
        )
        # Shielded: the client going away cancels this stream, not its clean-up.
        done = self._host.tasks.spawn(
            self._audited("DisconnectConnection", request, self._host.DisconnectConnection),
            f"connect-disconnect:{self._connection_id}",
        )
        try:
            await asyncio.shield(done)
        except (ConvsvcError, RelayedStatus) as exc:
            log.warning(
                "connect.disconnect_failed", connection_id=self._connection_id, error=str(exc)
            )
