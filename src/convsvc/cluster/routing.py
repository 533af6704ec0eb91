"""Which node answers a call, and forwarding to it.

A call about one conversation is answered by the node that runs it: a node that does not
forwards the request unchanged to the owner (the caller's deadline and request id travel with
it) and relays the answer or the status, so the caller sees one answer, as if it had called
the owner. A forwarded call carries a header that stops it being forwarded again: a node that
receives one but does not own the conversation answers OWNER_MOVED instead.
Reads of stored data (SearchEvents, and the stored part of StreamEvents) never move: every
node reads the shared database. Lists cover the whole cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog

from convsvc import validation
from convsvc.cluster.node import ClusterNode, owner_moved
from convsvc.cluster.watch import RESUME_ONLY
from convsvc.domain import ConversationStatus
from convsvc.engine import ConversationEngine
from convsvc.engine.queries import agent_state_filter
from convsvc.errors import ConvsvcError, Unavailable
from convsvc.metrics import Metrics
from convsvc.paging import decode_token, encode_token
from convsvc.storage.postgres import Owner, PostgresStore
from convsvc.storage.postgres_directory import PostgresDirectory
from convsvc.transport.access import FORWARDED
from convsvc.transport.convert import connection_to_pb, conversation_to_pb
from convsvc.transport.status import RelayedStatus
from convsvc.v1 import conversation_service_pb2 as pb

log = structlog.get_logger(__name__)

EVICT = "x-convsvc-evict"
"""On a forwarded CloseConversation: the close makes room under the per-user limit."""
FOLLOW = "x-convsvc-follow"
"""On a StreamEvents between nodes: live events of a loop the callee runs, or OWNER_MOVED."""
OWNER = "x-convsvc-owner"
"""In the header of an answer this node forwarded: the owner's address, where a client that
routes (convclient does) sends the conversation's next calls itself."""

_BY_CONVERSATION = {
    "StartConversation",
    "JoinConversation",
    "CloseConversation",
    "GetConversation",
    "CompleteWithAgentLlm",
    "ControlAgent",
    "ConfirmAction",
    "UpdateConversation",
}


_STARTS = {"StartConversation", "JoinConversation"}
T = TypeVar("T")


def _identity(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class _Cursor:
    user: str | None
    wanted: list[str]
    size: int
    after: str
    query: list[Any]
    key: bytes

    def page(self, found: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], str]:
        """The page of ``found`` (asked for one more than a page) and the next page's token."""
        page = list(found[: self.size])
        more = len(found) > self.size
        return page, encode_token(self.key, self.query, key(page[-1])) if more else ""


