"""Between the generated protobuf messages and the client's models and plain JSON objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from convclient.models import (
    AdmissionPolicy,
    AgentControl,
    ApprovalDecision,
    AuditEntry,
    BusyPolicy,
    ChangeKind,
    Connection,
    Conversation,
    ConversationChange,
    ConversationStatus,
    Event,
    EventBatch,
    PendingAction,
    Permission,
    SecurityRisk,
    WatchedConversation,
    Webhook,
    WebhookDelivery,
    WebhookDeliveryState,
    WebhookEventType,
)
from convclient.structs import struct_to_dict
from convsvc.v1 import conversation_service_pb2 as pb

_STATUS = {
    pb.CONVERSATION_STATUS_STARTING: ConversationStatus.STARTING,
    pb.CONVERSATION_STATUS_RUNNING: ConversationStatus.RUNNING,
    pb.CONVERSATION_STATUS_STOPPED: ConversationStatus.STOPPED,
    pb.CONVERSATION_STATUS_QUEUED: ConversationStatus.QUEUED,
}
STATUS = {status: number for number, status in _STATUS.items()}
BUSY_POLICY = {
    BusyPolicy.ENQUEUE: pb.BUSY_POLICY_ENQUEUE,
    BusyPolicy.REJECT: pb.BUSY_POLICY_REJECT,
    BusyPolicy.INTERRUPT: pb.BUSY_POLICY_INTERRUPT,
}
AGENT_CONTROL = {
    AgentControl.PAUSE: pb.AGENT_CONTROL_PAUSE,
    AgentControl.RESUME: pb.AGENT_CONTROL_RESUME,
    AgentControl.INTERRUPT: pb.AGENT_CONTROL_INTERRUPT,
}
APPROVAL_DECISION = {
    ApprovalDecision.APPROVE: pb.APPROVAL_DECISION_APPROVE,
    ApprovalDecision.REJECT: pb.APPROVAL_DECISION_REJECT,
}
_RISK = {
    pb.SECURITY_RISK_UNKNOWN: SecurityRisk.UNKNOWN,
    pb.SECURITY_RISK_LOW: SecurityRisk.LOW,
    pb.SECURITY_RISK_MEDIUM: SecurityRisk.MEDIUM,
    pb.SECURITY_RISK_HIGH: SecurityRisk.HIGH,
}
_CHANGE_KIND = {
    pb.CONVERSATION_CHANGE_KIND_CREATED: ChangeKind.CREATED,
    pb.CONVERSATION_CHANGE_KIND_STATUS_CHANGED: ChangeKind.STATUS_CHANGED,
    pb.CONVERSATION_CHANGE_KIND_AGENT_STATE_CHANGED: ChangeKind.AGENT_STATE_CHANGED,
    pb.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED: ChangeKind.CONNECTIONS_CHANGED,
    pb.CONVERSATION_CHANGE_KIND_QUEUE_POSITION_CHANGED: ChangeKind.QUEUE_POSITION_CHANGED,
    pb.CONVERSATION_CHANGE_KIND_CLOSED: ChangeKind.CLOSED,
    pb.CONVERSATION_CHANGE_KIND_PENDING_ACTION_CHANGED: ChangeKind.PENDING_ACTION_CHANGED,
    pb.CONVERSATION_CHANGE_KIND_UPDATED: ChangeKind.UPDATED,
}
PERMISSION = {
    Permission.READ: pb.PERMISSION_READ,
    Permission.WRITE: pb.PERMISSION_WRITE,
    Permission.ADMIN: pb.PERMISSION_ADMIN,
}
ADMISSION_POLICY = {
    AdmissionPolicy.EVICT_OLDEST: pb.ADMISSION_POLICY_EVICT_OLDEST,
    AdmissionPolicy.EVICT_IDLE_ONLY: pb.ADMISSION_POLICY_EVICT_IDLE_ONLY,
    AdmissionPolicy.REJECT: pb.ADMISSION_POLICY_REJECT,
    AdmissionPolicy.QUEUE: pb.ADMISSION_POLICY_QUEUE,
}
_KIND = {pb.EVENT_KIND_ACTION: "action", pb.EVENT_KIND_OBSERVATION: "observation"}


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def conversation(message: pb.Conversation) -> Conversation:
    return Conversation(
        conversation_id=message.conversation_id,
        user_id=message.user_id,
        status=_STATUS.get(message.status, ConversationStatus.STOPPED),
        agent=message.agent,
        agent_state=message.agent_state,
        latest_event_id=message.latest_event_id,
        create_time=_time(message, "create_time"),
        last_active_time=_time(message, "last_active_time"),
        connection_count=message.connection_count,
        queue_position=message.queue_position,
        owner_address=message.owner_address,
        pending_action=(
            pending_action(message.pending_action) if message.HasField("pending_action") else None
        ),
        labels=dict(message.labels),
        title=message.title,
    )


def pending_action(message: pb.PendingAction) -> PendingAction:
    return PendingAction(
        event_id=message.event_id,
        action=message.action,
        content=message.content,
        security_risk=_RISK.get(message.security_risk),
        thought=message.thought,
    )


def connection(message: pb.Connection) -> Connection:
    return Connection(
        connection_id=message.connection_id,
        conversation_id=message.conversation_id,
        user_id=message.user_id,
        client_instance_id=message.client_instance_id,
    )


def event(message: pb.Event) -> Event:
    return Event(
        conversation_id=message.conversation_id,
        id=message.id,
        timestamp=message.timestamp.ToDatetime(tzinfo=UTC),
        source=message.source,
        kind=_KIND.get(message.kind, "observation"),
        name=message.name,
        payload=struct_to_dict(message.payload),
        trace_parent=message.trace_parent,
    )


def event_batch(message: pb.StreamEventsResponse) -> EventBatch:
    return EventBatch(
        events=[event(item) for item in message.events],
        status_update=struct_to_dict(message.status_update)
        if message.HasField("status_update")
        else None,
    )


def watched(message: pb.WatchedConversation) -> WatchedConversation:
    return WatchedConversation(
        conversation=conversation(message.conversation),
        connection_ids=list(message.connection_ids),
    )


def change(message: pb.ConversationChange) -> ConversationChange | None:
    """None for a kind this client does not know (a newer server's)."""
    kind = _CHANGE_KIND.get(message.kind)
    if kind is None:
        return None
    return ConversationChange(
        kind=kind, watched=watched(message.watched), change_time=_time(message, "change_time")
    )


def audit_entry(message: pb.AuditEntry) -> AuditEntry:
    return AuditEntry(
        sequence=message.sequence,
        time=_time(message, "time"),
        credential=message.credential,
        subject=message.subject,
        token_id=message.token_id,
        method=message.method,
        user_id=message.user_id,
        conversation_id=message.conversation_id,
        connection_id=message.connection_id,
        request_id=message.request_id,
        code=message.code,
        reason=message.reason,
        affected_token_id=message.affected_token_id,
    )


WEBHOOK_EVENT_TYPE = {
    WebhookEventType.FINISHED: pb.WEBHOOK_EVENT_TYPE_FINISHED,
    WebhookEventType.ERROR: pb.WEBHOOK_EVENT_TYPE_ERROR,
    WebhookEventType.AWAITING_USER: pb.WEBHOOK_EVENT_TYPE_AWAITING_USER,
    WebhookEventType.AWAITING_CONFIRMATION: pb.WEBHOOK_EVENT_TYPE_AWAITING_CONFIRMATION,
    WebhookEventType.CLOSED: pb.WEBHOOK_EVENT_TYPE_CLOSED,
    WebhookEventType.EVICTED: pb.WEBHOOK_EVENT_TYPE_EVICTED,
}
_EVENT_TYPE = {number: kind for kind, number in WEBHOOK_EVENT_TYPE.items()}
DELIVERY_STATE = {
    WebhookDeliveryState.PENDING: pb.WEBHOOK_DELIVERY_STATE_PENDING,
    WebhookDeliveryState.DELIVERED: pb.WEBHOOK_DELIVERY_STATE_DELIVERED,
    WebhookDeliveryState.DEAD: pb.WEBHOOK_DELIVERY_STATE_DEAD,
}
_DELIVERY_STATE = {number: state for state, number in DELIVERY_STATE.items()}


def webhook(message: pb.Webhook) -> Webhook:
    return Webhook(
        webhook_id=message.webhook_id,
        url=message.url,
        event_types=[_EVENT_TYPE[t] for t in message.event_types],
        secret=message.secret,
        description=message.description,
        create_time=_time(message, "create_time"),
    )


def webhook_delivery(message: pb.WebhookDelivery) -> WebhookDelivery:
    return WebhookDelivery(
        delivery_id=message.delivery_id,
        webhook_id=message.webhook_id,
        type=_EVENT_TYPE[message.type],
        conversation_id=message.conversation_id,
        payload=struct_to_dict(message.payload),
        state=_DELIVERY_STATE[message.state],
        attempts=message.attempts,
        create_time=_time(message, "create_time"),
        next_attempt_time=_time(message, "next_attempt_time"),
        last_status_code=message.last_status_code,
        last_error=message.last_error,
        delivered_time=_time(message, "delivered_time"),
    )
