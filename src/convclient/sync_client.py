"""The blocking client, for code that cannot await (OpenHands' event stores are iterated
synchronously). Same calls, deadlines, retries and errors as the async client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from convclient import channel as channels
from convclient import requests
from convclient.config import ClientSettings
from convclient.connect import ConnectSession, open_request
from convclient.errors import ConvsvcClientError, from_rpc_error
from convclient.models import Event, WatchUpdate
from convclient.reconnect import RESUMABLE, Reconnects
from convclient.routing import Node, Owners
from convclient.watch import WatchReader
from convsvc.v1 import conversation_service_pb2_grpc as pb_grpc

P = ParamSpec("P")
R = TypeVar("R")


def _unary(
    prepare: Callable[P, requests.Prepared[R]],
) -> Callable[Concatenate[ConvsvcClient, P], R]:
    def call(self: ConvsvcClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._invoke(prepare(*args, **kwargs))

    call.__doc__ = prepare.__doc__
    call.__name__ = prepare.__name__
    return call


class ConvsvcClient:
    """Talks to convsvc from blocking code. Use ``with`` or call :meth:`close`."""

    def __init__(self, settings: ClientSettings | None = None, **overrides: Any) -> None:
        if settings is None:
            settings = ClientSettings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        self.settings = settings
        self._metadata = channels.call_metadata(settings)
        self._channel = channels.blocking_channel(settings, settings.address)
        self._stub = pb_grpc.ConversationServiceStub(channels.traced(self._channel, settings))
        self._owners = Owners() if settings.route_to_owner else None
        self._nodes: dict[str, Node[pb_grpc.ConversationServiceStub]] = {}
        """A channel per node of a cluster that owns conversations this client calls."""
        self._nodes_lock = threading.Lock()

    def __enter__(self) -> ConvsvcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._nodes_lock:
            nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            node.channel.close()
        self._channel.close()

    def _node_for(self, conversation_id: str) -> Node[pb_grpc.ConversationServiceStub] | None:
        """As AsyncConvsvcClient._node_for."""
        if self._owners is None:
            return None
        address = self._owners.owner(conversation_id)
        if not address or address == self.settings.address:
            return None
        with self._nodes_lock:
            node = self._nodes.get(address)
            if node is None:
                channel = channels.blocking_channel(self.settings, address, retries=False)
                stub = pb_grpc.ConversationServiceStub(channels.traced(channel, self.settings))
                node = self._nodes[address] = Node(address, channel, stub)
        return node

    def _stub_for(self, conversation_id: str) -> pb_grpc.ConversationServiceStub | None:
        node = self._node_for(conversation_id)
        return node.stub if node is not None else None

    def _invoke(self, prepared: requests.Prepared[R]) -> R:
        """As AsyncConvsvcClient._invoke: at the conversation's node when known."""
        owners, name, request = self._owners, prepared.method, prepared.request
        cid = owners.conversation_of(name, request) if owners is not None else ""
        deadline = time.monotonic() + self.settings.timeout_seconds
        node = self._node_for(cid)
        if owners is not None and node is not None:
            try:
                response, call = getattr(node.stub, name).with_call(
                    request, timeout=self.settings.timeout_seconds, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                if not owners.failed_at_owner(name, cid, exc):
                    raise self._error(exc, node.address) from None
            else:
                owners.learn_header(cid, call.initial_metadata())
                owners.learn(name, request, response)
                return prepared.read(response)
        try:
            response, call = getattr(self._stub, name).with_call(
                request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        if owners is not None:
            owners.learn_header(cid, call.initial_metadata())
            owners.learn(name, request, response)
        return prepared.read(response)

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

    def watch_conversations(
        self,
        *,
        user_id: str = "",
        conversation_ids: Iterable[str] = (),
        resume_token: str = "",
        on_interrupted: Callable[[], None] | None = None,
    ) -> Iterator[WatchUpdate]:
        """As AsyncConvsvcClient.watch_conversations, blocking: a snapshot, then changes,
        resumed across reconnects; never ends by itself (close the generator to stop)."""
        wanted = list(conversation_ids)
        reader = WatchReader(resume_token)
        reconnects = Reconnects(
            "the conversation watch", self.settings.address, self.settings.stream_reconnect_seconds
        )
        while True:
            call = self._stub.WatchConversations(
                reader.request(user_id, wanted), metadata=self._metadata
            )
            failure: grpc.RpcError | None = None
            try:
                for response in call:
                    reconnects.succeeded()
                    if (update := reader.read(response)) is not None:
                        yield update
            except grpc.RpcError as exc:
                error = self._error(exc)
                if exc.code() not in RESUMABLE:  # type: ignore[attr-defined]
                    raise error from None
                reader.failed(exc, error.metadata)
                failure = exc
            finally:
                call.cancel()
            if on_interrupted is not None:
                on_interrupted()
            reconnects.wait_blocking(failure)

    def connect(
        self,
        conversation_id: str,
        *,
        connection_id: str = "",
        user_id: str = "",
        settings: Mapping[str, Any] | None = None,
        start_id: int | None = None,
        max_batch_size: int = 0,
    ) -> ConnectSession:
        """As AsyncConvsvcClient.connect, blocking: ``with client.connect("c1") as session``."""
        opening = open_request(
            conversation_id,
            connection_id=connection_id,
            user_id=user_id,
            settings=settings,
            start_id=start_id,
            max_batch_size=max_batch_size,
        )
        stub = self._stub_for(conversation_id) or self._stub
        return ConnectSession(
            lambda requests: stub.Connect(requests, metadata=self._metadata),
            opening,
            self._error,
        )

    def _error(self, exc: grpc.RpcError, address: str = "") -> ConvsvcClientError:
        return from_rpc_error(
            exc, address=address or self.settings.address, timeout=self.settings.timeout_seconds
        )

    def iter_events(
        self,
        conversation_id: str,
        *,
        user_id: str = "",
        start_id: int = 0,
        end_id: int | None = None,
        reverse: bool = False,
        limit: int | None = None,
        page_size: int = 0,
    ) -> Iterator[Event]:
        """Stored events in the id range (inclusive), page after page, at most ``limit``."""
        token = ""
        returned = 0
        while limit is None or returned < limit:
            page = self.search_events(
                conversation_id,
                user_id=user_id,
                start_id=start_id,
                end_id=end_id,
                reverse=reverse,
                page_size=page_size,
                page_token=token,
            )
            for item in page.items[: None if limit is None else limit - returned]:
                returned += 1
                yield item
            if not (token := page.next_page_token):
                return

    def all_conversation_ids(
        self, *, user_id: str = "", conversation_ids: Iterable[str] = ()
    ) -> list[str]:
        """Ids of every running conversation matching the filters."""
        wanted = list(conversation_ids)
        found: list[str] = []
        token = ""
        while True:
            page = self.list_conversations(
                user_id=user_id, conversation_ids=wanted, page_token=token
            )
            found.extend(c.conversation_id for c in page.items)
            if not (token := page.next_page_token):
                return found