def header(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return str(item.value)
    return None


def relayed_failure(
    exc: grpc.aio.AioRpcError, request: Any, owner: Owner
) -> ConvsvcError | RelayedStatus:
    """What the caller of a forwarded call is told when it failed: which node failed and
    what that means for the caller, never another node's trouble as if it were this
    node's (its database is fine, and so is it)."""
    assert owner.address is not None
    cid = str(getattr(request, "conversation_id", "") or "")
    where = {"owner_address": owner.address, "owner_node": owner.node_id or ""}
    if cid:
        where["conversation_id"] = cid
    trailing = tuple(exc.trailing_metadata() or ())
    relayed = RelayedStatus(exc.code(), exc.details() or "", trailing)
    info = relayed.error_info()
    if exc.code() == grpc.StatusCode.UNAVAILABLE and info is None:
        # No answer from the owner: down, stopped, or cut off from this node. The
        # peer channel's keepalive notices within about two seconds, and from then on
        # calls fail at once rather than waiting out their deadlines.
        return Unavailable(
            f"the node running this conversation ({owner.address}) does not answer "
            "this node; a write may or may not have been made there: retry with the "
            "same request_id. Another node takes the conversation over at once if "
            "the owner crashed, or when its lease runs out if it stays silent",
            reason="OWNER_UNREACHABLE",
            metadata=where,
        )
    if exc.code() == grpc.StatusCode.UNAVAILABLE and info is not None:
        if info.reason == "OWNER_MOVED":
            return relayed  # addressed to this caller already: where to go next
        return Unavailable(
            f"the node running this conversation ({owner.address}) cannot serve it: "
            f"{exc.details()} [{info.reason}]. That is the owner's trouble, not the "
            "node you called, which forwarded the call; retry with the same request_id: "
            "if the owner stays unable, another node takes the conversation over when "
            "its lease runs out",
            reason="OWNER_UNAVAILABLE",
            metadata={**where, "owner_reason": info.reason},
        )
    return relayed.naming(where)


class Router:
    """Routes ConversationService calls within the cluster."""

    def __init__(
        self,
        node: ClusterNode,
        store: PostgresStore,
        directory: PostgresDirectory,
        engine: ConversationEngine,
        *,
        auth_token: str | None,
        max_message_bytes: int,
        metrics: Metrics,
        keepalive_seconds: float = 1.0,
    ) -> None:
        self._node = node
        self._store = store
        self._directory = directory
        self._forwards = metrics.cluster_forwards
        self._engine = engine
        self._auth = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        keepalive_ms = max(1, int(keepalive_seconds * 1000))
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A peer that stops answering (cut off, stopped, its host gone) would otherwise
            # hold every forwarded call until its deadline: pings find out within two
            # intervals, connects give up within one, and calls then fail at once.
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.min_reconnect_backoff_ms", keepalive_ms),
            ("grpc.initial_reconnect_backoff_ms", min(keepalive_ms, 200)),
            ("grpc.max_reconnect_backoff_ms", 2 * keepalive_ms),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """One channel per peer, kept for the node's life."""
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        """What this node's own calls to a peer carry: the service token."""
        return (*self._auth, (FORWARDED, self._node.node_id), *extra)

    def caller_metadata(self, context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
        """What a forwarded call carries: its caller's own credentials, so the owner checks
        them again (a scoped token's scope, its revocation) as if it had been called."""
        presented = [
            (str(item.key), str(item.value))
            for item in context.invocation_metadata() or ()
            if item.key == "authorization"
        ]
        return (*presented, (FORWARDED, self._node.node_id)) if presented else self.metadata()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # -- where a call goes -----------------------------------------------------------------

    async def destination(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Owner | None:
        """The live node a call must go to, or None to answer it here."""
        cid = await self._conversation_of(method, request)
        if cid and self._engine.queries.runs_here(cid):
            return None
        owner = await self._store.owner_of(cid) if cid else None
        if owner is None:
            if method in _STARTS and header(context, FORWARDED) is None:
                # Not running: it starts here, unless its agent runs on workers that only
                # another node has room for.
                agent = getattr(request, "agent", "") or self._engine.queries.default_agent
                return await self._node.placement(agent)
            return None
        if not owner.alive or owner.node_id in (None, self._node.node_id):
            # Running by intent, but nobody runs its loop: its owner is gone, handed it
            # over, or is this node, which lost it when the database went away. Take it
            # over now rather than at the next scan (where its workers have room).
            return await self._node.adopt(
                cid, may_place_elsewhere=header(context, FORWARDED) is None
            )
        if header(context, FORWARDED) is not None:
            raise owner_moved(cid, owner)  # the caller's idea of the owner was stale
        return owner

    async def moved_to(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Owner | None:
        """After a local call found its conversation gone from this node: the live node
        that runs it now, if another does (a forwarded call raises OWNER_MOVED with its
        address instead: it is not forwarded twice)."""
        cid = await self._conversation_of(method, request)
        if not cid or self._engine.queries.runs_here(cid):
            return None
        owner = await self._store.owner_of(cid)
        if owner is None or not owner.alive or owner.node_id in (None, self._node.node_id):
            return None
        if header(context, FORWARDED) is not None:
            raise owner_moved(cid, owner)
        return owner

    async def _conversation_of(self, method: str, request: Any) -> str:
        if method in _BY_CONVERSATION:
            return str(request.conversation_id)
        if method == "SendEvent":
            if request.conversation_id:
                return str(request.conversation_id)
            return await self._conversation_of_connection(request.connection_id)
        if method == "DisconnectConnection":
            return await self._conversation_of_connection(request.connection_id)
        return ""

    async def _conversation_of_connection(self, connection_id: str) -> str:
        if not connection_id or self._engine.queries.local_connection(connection_id) is not None:
            return ""
        connection = await self._directory.find_connection(connection_id)
        return connection.conversation_id if connection is not None else ""

    async def forward(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, owner: Owner
    ) -> bytes:
        """Sends the call to its owner and returns the owner's answer, or raises the owner's
        status (its ErrorInfo included) as RelayedStatus."""
        assert owner.address is not None
        call = self.channel(owner.address).unary_unary(
            f"/{pb.DESCRIPTOR.services_by_name['ConversationService'].full_name}/{method}",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        remaining = context.time_remaining()
        try:
            response: bytes = await call(
                request.SerializeToString(),
                metadata=self.caller_metadata(context),
                timeout=remaining if remaining is not None else 30.0,
            )
            self._forwards.labels(method, "OK").inc()
            return response
        except grpc.aio.AioRpcError as exc:
            self._forwards.labels(method, exc.code().name).inc()
            raise relayed_failure(exc, request, owner) from None

    async def watch_peer(
        self, address: str, request: pb.WatchConversationsRequest, resume_only: bool
    ) -> AsyncIterator[pb.WatchConversationsResponse]:
        """A peer's node-local watch (see cluster.watch)."""
        call = self.channel(address).unary_stream(
            f"/{pb.DESCRIPTOR.services_by_name['ConversationService'].full_name}"
            "/WatchConversations",
            request_serializer=pb.WatchConversationsRequest.SerializeToString,
            response_deserializer=pb.WatchConversationsResponse.FromString,
        )
        extra = ((RESUME_ONLY, "1"),) if resume_only else ()
        stream = call(request, metadata=self.metadata(*extra))
        try:
            async for response in stream:
                yield response
        finally:
            stream.cancel()

    async def evict_remote(self, conversation_id: str, owner: Owner) -> None:
        """Asks a conversation's owner to stop it to make room under the per-user limit."""
        assert owner.address is not None
        stub = self.channel(owner.address).unary_unary(
            f"/{pb.DESCRIPTOR.services_by_name['ConversationService'].full_name}/CloseConversation",
            request_serializer=pb.CloseConversationRequest.SerializeToString,
            response_deserializer=pb.CloseConversationResponse.FromString,
        )
        try:
            await stub(
                pb.CloseConversationRequest(conversation_id=conversation_id),
                metadata=self.metadata((EVICT, "1")),
                timeout=30.0,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"could not stop conversation {conversation_id} on {owner.address} to make "
                f"room under the per-user limit ({exc.code().name}); retry",
                reason="OWNER_UNREACHABLE",
                metadata={"owner_address": owner.address},
            ) from None

    # -- cluster-wide answers ------------------------------------------------------------------

    async def list_conversations(
        self, request: pb.ListConversationsRequest
    ) -> pb.ListConversationsResponse:
        """Running conversations on every node, by id; each live view from its owner. With
        an agent state filter (the state lives on the owner) it reads on until the page is
        full or every running conversation was seen."""
        states = agent_state_filter(request.agent_states)
        cursor = self._cursor("conversations", request, sorted(states))
        if not states:
            running = await self._store.running_for(
                cursor.user, cursor.after, cursor.size + 1, cursor.wanted
            )
            page, token = cursor.page(running, lambda item: item[0])
            return pb.ListConversationsResponse(
                conversations=await self._views(page, request.user_id), next_page_token=token
            )
        views: list[pb.Conversation] = []
        after = cursor.after
        while True:
            running = await self._store.running_for(
                cursor.user, after, cursor.size + 1, cursor.wanted
            )
            chunk = running[: cursor.size]
            for view in await self._views(chunk, request.user_id):
                if not states or view.agent_state in states:
                    views.append(view)
            if len(running) <= cursor.size:  # nothing after this chunk
                views = views[: cursor.size + 1]
                break
            after = chunk[-1][0]
            if len(views) > cursor.size:
                break
        matching, token = cursor.page(views, lambda view: view.conversation_id)
        return pb.ListConversationsResponse(conversations=matching, next_page_token=token)

    def _cursor(self, kind: str, request: Any, filters: list[str] | None = None) -> _Cursor:
        """Where a list request's page starts, checked as on a single node."""
        user = validation.check_user_id(request.user_id)
        wanted = sorted(
            {validation.check_id("conversation_ids", c) for c in request.conversation_ids}
        )
        query: list[Any] = [kind, user, wanted]
        if filters:
            query.append(filters)
        key = self._store.page_token_key
        after = decode_token(key, request.page_token, query, str) if request.page_token else ""
        return _Cursor(
            user, wanted, self._engine.queries.page_size(request.page_size), after, query, key
        )

    async def _views(
        self, page: Sequence[tuple[str, Owner]], user_id: str
    ) -> list[pb.Conversation]:
        by_owner: dict[str, list[str]] = {}
        here: list[str] = []
        for cid, owner in page:
            if owner.node_id == self._node.node_id or not owner.alive or not owner.address:
                here.append(cid)
            else:
                by_owner.setdefault(owner.address, []).append(cid)
        found: dict[str, pb.Conversation] = {}
        for cid in here:
            try:
                view = await self._engine.queries.get_conversation(cid, user_id)
            except ConvsvcError:
                continue
            if view.status is ConversationStatus.STOPPED:
                # Running by intent, its loop is being moved to a live node.
                view.status = ConversationStatus.STARTING
            found[cid] = conversation_to_pb(view)
        for address, cids in by_owner.items():
            found.update(await self._remote_views(address, cids, user_id))
        return [found[cid] for cid, _ in page if cid in found]

    async def _remote_views(
        self, address: str, cids: list[str], user_id: str
    ) -> dict[str, pb.Conversation]:
        call = self.channel(address).unary_unary(
            f"/{pb.DESCRIPTOR.services_by_name['ConversationService'].full_name}/ListConversations",
            request_serializer=pb.ListConversationsRequest.SerializeToString,
            response_deserializer=pb.ListConversationsResponse.FromString,
        )
        try:
            response = await call(
                pb.ListConversationsRequest(
                    user_id=user_id, conversation_ids=cids, page_size=len(cids)
                ),
                metadata=self.metadata(),
                timeout=10.0,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cluster.list_peer_failed", address=address, code=exc.code().name)
            return {}
        return {c.conversation_id: c for c in response.conversations}

    async def list_connections(
        self, request: pb.ListConnectionsRequest
    ) -> pb.ListConnectionsResponse:
        """Connections on every node, from the shared directory."""
        cursor = self._cursor("connections", request)
        found = await self._directory.list_connections(
            cursor.user, cursor.after, cursor.size + 1, cursor.wanted
        )
        page, token = cursor.page(found, lambda connection: connection.connection_id)
        connections = [connection_to_pb(c) for c in page]
        if request.user_id:
            for connection in connections:
                connection.client_instance_id = ""  # as on one node: not a user's business
        return pb.ListConnectionsResponse(connections=connections, next_page_token=token)

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """Keeps an instance's connections alive on every node."""
        _, ttl = self._engine.queries.heartbeat(request.client_instance_id)
        count = await self._directory.touch_instance(request.client_instance_id)
        return pb.HeartbeatResponse(connection_count=count, ttl_seconds=ttl)
