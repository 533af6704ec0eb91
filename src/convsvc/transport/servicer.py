"""ConversationService over gRPC: unpacks requests, calls the engine, packs responses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeAlias

import grpc

from convsvc import validation
from convsvc.domain import NodeView, WorkerView
from convsvc.engine import ConversationEngine
from convsvc.engine.subscriptions import StreamItem
from convsvc.errors import FailedPrecondition, InvalidArgument
from convsvc.tasks import TaskOwner
from convsvc.transport.access import Access, Auditor, caller_scope
from convsvc.transport.connect import ConnectSession
from convsvc.transport.convert import (
    StructList,
    admission_policy,
    agent_control,
    approval_decision,
    audit_entry_to_pb,
    busy_policy,
    connection_to_pb,
    conversation_to_pb,
    delivery_states,
    delivery_to_pb,
    node_to_pb,
    optional_struct,
    optional_time,
    permission,
    search_page_to_bytes,
    statuses,
    stream_items_to_bytes,
    update_mask,
    watch_update_to_bytes,
    webhook_event_types,
    webhook_to_pb,
    worker_to_pb,
)
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.webhooks.endpoints import WebhookEndpoints

Context: TypeAlias = grpc.aio.ServicerContext


class ConversationServicer:
    """One method per RPC; errors are mapped by the handler table (``transport.service``)."""

    def __init__(self, engine: ConversationEngine) -> None:
        self._engine = engine
        self._connect_holders: dict[str, object] = {}
        self.access: Access | None = None
        self.auditor: Auditor | None = None
        self.webhooks: WebhookEndpoints | None = None
        self.workers: Callable[[], list[WorkerView]] = list
        """The workers attached to this node (ListWorkers)."""
        self.nodes: Callable[[], Awaitable[list[NodeView]]] | None = None
        """In clustered mode, the live nodes (ListWorkers)."""
        self.node_address = ""
        self.tasks = TaskOwner()

    async def close(self) -> None:
        """Waits for the clean-up of streams that ended (their disconnects)."""
        await self.tasks.wait_all()

    def secure(self, access: Access, auditor: Auditor) -> None:
        """Who may call (scoped tokens) and the audit log of what they did."""
        self.access = access
        self.auditor = auditor

    async def StartConversation(
        self, request: pb.StartConversationRequest, context: Context
    ) -> pb.StartConversationResponse:
        view = await self._engine.start_conversation(
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            agent=request.agent,
            settings=optional_struct(request, "settings"),
            initial_user_message=optional_struct(request, "initial_user_message"),
            replay_events=StructList(request.replay_events),
            request_id=request.request_id,
            admission_policy=admission_policy(request.admission_policy),
            scope=caller_scope(),
            labels=dict(request.labels),
            title=request.title,
        )
        return pb.StartConversationResponse(conversation=conversation_to_pb(view))

    async def ForkConversation(
        self, request: pb.ForkConversationRequest, context: Context
    ) -> pb.ForkConversationResponse:
        view = await self._engine.fork_conversation(
            source_conversation_id=request.source_conversation_id,
            at_event_id=request.at_event_id if request.HasField("at_event_id") else None,
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            settings=optional_struct(request, "settings"),
            labels=dict(request.labels),
            title=request.title,
            request_id=request.request_id,
            admission_policy=admission_policy(request.admission_policy),
            scope=caller_scope(),
        )
        return pb.ForkConversationResponse(conversation=conversation_to_pb(view))

    async def JoinConversation(
        self, request: pb.JoinConversationRequest, context: Context
    ) -> pb.JoinConversationResponse:
        view, connection = await self._engine.join_conversation(
            conversation_id=request.conversation_id,
            connection_id=request.connection_id,
            user_id=request.user_id,
            settings=optional_struct(request, "settings"),
            client_instance_id=request.client_instance_id,
            request_id=request.request_id,
            scope=caller_scope(),
        )
        return pb.JoinConversationResponse(
            conversation=conversation_to_pb(view), connection=connection_to_pb(connection)
        )

    async def SendEvent(
        self, request: pb.SendEventRequest, context: Context
    ) -> pb.SendEventResponse:
        event = optional_struct(request, "event")
        conversation_id, event_id = await self._engine.send_event(
            event=event if event is not None else {},
            connection_id=request.connection_id,
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            request_id=request.request_id,
            busy_policy=busy_policy(request.busy_policy),
        )
        return pb.SendEventResponse(conversation_id=conversation_id, event_id=event_id)

    async def ControlAgent(
        self, request: pb.ControlAgentRequest, context: Context
    ) -> pb.ControlAgentResponse:
        event_id, state = await self._engine.control_agent(
            conversation_id=request.conversation_id,
            control=agent_control(request.control),
            user_id=request.user_id,
            request_id=request.request_id,
        )
        response = pb.ControlAgentResponse(
            conversation_id=request.conversation_id, agent_state=state
        )
        if event_id is not None:
            response.event_id = event_id
        return response

    async def ConfirmAction(
        self, request: pb.ConfirmActionRequest, context: Context
    ) -> pb.ConfirmActionResponse:
        event_id, state = await self._engine.confirm_action(
            conversation_id=request.conversation_id,
            action_id=request.action_id,
            decision=approval_decision(request.decision),
            user_id=request.user_id,
            request_id=request.request_id,
        )
        return pb.ConfirmActionResponse(
            conversation_id=request.conversation_id, event_id=event_id or 0, agent_state=state
        )

    async def DisconnectConnection(
        self, request: pb.DisconnectConnectionRequest, context: Context
    ) -> pb.DisconnectConnectionResponse:
        removed = await self._engine.disconnect(
            connection_id=request.connection_id,
            user_id=request.user_id,
            request_id=request.request_id,
        )
        return pb.DisconnectConnectionResponse(removed=removed)

    async def CloseConversation(
        self, request: pb.CloseConversationRequest, context: Context
    ) -> pb.CloseConversationResponse:
        view = await self._engine.close_conversation(
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            request_id=request.request_id,
        )
        return pb.CloseConversationResponse(conversation=conversation_to_pb(view))

    async def GetConversation(
        self, request: pb.GetConversationRequest, context: Context
    ) -> pb.GetConversationResponse:
        view = await self._engine.queries.get_conversation(request.conversation_id, request.user_id)
        return pb.GetConversationResponse(conversation=conversation_to_pb(view))

    async def ListConversations(
        self, request: pb.ListConversationsRequest, context: Context
    ) -> pb.ListConversationsResponse:
        views, token = self._engine.queries.list_conversations(
            user_id=request.user_id,
            conversation_ids=list(request.conversation_ids),
            page_size=request.page_size,
            page_token=request.page_token,
            agent_states=list(request.agent_states),
        )
        return pb.ListConversationsResponse(
            conversations=[conversation_to_pb(v) for v in views], next_page_token=token
        )

    async def SearchConversations(
        self, request: pb.SearchConversationsRequest, context: Context
    ) -> pb.SearchConversationsResponse:
        views, token = await self._engine.queries.search_conversations(
            user_id=request.user_id,
            conversation_ids=list(request.conversation_ids),
            statuses=statuses(request.statuses),
            agent_states=list(request.agent_states),
            agents=list(request.agents),
            labels=dict(request.labels),
            title_contains=request.title_contains,
            created_after=optional_time(request, "create_time_after"),
            created_before=optional_time(request, "create_time_before"),
            active_after=optional_time(request, "last_active_time_after"),
            active_before=optional_time(request, "last_active_time_before"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.SearchConversationsResponse(
            conversations=[conversation_to_pb(v) for v in views], next_page_token=token
        )

    async def UpdateConversation(
        self, request: pb.UpdateConversationRequest, context: Context
    ) -> pb.UpdateConversationResponse:
        paths = update_mask(request)
        view = await self._engine.update_conversation(
            conversation_id=request.conversation_id,
            labels=dict(request.labels) if "labels" in paths else None,
            title=request.title if "title" in paths else None,
            user_id=request.user_id,
        )
        return pb.UpdateConversationResponse(conversation=conversation_to_pb(view))

    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: Context
    ) -> pb.ListConnectionsResponse:
        connections, token = self._engine.queries.list_connections(
            user_id=request.user_id,
            conversation_ids=list(request.conversation_ids),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListConnectionsResponse(
            connections=[connection_to_pb(c) for c in connections], next_page_token=token
        )

    async def SearchEvents(self, request: pb.SearchEventsRequest, context: Context) -> bytes:
        rows, token = await self._engine.history.search_events(
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            start_id=request.start_id,
            end_id=request.end_id if request.HasField("end_id") else None,
            reverse=request.reverse,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        # Stored events are already wire-encoded: the response is assembled, not re-encoded.
        return search_page_to_bytes([row.encoded for row in rows], token)

    async def StreamEvents(
        self, request: pb.StreamEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        async for items in self.stream_items(request, context):
            for message in stream_items_to_bytes(items):
                yield message

    def stream_items(
        self, request: pb.StreamEventsRequest, context: Context
    ) -> AsyncIterator[list[StreamItem]]:
        """The events StreamEvents sends (Connect sends them too)."""
        return self._engine.history.stream_events(
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            start_id=request.start_id,
            max_batch=request.max_batch_size,
        )

    async def WatchConversations(
        self, request: pb.WatchConversationsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        updates = self._engine.queries.watch_conversations(
            user_id=request.user_id,
            conversation_ids=list(request.conversation_ids),
            resume_token=request.resume_token,
        )
        async for update in updates:
            for response in watch_update_to_bytes(update):
                yield response

    async def Connect(
        self, requests: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> AsyncIterator[bytes]:
        async for message in ConnectSession(self, context, self._connect_holders).run(requests):
            yield message

    async def CompleteWithAgentLlm(
        self, request: pb.CompleteWithAgentLlmRequest, context: Context
    ) -> pb.CompleteWithAgentLlmResponse:
        content = await self._engine.complete_with_agent_llm(
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            service_id=request.service_id,
            llm_config=optional_struct(request, "llm_config"),
            messages=StructList(request.messages),
        )
        return pb.CompleteWithAgentLlmResponse(content=content)

    async def MintToken(
        self, request: pb.MintTokenRequest, context: Context
    ) -> pb.MintTokenResponse:
        authority = self.access.authority if self.access is not None else None
        if authority is None:
            raise FailedPrecondition(
                "scoped tokens need a signing key: set CONVSVC_AUTH_TOKEN (the key is derived "
                "from it) or CONVSVC_TOKEN_SIGNING_KEY",
                reason="TOKENS_NOT_CONFIGURED",
            )
        user = validation.check_user_id(request.user_id)
        if user is None:
            raise InvalidArgument(
                "user_id is required: a scoped token acts for one user",
                reason="INVALID_ARGUMENT",
                metadata={"field": "user_id"},
            )
        conversation_ids = [
            validation.check_id("conversation_ids", c) for c in request.conversation_ids
        ]
        permissions = [permission(p) for p in request.permissions]
        if not permissions:
            raise InvalidArgument(
                "name at least one permission (PERMISSION_READ, _WRITE or _ADMIN)",
                reason="INVALID_ARGUMENT",
                metadata={"field": "permissions"},
            )
        token, scope = authority.mint(user, conversation_ids, permissions, request.ttl_seconds)
        response = pb.MintTokenResponse(token=token, token_id=scope.token_id)
        response.expire_time.FromDatetime(scope.expire_time)
        return response

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Context
    ) -> pb.RevokeTokenResponse:
        token_id = validation.check_id("token_id", request.token_id)
        if self.access is None or self.access.authority is None:
            raise FailedPrecondition(
                "this server issues no scoped tokens", reason="TOKENS_NOT_CONFIGURED"
            )
        await self.access.revoke(token_id)
        return pb.RevokeTokenResponse()

    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context: Context
    ) -> pb.ListAuditEntriesResponse:
        entries, token = await self._engine.history.list_audit(
            conversation_id=request.conversation_id,
            user_id=request.user_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListAuditEntriesResponse(
            entries=[audit_entry_to_pb(e) for e in entries], next_page_token=token
        )

    def _endpoints(self) -> WebhookEndpoints:
        if self.webhooks is None:
            raise FailedPrecondition(
                "this server sends no webhooks", reason="WEBHOOKS_NOT_CONFIGURED"
            )
        return self.webhooks

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        endpoint = await self._endpoints().create(
            url=request.url,
            event_types=webhook_event_types(request.event_types),
            description=request.description,
            secret=request.secret,
            webhook_id=request.webhook_id,
        )
        return pb.CreateWebhookResponse(webhook=webhook_to_pb(endpoint, with_secret=True))

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        endpoints = await self._endpoints().all()
        return pb.ListWebhooksResponse(webhooks=[webhook_to_pb(e) for e in endpoints])

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        return pb.DeleteWebhookResponse(removed=await self._endpoints().delete(request.webhook_id))

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: Context
    ) -> pb.ListWorkersResponse:
        nodes = await self.nodes() if self.nodes is not None else []
        return pb.ListWorkersResponse(
            workers=[worker_to_pb(w, self.node_address) for w in self.workers()],
            nodes=[node_to_pb(n) for n in nodes],
        )

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        deliveries, token = await self._endpoints().deliveries(
            webhook_id=request.webhook_id,
            conversation_id=request.conversation_id,
            states=delivery_states(request.states),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListWebhookDeliveriesResponse(
            deliveries=[delivery_to_pb(d) for d in deliveries], next_page_token=token
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        count, ttl = self._engine.queries.heartbeat(request.client_instance_id)
        return pb.HeartbeatResponse(connection_count=count, ttl_seconds=ttl)
