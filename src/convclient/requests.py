"""Each call once: the request message and how to read its answer. The async and sync
clients only differ in how they send it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from convclient import convert
from convclient.models import (
    AdmissionPolicy,
    AgentControl,
    ApprovalDecision,
    AuditEntry,
    BusyPolicy,
    Connection,
    ControlResult,
    Conversation,
    ConversationStatus,
    Event,
    HeartbeatResult,
    Page,
    Permission,
    ScopedToken,
    SendResult,
    Webhook,
    WebhookDelivery,
    WebhookDeliveryState,
    WebhookEventType,
)
from convclient.structs import dict_to_struct
from convsvc.v1 import conversation_service_pb2 as pb

R = TypeVar("R")
JsonMapping = Mapping[str, Any]


@dataclass(frozen=True)
class Prepared(Generic[R]):
    method: str
    request: Any
    read: Callable[[Any], R]


def new_request_id() -> str:
    """Fixed before the first attempt, so every retry of the call carries the same id."""
    return uuid.uuid4().hex


def start_conversation(
    conversation_id: str,
    *,
    user_id: str = "",
    agent: str = "",
    settings: JsonMapping | None = None,
    initial_user_message: JsonMapping | None = None,
    replay_events: Sequence[JsonMapping] = (),
    request_id: str | None = None,
    admission_policy: AdmissionPolicy | str | None = None,
    labels: Mapping[str, str] | None = None,
    title: str = "",
) -> Prepared[Conversation]:
    """Starts the conversation, or returns it when it runs already (idempotent).

    ``admission_policy``: what to do at the user's limit (the server's policy when None).
    ``labels``, ``title``: for a conversation the start creates (update_conversation
    changes them later).
    """
    request = pb.StartConversationRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        agent=agent,
        replay_events=[dict_to_struct(e) for e in replay_events],
        request_id=request_id or new_request_id(),
        labels=dict(labels or {}),
        title=title,
    )
    if admission_policy is not None:
        request.admission_policy = convert.ADMISSION_POLICY[AdmissionPolicy(admission_policy)]
    if settings is not None:
        request.settings.CopyFrom(dict_to_struct(settings))
    if initial_user_message is not None:
        request.initial_user_message.CopyFrom(dict_to_struct(initial_user_message))
    return Prepared("StartConversation", request, lambda r: convert.conversation(r.conversation))


def fork_conversation(
    source_conversation_id: str,
    *,
    at_event_id: int | None = None,
    conversation_id: str = "",
    user_id: str = "",
    settings: JsonMapping | None = None,
    labels: Mapping[str, str] | None = None,
    title: str = "",
    request_id: str | None = None,
    admission_policy: AdmissionPolicy | str | None = None,
) -> Prepared[Conversation]:
    """Starts a new conversation from a copy of the source's log up to ``at_event_id``
    (its newest when None). ``settings`` go over the source's stored ones: send secrets (the
    LLM API key...) again, they were never stored."""
    request = pb.ForkConversationRequest(
        source_conversation_id=source_conversation_id,
        conversation_id=conversation_id,
        user_id=user_id,
        labels=dict(labels or {}),
        title=title,
        request_id=request_id or new_request_id(),
    )
    if at_event_id is not None:
        request.at_event_id = at_event_id
    if settings is not None:
        request.settings.CopyFrom(dict_to_struct(settings))
    if admission_policy is not None:
        request.admission_policy = convert.ADMISSION_POLICY[AdmissionPolicy(admission_policy)]
    return Prepared("ForkConversation", request, lambda r: convert.conversation(r.conversation))


def join_conversation(
    conversation_id: str,
    connection_id: str,
    *,
    user_id: str = "",
    settings: JsonMapping | None = None,
    client_instance_id: str = "",
    request_id: str | None = None,
) -> Prepared[tuple[Conversation, Connection]]:
    """Registers a connection to the conversation, starting its loop when it is stopped."""
    request = pb.JoinConversationRequest(
        conversation_id=conversation_id,
        connection_id=connection_id,
        user_id=user_id,
        client_instance_id=client_instance_id,
        request_id=request_id or new_request_id(),
    )
    if settings is not None:
        request.settings.CopyFrom(dict_to_struct(settings))
    return Prepared(
        "JoinConversation",
        request,
        lambda r: (convert.conversation(r.conversation), convert.connection(r.connection)),
    )


def send_event(
    event: JsonMapping,
    *,
    connection_id: str | None = None,
    conversation_id: str | None = None,
    user_id: str = "",
    request_id: str | None = None,
    busy_policy: BusyPolicy | str | None = None,
) -> Prepared[SendResult]:
    """Appends a user event (sent by connection or by conversation); answers once durable.
    ``busy_policy`` says what a message does while the agent is busy (the server's default
    when None)."""
    if (connection_id is None) == (conversation_id is None):
        raise ValueError("send_event needs exactly one of connection_id and conversation_id")
    request = pb.SendEventRequest(
        user_id=user_id,
        event=dict_to_struct(event),
        request_id=request_id or new_request_id(),
    )
    if connection_id is not None:
        request.connection_id = connection_id
    elif conversation_id is not None:
        request.conversation_id = conversation_id
    if busy_policy is not None:
        request.busy_policy = convert.BUSY_POLICY[BusyPolicy(busy_policy)]
    return Prepared(
        "SendEvent",
        request,
        lambda r: SendResult(conversation_id=r.conversation_id, event_id=r.event_id),
    )


def control_agent(
    conversation_id: str,
    control: AgentControl | str,
    *,
    user_id: str = "",
    request_id: str | None = None,
) -> Prepared[ControlResult]:
    """Pauses, resumes or interrupts the conversation's agent; answers once the agent reports
    the state asked for (a control its state makes pointless writes nothing)."""
    request = pb.ControlAgentRequest(
        conversation_id=conversation_id,
        control=convert.AGENT_CONTROL[AgentControl(control)],
        user_id=user_id,
        request_id=request_id or new_request_id(),
    )
    return Prepared(
        "ControlAgent",
        request,
        lambda r: ControlResult(
            conversation_id=r.conversation_id,
            event_id=r.event_id if r.HasField("event_id") else None,
            agent_state=r.agent_state,
        ),
    )


def pause_agent(
    conversation_id: str, *, user_id: str = "", request_id: str | None = None
) -> Prepared[ControlResult]:
    """The agent stops stepping and waits (state "paused") until resumed."""
    return control_agent(
        conversation_id, AgentControl.PAUSE, user_id=user_id, request_id=request_id
    )


def resume_agent(
    conversation_id: str, *, user_id: str = "", request_id: str | None = None
) -> Prepared[ControlResult]:
    """A paused agent goes on."""
    return control_agent(
        conversation_id, AgentControl.RESUME, user_id=user_id, request_id=request_id
    )


def interrupt_agent(
    conversation_id: str, *, user_id: str = "", request_id: str | None = None
) -> Prepared[ControlResult]:
    """The agent's current step stops and it waits for the user (state "stopped")."""
    return control_agent(
        conversation_id, AgentControl.INTERRUPT, user_id=user_id, request_id=request_id
    )


