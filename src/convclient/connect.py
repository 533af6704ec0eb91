"""A connection held over one Connect stream: sends answered in order, events flowing back.

The async and the blocking session differ only in how they wait; both read the stream in the
background and hand each send its own answer (the server answers sends in the order they
were made) and queue events for ``events()``. Events are queued up to a bound: a caller that
does not read them stops the stream being read, and the server then drops the stream as too
slow (the caller reopens with ``start_id``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc

from convclient import convert
from convclient.errors import ConvsvcClientError, error_for_code
from convclient.models import Connection, Conversation, EventBatch, SendResult
from convclient.requests import new_request_id
from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb

EVENT_BUFFER = 1000
"""Event batches received and not yet taken by ``events()``."""

ErrorOf = Callable[[grpc.RpcError], ConvsvcClientError]


def open_request(
    conversation_id: str,
    *,
    connection_id: str = "",
    user_id: str = "",
    settings: Mapping[str, Any] | None = None,
    start_id: int | None = None,
    max_batch_size: int = 0,
) -> pb.ConnectRequest:
    opening = pb.ConnectOpen(
        conversation_id=conversation_id,
        connection_id=connection_id,
        user_id=user_id,
        max_batch_size=max_batch_size,
    )
    if settings is not None:
        opening.settings.CopyFrom(dict_to_struct(settings))
    if start_id is not None:
        opening.start_id = start_id
    return pb.ConnectRequest(open=opening)


def send_request(event: Mapping[str, Any], request_id: str | None) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        send=pb.ConnectSend(event=dict_to_struct(event), request_id=request_id or new_request_id())
    )


def _send_outcome(
    conversation_id: str, result: pb.ConnectSendResult
) -> SendResult | ConvsvcClientError:
    if not result.HasField("failure"):
        return SendResult(conversation_id=conversation_id, event_id=result.event_id)
    failure = result.failure
    code = getattr(grpc.StatusCode, failure.code, grpc.StatusCode.UNKNOWN)
    return error_for_code(
        code, failure.message, reason=failure.reason, metadata=dict(failure.metadata)
    )


Answer = asyncio.Future[SendResult] | concurrent.futures.Future[SendResult]


def _take(
    conversation_id: str, response: pb.ConnectResponse, pending: collections.deque[Any]
) -> EventBatch | None:
    """Answers the oldest pending send with a send result; returns an events batch."""
    which = response.WhichOneof("response")
    if which == "send_result":
        outcome = _send_outcome(conversation_id, response.send_result)
        answer: Answer = pending.popleft()
        if isinstance(outcome, ConvsvcClientError):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)
    elif which == "events":
        return convert.event_batch(response.events)
    return None


def _fail_pending(pending: collections.deque[Any], failure: BaseException | None) -> None:
    for answer in pending:
        if not answer.done():
            answer.set_exception(failure or ConvsvcClientError("the Connect stream ended"))
    pending.clear()


class AsyncConnectSession:
    """Use ``async with client.connect(...) as session``; leaving it ends the stream (after
    the sends in flight are answered), which disconnects the connection."""

    def __init__(self, call: Any, opening: pb.ConnectRequest, error_of: ErrorOf) -> None:
        self._call = call
        self._opening = opening
        self._error_of = error_of
        self._pending: collections.deque[asyncio.Future[SendResult]] = collections.deque()
        self._events: asyncio.Queue[EventBatch | BaseException | None] = asyncio.Queue(EVENT_BUFFER)
        self._reader: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self.conversation: Conversation | None = None
        self.connection: Connection | None = None

    async def __aenter__(self) -> AsyncConnectSession:
        try:
            await self._call.write(self._opening)
            first = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._error_of(exc) from None
        if first is grpc.aio.EOF:
            raise self._error_of(await self._failure())
        self.conversation = convert.conversation(first.opened.conversation)
        self.connection = convert.connection(first.opened.connection)
        self._reader = asyncio.create_task(self._read(), name="convclient-connect")
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _failure(self) -> grpc.aio.AioRpcError:
        try:
            await self._call
        except grpc.aio.AioRpcError as exc:
            return exc
        raise ConvsvcClientError("the Connect stream ended before it opened")

    async def send(self, event: Mapping[str, Any], *, request_id: str | None = None) -> SendResult:
        """Appends a user event; answers once it is durable (a retry with the same
        ``request_id``, even on a new stream, appends it once)."""
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        async with self._send_lock:  # answers come in the order the requests were written
            self._pending.append(future)
            try:
                await self._call.write(send_request(event, request_id))
            except grpc.aio.AioRpcError as exc:
                self._pending.remove(future)
                raise self._error_of(exc) from None
        return await future

    async def events(self) -> AsyncIterator[EventBatch]:
        """The conversation's events (and status updates) as they come, until the stream ends."""
        while (item := await self._events.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def close(self) -> None:
        """Ends the client's side: the server answers the sends in flight, sends the events
        they appended, then ends the stream and disconnects the connection."""
        with contextlib.suppress(grpc.aio.AioRpcError):  # it ended: the reader says why
            await self._call.done_writing()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        assert self.conversation is not None
        failure: BaseException | None = None
        try:
            # read(), not async for: the opening answer was read that way already.
            while (response := await self._call.read()) is not grpc.aio.EOF:
                batch = _take(self.conversation.conversation_id, response, self._pending)
                if batch is not None:
                    await self._events.put(batch)
        except grpc.aio.AioRpcError as exc:
            failure = self._error_of(exc)
        except asyncio.CancelledError:
            failure = ConvsvcClientError("the Connect session was closed")
        finally:
            _fail_pending(self._pending, failure)
            await self._events.put(failure)


class ConnectSession:
    """The blocking counterpart: ``with client.connect(...) as session``."""

    def __init__(
        self,
        start_call: Callable[[Iterator[pb.ConnectRequest]], Any],
        opening: pb.ConnectRequest,
        error_of: ErrorOf,
    ) -> None:
        self._requests: queue.Queue[pb.ConnectRequest | None] = queue.Queue()
        self._requests.put(opening)
        self._call = start_call(iter(self._requests.get, None))
        self._error_of = error_of
        self._pending: collections.deque[concurrent.futures.Future[SendResult]] = (
            collections.deque()
        )
        self._events: queue.Queue[EventBatch | BaseException | None] = queue.Queue(EVENT_BUFFER)
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.conversation: Conversation | None = None
        self.connection: Connection | None = None

    def __enter__(self) -> ConnectSession:
        try:
            first = next(self._call)
        except grpc.RpcError as exc:
            raise self._error_of(exc) from None
        self.conversation = convert.conversation(first.opened.conversation)
        self.connection = convert.connection(first.opened.connection)
        self._reader = threading.Thread(target=self._read, name="convclient-connect", daemon=True)
        self._reader.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._call.cancel()
            if self._reader is not None:
                self._reader.join()

    def send(self, event: Mapping[str, Any], *, request_id: str | None = None) -> SendResult:
        """As AsyncConnectSession.send, blocking."""
        future: concurrent.futures.Future[SendResult] = concurrent.futures.Future()
        with self._send_lock:
            self._pending.append(future)
            self._requests.put(send_request(event, request_id))
        return future.result()

    def events(self) -> Iterator[EventBatch]:
        while (item := self._events.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._requests.put(None)  # ends the request iterator: the client's side is done
        if self._reader is not None:
            self._reader.join()

    def _read(self) -> None:
        assert self.conversation is not None
        failure: BaseException | None = None
        try:
            for response in self._call:
                batch = _take(self.conversation.conversation_id, response, self._pending)
                if batch is not None:
                    self._events.put(batch)
        except grpc.RpcError as exc:
            failure = self._error_of(exc)
        finally:
            _fail_pending(self._pending, failure)
            self._events.put(failure)
