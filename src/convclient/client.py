"""The async client: every ConversationService call with a deadline, typed answers and typed
errors, plus event tails that survive a service restart."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from convclient import channel as channels
from convclient import convert, requests
from convclient.config import ClientSettings
from convclient.connect import AsyncConnectSession, open_request
from convclient.errors import ConvsvcClientError, ServiceUnavailableError, from_rpc_error
from convclient.models import Connection, Conversation, Event, EventBatch, Page, WatchUpdate
from convclient.reconnect import RESUMABLE, Reconnects
from convclient.watch import WatchReader
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _unary(
    prepare: Callable[P, requests.Prepared[R]],
) -> Callable[Concatenate[AsyncConvsvcClient, P], Awaitable[R]]:
    async def call(self: AsyncConvsvcClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._invoke(prepare(*args, **kwargs))

    call.__doc__ = prepare.__doc__
    call.__name__ = prepare.__name__
    return call


async def _every_item(list_page: Callable[..., Awaitable[Page[T]]]) -> AsyncIterator[T]:
    """The items of every page a paginated call returns."""
    token = ""
    while True:
        page = await list_page(page_token=token)
        for item in page.items:
            yield item
        if not (token := page.next_page_token):
            return


class AsyncConvsvcClient:
    """Talks to convsvc from asyncio code. Use ``async with`` or call :meth:`close`.

    Settings come from ``CONVSVC_*`` environment variables; keyword arguments override them,
    e.g. ``AsyncConvsvcClient(address="10.0.0.5:50051")``.
    """

    def __init__(self, settings: ClientSettings | None = None, **overrides: Any) -> None:
        if settings is None:
            settings = ClientSettings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        self.settings = settings
        self._metadata = channels.call_metadata(settings)
        credentials = channels.credentials(settings)
        options = channels.channel_options(settings)
        interceptors = channels.aio_interceptors(settings)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(
                settings.address, options=options, interceptors=interceptors
            )
        else:
            self._channel = grpc.aio.secure_channel(
                settings.address, credentials, options, interceptors=interceptors
            )
        self._stub = pb_grpc.ConversationServiceStub(self._channel)

    async def __aenter__(self) -> AsyncConvsvcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Waits until the channel is connected (for example after the service restarted,
        rather than spending calls' retries on a channel still backing off)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise ServiceUnavailableError(
                f"convsvc at {self.settings.address} did not become reachable within {timeout:g} s",
                code=grpc.StatusCode.UNAVAILABLE,
            ) from None

    async def _invoke(self, prepared: requests.Prepared[R]) -> R:
        method = getattr(self._stub, prepared.method)
        try:
            response = await method(
                prepared.request, timeout=self.settings.timeout_seconds, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return prepared.read(response)

    def _error(self, exc: grpc.RpcError) -> ConvsvcClientError:
        return from_rpc_error(
            exc, address=self.settings.address, timeout=self.settings.timeout_seconds
        )

    start_conversation = _unary(requests.start_conversation)
    join_conversation = _unary(requests.join_conversation)
    send_event = _unary(requests.send_event)
    disconnect = _unary(requests.disconnect)
    close_conversation = _unary(requests.close_conversation)
    get_conversation = _unary(requests.get_conversation)
    list_conversations = _unary(requests.list_conversations)
    list_connections = _unary(requests.list_connections)
    search_events = _unary(requests.search_events)
    heartbeat = _unary(requests.heartbeat)
    complete_with_agent_llm = _unary(requests.complete_with_agent_llm)
    mint_token = _unary(requests.mint_token)
    revoke_token = _unary(requests.revoke_token)
    list_audit_entries = _unary(requests.list_audit_entries)

    def iter_conversations(
        self, *, user_id: str = "", conversation_ids: Iterable[str] = (), page_size: int = 0
    ) -> AsyncIterator[Conversation]:
        """Every running conversation matching the filters, page after page."""
        return _every_item(
            functools.partial(
                self.list_conversations,
                user_id=user_id,
                conversation_ids=list(conversation_ids),
                page_size=page_size,
            )
        )

    def iter_connections(
        self, *, user_id: str = "", conversation_ids: Iterable[str] = (), page_size: int = 0
    ) -> AsyncIterator[Connection]:
        """Every connection matching the filters, page after page."""
        return _every_item(
            functools.partial(
                self.list_connections,
                user_id=user_id,
                conversation_ids=list(conversation_ids),
                page_size=page_size,
            )
        )

    async def iter_events(
        self,
        conversation_id: str,
        *,
        user_id: str = "",
        start_id: int = 0,
        end_id: int | None = None,
        reverse: bool = False,
        limit: int | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[Event]:
        """Stored events in the id range (inclusive), page after page, at most ``limit``."""
        pages = _every_item(
            functools.partial(
                self.search_events,
                conversation_id,
                user_id=user_id,
                start_id=start_id,
                end_id=end_id,
                reverse=reverse,
                page_size=page_size,
            )
        )
        if limit is not None and limit <= 0:
            return
        returned = 0
        async for event in pages:
            yield event
            returned += 1
            if returned == limit:
                return  # before asking for another page

    async def tail_events(
        self,
        conversation_id: str,
        *,
        user_id: str = "",
        start_id: int = 0,
        max_batch_size: int = 0,
    ) -> AsyncIterator[EventBatch]:
        """Every event from ``start_id`` on, stored then live, in batches; never ends by itself.

        When the service restarts, drops the stream or becomes unreachable, the tail reconnects
        and resumes after the last id it yielded: no event is skipped or yielded twice. It gives
        up with ServiceUnavailableError after ``stream_reconnect_seconds`` without success.
        """
        next_id = start_id
        reconnects = Reconnects(
            f"the event stream of {conversation_id}",
            self.settings.address,
            self.settings.stream_reconnect_seconds,
        )
        while True:
            call = self._stub.StreamEvents(
                requests.stream_events(
                    conversation_id,
                    user_id=user_id,
                    start_id=next_id,
                    max_batch_size=max_batch_size,
                ),
                metadata=self._metadata,
            )
            failure: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    reconnects.succeeded()
                    batch = convert.event_batch(response)
                    fresh = [event for event in batch.events if event.id >= next_id]
                    if fresh:
                        next_id = fresh[-1].id + 1
                    if fresh or batch.status_update is not None:
                        yield EventBatch(events=fresh, status_update=batch.status_update)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RESUMABLE:
                    raise self._error(exc) from None
                failure = exc
            finally:
                call.cancel()
            await reconnects.wait(failure)

    async def watch_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Iterable[str] = (),
        resume_token: str = "",
        on_interrupted: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchUpdate]:
        """A snapshot of the queued, starting and running conversations that match, then
        their changes; never ends by itself.

        Like ``tail_events`` it reconnects when the stream breaks and resumes after the last
        update yielded. When the service cannot resume (it restarted) it yields a new
        snapshot: an update with ``snapshot`` set always replaces what the caller knew.
        ``on_interrupted`` is called when the stream breaks, before reconnecting (what the
        caller knew may then be stale until the next update).
        """
        wanted = list(conversation_ids)
        reader = WatchReader(resume_token)
        reconnects = Reconnects(
            "the conversation watch", self.settings.address, self.settings.stream_reconnect_seconds
        )
        while True:
            call = self._stub.WatchConversations(
                reader.request(user_id, wanted), metadata=self._metadata
            )
            failure: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    reconnects.succeeded()
                    if (update := reader.read(response)) is not None:
                        yield update
            except grpc.aio.AioRpcError as exc:
                error = self._error(exc)
                if exc.code() not in RESUMABLE:
                    raise error from None
                reader.failed(exc, error.metadata)
                failure = exc
            finally:
                call.cancel()
            if on_interrupted is not None:
                on_interrupted()
            await reconnects.wait(failure)

    def connect(
        self,
        conversation_id: str,
        *,
        connection_id: str = "",
        user_id: str = "",
        settings: Mapping[str, Any] | None = None,
        start_id: int | None = None,
        max_batch_size: int = 0,
    ) -> AsyncConnectSession:
        """One stream for one connection: ``async with client.connect("c1") as session``,
        then ``await session.send(event)`` and ``async for batch in session.events()``.
        ``start_id``: the first event id to receive (only new events when None)."""
        opening = open_request(
            conversation_id,
            connection_id=connection_id,
            user_id=user_id,
            settings=settings,
            start_id=start_id,
            max_batch_size=max_batch_size,
        )
        return AsyncConnectSession(
            self._stub.Connect(metadata=self._metadata), opening, self._error
        )