def confirm_action(
    conversation_id: str,
    action_id: int,
    decision: ApprovalDecision | str,
    *,
    user_id: str = "",
    request_id: str | None = None,
) -> Prepared[ControlResult]:
    """Approves or rejects the conversation's pending action (``Conversation.pending_action``,
    named by its event id); answers once the agent no longer waits for the decision. Another
    action id is refused (FailedPreconditionError, reason ACTION_NOT_PENDING)."""
    request = pb.ConfirmActionRequest(
        conversation_id=conversation_id,
        action_id=action_id,
        decision=convert.APPROVAL_DECISION[ApprovalDecision(decision)],
        user_id=user_id,
        request_id=request_id or new_request_id(),
    )
    return Prepared(
        "ConfirmAction",
        request,
        lambda r: ControlResult(
            conversation_id=r.conversation_id, event_id=r.event_id, agent_state=r.agent_state
        ),
    )


def approve_action(
    conversation_id: str, action_id: int, *, user_id: str = "", request_id: str | None = None
) -> Prepared[ControlResult]:
    """The pending action runs."""
    return confirm_action(
        conversation_id,
        action_id,
        ApprovalDecision.APPROVE,
        user_id=user_id,
        request_id=request_id,
    )


def reject_action(
    conversation_id: str, action_id: int, *, user_id: str = "", request_id: str | None = None
) -> Prepared[ControlResult]:
    """The pending action does not run; the agent waits for the user."""
    return confirm_action(
        conversation_id, action_id, ApprovalDecision.REJECT, user_id=user_id, request_id=request_id
    )


def disconnect(
    connection_id: str, *, user_id: str = "", request_id: str | None = None
) -> Prepared[bool]:
    """Removes a connection; False when it was not there (idempotent)."""
    request = pb.DisconnectConnectionRequest(
        connection_id=connection_id, user_id=user_id, request_id=request_id or new_request_id()
    )
    return Prepared("DisconnectConnection", request, lambda r: bool(r.removed))


def close_conversation(
    conversation_id: str, *, user_id: str = "", request_id: str | None = None
) -> Prepared[Conversation]:
    """Stops the conversation's loop and drops its connections (idempotent)."""
    request = pb.CloseConversationRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        request_id=request_id or new_request_id(),
    )
    return Prepared("CloseConversation", request, lambda r: convert.conversation(r.conversation))


