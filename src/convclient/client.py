"""The async client: every ConversationService call with a deadline, typed answers and typed
errors, plus event tails that survive a service restart."""

from __future__ import annotations

import asyncio
import functools
import time
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
from convclient.routing import Node, Owners
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
        self._channel = channels.aio_channel(settings, settings.address)
        self._stub = pb_grpc.ConversationServiceStub(self._channel)
        self._owners = Owners() if settings.route_to_owner else None
        self._nodes: dict[str, Node[pb_grpc.ConversationServiceStub]] = {}
        """A channel per node of a cluster that owns conversations this client calls."""

    async def __aenter__(self) -> AsyncConvsvcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            await node.channel.close()
        await self._channel.close()

    def _node_for(self, conversation_id: str) -> Node[pb_grpc.ConversationServiceStub] | None:
        """The node that runs the conversation, when known and not the configured address
        (None: call the configured address)."""
        if self._owners is None:
            return None
        address = self._owners.owner(conversation_id)
        if not address or address == self.settings.address:
            return None
        node = self._nodes.get(address)
        if node is None:
            channel = channels.aio_channel(self.settings, address, retries=False)
            stub = pb_grpc.ConversationServiceStub(channel)
            node = self._nodes[address] = Node(address, channel, stub)
        return node

    def _stub_for(self, conversation_id: str) -> pb_grpc.ConversationServiceStub | None:
        node = self._node_for(conversation_id)
        return node.stub if node is not None else None

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
        owners, name, request = self._owners, prepared.method, prepared.request
        cid = owners.conversation_of(name, request) if owners is not None else ""
        deadline = time.monotonic() + self.settings.timeout_seconds
        node = self._node_for(cid)
        if owners is not None and node is not None:
            call = getattr(node.stub, name)(
                request, timeout=self.settings.timeout_seconds, metadata=self._metadata
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                if not owners.failed_at_owner(name, cid, exc):
                    raise self._error(exc, node.address) from None
            else:
                # A node that lost the conversation forwards the call and names the new owner.
                owners.learn_header(cid, await call.initial_metadata())
                owners.learn(name, request, response)
                return prepared.read(response)
        call = getattr(self._stub, name)(
            request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
        )
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        if owners is not None:
            owners.learn_header(cid, await call.initial_metadata())
            owners.learn(name, request, response)
        return prepared.read(response)

    def _error(self, exc: grpc.RpcError, address: str = "") -> ConvsvcClientError:
        return from_rpc_error(
            exc, address=address or self.settings.address, timeout=self.settings.timeout_seconds
        )

    start_conversation = _unary(requests.start_conversation)
    join_conversation = _unary(requests.join_conversation)
    send_event = _unary(requests.send_event)
    control_agent = _unary(requests.control_agent)
    pause_agent = _unary(requests.pause_agent)
    resume_agent = _unary(requests.resume_agent)
    interrupt_agent = _unary(requests.interrupt_agent)
    confirm_action = _unary(requests.confirm_action)
    approve_action = _unary(requests.approve_action)
    reject_action = _unary(requests.reject_action)
    search_conversations = _unary(requests.search_conversations)
    update_conversation = _unary(requests.update_conversation)
    fork_conversation = _unary(requests.fork_conversation)
    create_webhook = _unary(requests.create_webhook)
    list_webhooks = _unary(requests.list_webhooks)
    delete_webhook = _unary(requests.delete_webhook)
    list_webhook_deliveries = _unary(requests.list_webhook_deliveries)
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
            # Live events start at the node that runs the loop: tail them there.
            node = self._stub_for(conversation_id)
            call = (node or self._stub).StreamEvents(
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
                gone = exc.code() == grpc.StatusCode.UNAVAILABLE
                if node is not None and gone and self._owners is not None:
                    self._owners.forget(conversation_id)  # resume through the configured address
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
            (self._stub_for(conversation_id) or self._stub).Connect(metadata=self._metadata),
            opening,
            self._error,
        )
