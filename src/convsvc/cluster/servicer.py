"""ConversationService on a node of a cluster: each call answered where its conversation runs.

The same methods as on a single node (``transport.servicer``); calls about one conversation
are first routed (``routing``), lists and heartbeats cover the cluster, and streams follow the
owner's live events (``follow``). A call another node forwarded is answered here, as a single
node would, and never forwarded again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from convsvc import validation
from convsvc.cluster.follow import Followers
from convsvc.cluster.routing import EVICT, FOLLOW, OWNER, Router, header
from convsvc.cluster.watch import RESUME_ONLY, ClusterWatch
from convsvc.engine import ConversationEngine
from convsvc.engine.subscriptions import StreamItem
from convsvc.errors import FailedPrecondition, Unavailable
from convsvc.transport.access import FORWARDED
from convsvc.transport.convert import conversation_to_pb
from convsvc.transport.servicer import Context, ConversationServicer
from convsvc.v1 import conversation_service_pb2 as pb

Local = Callable[[Any, Context], Awaitable[Any]]
_MOVED = frozenset({"OWNER_MOVED", "CONVERSATION_NOT_RUNNING"})
"""What a local call answers when its conversation left this node while it waited."""


class ClusteredServicer(ConversationServicer):
    def __init__(
        self,
        engine: ConversationEngine,
        router: Router,
        followers: Followers,
        watch: ClusterWatch,
    ) -> None:
        super().__init__(engine)
        self._router = router
        self._followers = followers
        self._watch = watch

    async def _routed(self, method: str, request: Any, context: Context, local: Local) -> Any:
        owner = await self._router.destination(method, request, context)
        if owner is None:
            try:
                return await local(request, context)
            except (Unavailable, FailedPrecondition) as exc:
                # The conversation moved while the call waited here: another node claimed
                # it first (two joins racing through two nodes), or this node was fenced
                # off and dropped its loop (a send queued behind the fenced append). Nothing
                # was done here: the caller gets the new owner's answer.
                if exc.reason not in _MOVED:
                    raise
                owner = await self._router.moved_to(method, request, context)
                if owner is None:
                    raise
        answer = await self._router.forward(method, request, context, owner)
        if owner.address:
            await context.send_initial_metadata(((OWNER, owner.address),))
        return answer

    async def StartConversation(self, request: Any, context: Context) -> Any:
        return await self._routed("StartConversation", request, context, super().StartConversation)

    async def JoinConversation(self, request: Any, context: Context) -> Any:
        return await self._routed("JoinConversation", request, context, super().JoinConversation)

    async def SendEvent(self, request: Any, context: Context) -> Any:
        return await self._routed("SendEvent", request, context, super().SendEvent)

    async def ControlAgent(self, request: Any, context: Context) -> Any:
        return await self._routed("ControlAgent", request, context, super().ControlAgent)

    async def UpdateConversation(self, request: Any, context: Context) -> Any:
        return await self._routed(
            "UpdateConversation", request, context, super().UpdateConversation
        )

    async def ConfirmAction(self, request: Any, context: Context) -> Any:
        return await self._routed("ConfirmAction", request, context, super().ConfirmAction)

    async def DisconnectConnection(self, request: Any, context: Context) -> Any:
        return await self._routed(
            "DisconnectConnection", request, context, super().DisconnectConnection
        )

    async def CloseConversation(self, request: Any, context: Context) -> Any:
        if header(context, EVICT) is not None and header(context, FORWARDED) is not None:
            # Another node's start needs the room under the user's limit.
            await self._engine.evict(
                validation.check_id("conversation_id", request.conversation_id)
            )
            view = await self._engine.queries.get_conversation(request.conversation_id)
            return pb.CloseConversationResponse(conversation=conversation_to_pb(view))
        return await self._routed("CloseConversation", request, context, super().CloseConversation)

    async def GetConversation(self, request: Any, context: Context) -> Any:
        return await self._routed("GetConversation", request, context, super().GetConversation)

    async def CompleteWithAgentLlm(self, request: Any, context: Context) -> Any:
        return await self._routed(
            "CompleteWithAgentLlm", request, context, super().CompleteWithAgentLlm
        )

    async def ListConversations(self, request: Any, context: Context) -> Any:
        if header(context, FORWARDED) is not None:
            return await super().ListConversations(request, context)
        return await self._router.list_conversations(request)

    async def ListConnections(self, request: Any, context: Context) -> Any:
        if header(context, FORWARDED) is not None:
            return await super().ListConnections(request, context)
        return await self._router.list_connections(request)

    async def Heartbeat(self, request: Any, context: Context) -> Any:
        return await self._router.heartbeat(request)

    async def stream_items(self, request: Any, context: Context) -> AsyncIterator[list[StreamItem]]:
        if header(context, FOLLOW) is not None:
            stream = self._engine.history.stream_events(
                conversation_id=request.conversation_id,
                user_id=request.user_id,
                start_id=request.start_id,
                max_batch=request.max_batch_size,
                owner_only=True,
            )
            async for items in stream:
                yield items
            return
        cid = validation.check_id("conversation_id", request.conversation_id)
        async with self._followers.following(cid):
            async for items in super().stream_items(request, context):
                yield items

    async def WatchConversations(self, request: Any, context: Context) -> AsyncIterator[Any]:
        if header(context, FORWARDED) is not None:  # a peer's cluster watch: this node's part
            responses = self._watch.local(request, header(context, RESUME_ONLY) is not None)
        else:
            responses = self._watch.watch(request)
        async for response in responses:
            yield response