def get_conversation(conversation_id: str, *, user_id: str = "") -> Prepared[Conversation]:
    """One conversation, running or stopped."""
    request = pb.GetConversationRequest(conversation_id=conversation_id, user_id=user_id)
    return Prepared("GetConversation", request, lambda r: convert.conversation(r.conversation))


def list_conversations(
    *,
    user_id: str = "",
    conversation_ids: Iterable[str] = (),
    page_size: int = 0,
    page_token: str = "",
    agent_states: Iterable[str] = (),
) -> Prepared[Page[Conversation]]:
    """One page of running conversations, filtered by user, ids and agent states (e.g.
    ``["awaiting_user_confirmation"]`` for those waiting for an approval)."""
    request = pb.ListConversationsRequest(
        user_id=user_id,
        conversation_ids=list(conversation_ids),
        page_size=page_size,
        page_token=page_token,
        agent_states=list(agent_states),
    )
    return Prepared(
        "ListConversations",
        request,
        lambda r: Page[Conversation](
            items=[convert.conversation(c) for c in r.conversations],
            next_page_token=r.next_page_token,
        ),
    )


def search_conversations(
    *,
    user_id: str = "",
    conversation_ids: Iterable[str] = (),
    statuses: Iterable[ConversationStatus | str] = (),
    agent_states: Iterable[str] = (),
    agents: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    title_contains: str = "",
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    active_after: datetime | None = None,
    active_before: datetime | None = None,
    page_size: int = 0,
    page_token: str = "",
) -> Prepared[Page[Conversation]]:
    """One page of every stored conversation (running or stopped) that matches all filters
    given, newest activity first."""
    request = pb.SearchConversationsRequest(
        user_id=user_id,
        conversation_ids=list(conversation_ids),
        statuses=[convert.STATUS[ConversationStatus(s)] for s in statuses],
        agent_states=list(agent_states),
        agents=list(agents),
        labels=dict(labels or {}),
        title_contains=title_contains,
        page_size=page_size,
        page_token=page_token,
    )
    for field, moment in (
        ("create_time_after", created_after),
        ("create_time_before", created_before),
        ("last_active_time_after", active_after),
        ("last_active_time_before", active_before),
    ):
        if moment is not None:
            getattr(request, field).FromDatetime(moment)
    return Prepared(
        "SearchConversations",
        request,
        lambda r: Page[Conversation](
            items=[convert.conversation(c) for c in r.conversations],
            next_page_token=r.next_page_token,
        ),
    )


def update_conversation(
    conversation_id: str,
    *,
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
    user_id: str = "",
    request_id: str | None = None,
) -> Prepared[Conversation]:
    """Replaces the conversation's labels (the whole map) and/or title; None keeps it."""
    request = pb.UpdateConversationRequest(
        conversation_id=conversation_id,
        labels=dict(labels or {}),
        title=title or "",
        user_id=user_id,
        request_id=request_id or new_request_id(),
    )
    if labels is not None:
        request.update_mask.paths.append("labels")
    if title is not None:
        request.update_mask.paths.append("title")
    return Prepared("UpdateConversation", request, lambda r: convert.conversation(r.conversation))


def list_connections(
    *,
    user_id: str = "",
    conversation_ids: Iterable[str] = (),
    page_size: int = 0,
    page_token: str = "",
) -> Prepared[Page[Connection]]:
    """One page of connections, filtered by user and conversation ids."""
    request = pb.ListConnectionsRequest(
        user_id=user_id,
        conversation_ids=list(conversation_ids),
        page_size=page_size,
        page_token=page_token,
    )
    return Prepared(
        "ListConnections",
        request,
        lambda r: Page[Connection](
            items=[convert.connection(c) for c in r.connections],
            next_page_token=r.next_page_token,
        ),
    )


def search_events(
    conversation_id: str,
    *,
    user_id: str = "",
    start_id: int = 0,
    end_id: int | None = None,
    reverse: bool = False,
    page_size: int = 0,
    page_token: str = "",
) -> Prepared[Page[Event]]:
    """One page of stored events in the id range (inclusive)."""
    request = pb.SearchEventsRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        start_id=start_id,
        reverse=reverse,
        page_size=page_size,
        page_token=page_token,
    )
    if end_id is not None:
        request.end_id = end_id
    return Prepared(
        "SearchEvents",
        request,
        lambda r: Page[Event](
            items=[convert.event(e) for e in r.events], next_page_token=r.next_page_token
        ),
    )


def heartbeat(client_instance_id: str) -> Prepared[HeartbeatResult]:
    """Keeps a client instance's connections alive for another TTL."""
    request = pb.HeartbeatRequest(client_instance_id=client_instance_id)
    return Prepared(
        "Heartbeat",
        request,
        lambda r: HeartbeatResult(connection_count=r.connection_count, ttl_seconds=r.ttl_seconds),
    )


def complete_with_agent_llm(
    conversation_id: str,
    messages: Sequence[dict[str, Any]],
    *,
    service_id: str = "",
    llm_config: dict[str, Any] | None = None,
    user_id: str = "",
) -> Prepared[str]:
    """One completion from a running conversation's agent LLM (answered by its worker)."""
    request = pb.CompleteWithAgentLlmRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        service_id=service_id,
        messages=[dict_to_struct(m) for m in messages],
    )
    if llm_config is not None:
        request.llm_config.CopyFrom(dict_to_struct(llm_config))
    return Prepared("CompleteWithAgentLlm", request, lambda r: str(r.content))


def mint_token(
    user_id: str,
    permissions: Iterable[Permission | str],
    *,
    conversation_ids: Iterable[str] = (),
    ttl_seconds: int = 0,
) -> Prepared[ScopedToken]:
    """A scoped token for ``user_id`` (service token only): give it to a browser or a
    service as its ``token``; it can do what ``permissions`` allow on ``conversation_ids``
    (all of the user's when empty) until it expires (1 h by default) or is revoked."""
    request = pb.MintTokenRequest(
        user_id=user_id,
        conversation_ids=list(conversation_ids),
        permissions=[convert.PERMISSION[Permission(p)] for p in permissions],
        ttl_seconds=ttl_seconds,
    )
    return Prepared(
        "MintToken",
        request,
        lambda r: ScopedToken(
            token=r.token, token_id=r.token_id, expire_time=r.expire_time.ToDatetime(tzinfo=UTC)
        ),
    )


def revoke_token(token_id: str, *, request_id: str | None = None) -> Prepared[None]:
    """Revokes a scoped token before it expires (idempotent)."""
    request = pb.RevokeTokenRequest(token_id=token_id, request_id=request_id or new_request_id())
    return Prepared("RevokeToken", request, lambda r: None)


def list_audit_entries(
    *, conversation_id: str = "", user_id: str = "", page_size: int = 0, page_token: str = ""
) -> Prepared[Page[AuditEntry]]:
    """A page of the audit log, oldest first (service token only)."""
    request = pb.ListAuditEntriesRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        page_size=page_size,
        page_token=page_token,
    )
    return Prepared(
        "ListAuditEntries",
        request,
        lambda r: Page[AuditEntry](
            items=[convert.audit_entry(e) for e in r.entries], next_page_token=r.next_page_token
        ),
    )


def stream_events(
    conversation_id: str, *, user_id: str = "", start_id: int = 0, max_batch_size: int = 0
) -> pb.StreamEventsRequest:
    return pb.StreamEventsRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        start_id=start_id,
        max_batch_size=max_batch_size,
    )


def create_webhook(
    url: str,
    *,
    event_types: Iterable[WebhookEventType | str] = (),
    description: str = "",
    secret: str = "",
    webhook_id: str = "",
) -> Prepared[Webhook]:
    """Registers an endpoint (service token only); the answer holds its signing secret."""
    request = pb.CreateWebhookRequest(
        url=url,
        event_types=[convert.WEBHOOK_EVENT_TYPE[WebhookEventType(t)] for t in event_types],
        description=description,
        secret=secret,
        webhook_id=webhook_id,
    )
    return Prepared("CreateWebhook", request, lambda r: convert.webhook(r.webhook))


def list_webhooks() -> Prepared[list[Webhook]]:
    return Prepared(
        "ListWebhooks",
        pb.ListWebhooksRequest(),
        lambda r: [convert.webhook(w) for w in r.webhooks],
    )


def delete_webhook(webhook_id: str) -> Prepared[bool]:
    return Prepared(
        "DeleteWebhook", pb.DeleteWebhookRequest(webhook_id=webhook_id), lambda r: r.removed
    )


def list_webhook_deliveries(
    *,
    webhook_id: str = "",
    conversation_id: str = "",
    states: Iterable[WebhookDeliveryState | str] = (),
    page_size: int = 0,
    page_token: str = "",
) -> Prepared[Page[WebhookDelivery]]:
    """Deliveries and how they went, newest first (service token only)."""
    request = pb.ListWebhookDeliveriesRequest(
        webhook_id=webhook_id,
        conversation_id=conversation_id,
        states=[convert.DELIVERY_STATE[WebhookDeliveryState(s)] for s in states],
        page_size=page_size,
        page_token=page_token,
    )
    return Prepared(
        "ListWebhookDeliveries",
        request,
        lambda r: Page[WebhookDelivery](
            items=[convert.webhook_delivery(d) for d in r.deliveries],
            next_page_token=r.next_page_token,
        ),
    )
