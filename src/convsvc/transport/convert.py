"""Conversions between protobuf messages and engine domain types (the edge only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from convclient.structs import struct_to_dict
from convsvc.codec import encode_event_batch, encode_message_field
from convsvc.domain import (
    AdmissionPolicy,
    AgentControl,
    ApprovalDecision,
    AuditEntry,
    BusyPolicy,
    Connection,
    ConversationStatus,
    ConversationView,
    DeliveryState,
    JsonObject,
    NodeView,
    PendingAction,
    SecurityRisk,
    StatusUpdate,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventType,
    WorkerView,
)
from convsvc.engine.subscriptions import StreamItem
from convsvc.engine.watch import Change, ChangeKind, WatchedConversation, WatchUpdate
from convsvc.errors import InvalidArgument
from convsvc.transport.tokens import Permission
from convsvc.v1 import conversation_service_pb2 as pb
from convsvc.validation import shown

_STATUS = {
    ConversationStatus.STARTING: pb.CONVERSATION_STATUS_STARTING,
    ConversationStatus.RUNNING: pb.CONVERSATION_STATUS_RUNNING,
    ConversationStatus.STOPPED: pb.CONVERSATION_STATUS_STOPPED,
    ConversationStatus.QUEUED: pb.CONVERSATION_STATUS_QUEUED,
}
_CHANGE_KIND = {
    ChangeKind.CREATED: pb.CONVERSATION_CHANGE_KIND_CREATED,
    ChangeKind.STATUS_CHANGED: pb.CONVERSATION_CHANGE_KIND_STATUS_CHANGED,
    ChangeKind.AGENT_STATE_CHANGED: pb.CONVERSATION_CHANGE_KIND_AGENT_STATE_CHANGED,
    ChangeKind.CONNECTIONS_CHANGED: pb.CONVERSATION_CHANGE_KIND_CONNECTIONS_CHANGED,
    ChangeKind.QUEUE_POSITION_CHANGED: pb.CONVERSATION_CHANGE_KIND_QUEUE_POSITION_CHANGED,
    ChangeKind.CLOSED: pb.CONVERSATION_CHANGE_KIND_CLOSED,
    ChangeKind.PENDING_ACTION_CHANGED: pb.CONVERSATION_CHANGE_KIND_PENDING_ACTION_CHANGED,
    ChangeKind.UPDATED: pb.CONVERSATION_CHANGE_KIND_UPDATED,
}
_POLICY: dict[int, AdmissionPolicy] = {
    pb.ADMISSION_POLICY_EVICT_OLDEST: AdmissionPolicy.EVICT_OLDEST,
    pb.ADMISSION_POLICY_EVICT_IDLE_ONLY: AdmissionPolicy.EVICT_IDLE_ONLY,
    pb.ADMISSION_POLICY_REJECT: AdmissionPolicy.REJECT,
    pb.ADMISSION_POLICY_QUEUE: AdmissionPolicy.QUEUE,
}
SNAPSHOT_PAGE = 500
"""Conversations per snapshot response (each response stays far below message limits)."""


_PERMISSION: dict[int, Permission] = {
    pb.PERMISSION_READ: Permission.READ,
    pb.PERMISSION_WRITE: Permission.WRITE,
    pb.PERMISSION_ADMIN: Permission.ADMIN,
}


def permission(value: int) -> Permission:
    try:
        return _PERMISSION[value]
    except KeyError:
        raise InvalidArgument(
            f"permission {value} is not PERMISSION_READ, _WRITE or _ADMIN",
            reason="INVALID_ARGUMENT",
            metadata={"field": "permissions"},
        ) from None


def audit_entry_to_pb(entry: AuditEntry) -> pb.AuditEntry:
    message = pb.AuditEntry(
        sequence=entry.sequence,
        credential=entry.credential,
        subject=entry.subject,
        token_id=entry.token_id,
        method=entry.method,
        user_id=entry.user_id,
        conversation_id=entry.conversation_id,
        connection_id=entry.connection_id,
        request_id=entry.request_id,
        code=entry.code,
        reason=entry.reason,
        affected_token_id=entry.affected_token_id,
    )
    message.time.FromDatetime(entry.time)
    return message


_BUSY: dict[int, BusyPolicy] = {
    pb.BUSY_POLICY_ENQUEUE: BusyPolicy.ENQUEUE,
    pb.BUSY_POLICY_REJECT: BusyPolicy.REJECT,
    pb.BUSY_POLICY_INTERRUPT: BusyPolicy.INTERRUPT,
}
_CONTROL: dict[int, AgentControl] = {
    pb.AGENT_CONTROL_PAUSE: AgentControl.PAUSE,
    pb.AGENT_CONTROL_RESUME: AgentControl.RESUME,
    pb.AGENT_CONTROL_INTERRUPT: AgentControl.INTERRUPT,
}
_DECISION: dict[int, ApprovalDecision] = {
    pb.APPROVAL_DECISION_APPROVE: ApprovalDecision.APPROVE,
    pb.APPROVAL_DECISION_REJECT: ApprovalDecision.REJECT,
}
_RISK = {
    SecurityRisk.UNKNOWN: pb.SECURITY_RISK_UNKNOWN,
    SecurityRisk.LOW: pb.SECURITY_RISK_LOW,
    SecurityRisk.MEDIUM: pb.SECURITY_RISK_MEDIUM,
    SecurityRisk.HIGH: pb.SECURITY_RISK_HIGH,
}
E = TypeVar("E")


def _enum_field(value: int, known: Mapping[int, E], field: str, enum_name: str) -> E:
    try:
        return known[value]
    except KeyError:
        names = pb.DESCRIPTOR.enum_types_by_name[enum_name].values_by_number
        raise InvalidArgument(
            f"{field} {value} is not a known {enum_name}; use one of "
            f"{', '.join(names[number].name for number in known)}",
            reason="INVALID_ARGUMENT",
            metadata={"field": field},
        ) from None


def admission_policy(value: int) -> AdmissionPolicy | None:
    """The policy a request names; None for the server's."""
    if value == pb.ADMISSION_POLICY_UNSPECIFIED:
        return None
    return _enum_field(value, _POLICY, "admission_policy", "AdmissionPolicy")


def busy_policy(value: int) -> BusyPolicy | None:
    """The busy policy a send names; None for the server's."""
    if value == pb.BUSY_POLICY_UNSPECIFIED:
        return None
    return _enum_field(value, _BUSY, "busy_policy", "BusyPolicy")


def agent_control(value: int) -> AgentControl:
    return _enum_field(value, _CONTROL, "control", "AgentControl")


def statuses(values: Sequence[int]) -> list[ConversationStatus]:
    """The statuses a search names."""
    known: dict[int, ConversationStatus] = {int(n): status for status, n in _STATUS.items()}
    return [_enum_field(v, known, "statuses", "ConversationStatus") for v in values]


def optional_time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware datetime; None when unset."""
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"{field} is not a valid time (seconds {stamp.seconds}, nanos {stamp.nanos})",
            reason="INVALID_ARGUMENT",
            metadata={"field": field},
        ) from None


def update_mask(request: pb.UpdateConversationRequest) -> set[str]:
    """The fields an update replaces: "labels" and/or "title"."""
    paths = set(request.update_mask.paths)
    unknown = paths - {"labels", "title"}
    if unknown:
        named = ", ".join(shown(path) for path in sorted(unknown)[:3])
        raise InvalidArgument(
            f"update_mask names {named}; only labels and title can change",
            reason="INVALID_ARGUMENT",
            metadata={"field": "update_mask"},
        )
    return paths


_EVENT_TYPE: dict[int, WebhookEventType] = {
    pb.WEBHOOK_EVENT_TYPE_FINISHED: WebhookEventType.FINISHED,
    pb.WEBHOOK_EVENT_TYPE_ERROR: WebhookEventType.ERROR,
    pb.WEBHOOK_EVENT_TYPE_AWAITING_USER: WebhookEventType.AWAITING_USER,
    pb.WEBHOOK_EVENT_TYPE_AWAITING_CONFIRMATION: WebhookEventType.AWAITING_CONFIRMATION,
    pb.WEBHOOK_EVENT_TYPE_CLOSED: WebhookEventType.CLOSED,
    pb.WEBHOOK_EVENT_TYPE_EVICTED: WebhookEventType.EVICTED,
}
_EVENT_TYPE_PB: dict[WebhookEventType, Any] = {kind: n for n, kind in _EVENT_TYPE.items()}
_DELIVERY_STATE: dict[int, DeliveryState] = {
    pb.WEBHOOK_DELIVERY_STATE_PENDING: DeliveryState.PENDING,
    pb.WEBHOOK_DELIVERY_STATE_DELIVERED: DeliveryState.DELIVERED,
    pb.WEBHOOK_DELIVERY_STATE_DEAD: DeliveryState.DEAD,
}
_DELIVERY_STATE_PB: dict[DeliveryState, Any] = {s: n for n, s in _DELIVERY_STATE.items()}


def webhook_event_types(values: Sequence[int]) -> list[WebhookEventType]:
    return [_enum_field(v, _EVENT_TYPE, "event_types", "WebhookEventType") for v in values]


def delivery_states(values: Sequence[int]) -> list[DeliveryState]:
    return [_enum_field(v, _DELIVERY_STATE, "states", "WebhookDeliveryState") for v in values]


def webhook_to_pb(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> pb.Webhook:
    message = pb.Webhook(
        webhook_id=endpoint.webhook_id,
        url=endpoint.url,
        event_types=[_EVENT_TYPE_PB[t] for t in endpoint.event_types],
        secret=endpoint.secret if with_secret else "",
        description=endpoint.description,
    )
    message.create_time.FromDatetime(endpoint.create_time)
    return message


def delivery_to_pb(delivery: WebhookDelivery) -> pb.WebhookDelivery:
    message = pb.WebhookDelivery(
        delivery_id=delivery.delivery_id,
        webhook_id=delivery.webhook_id,
        type=_EVENT_TYPE_PB[delivery.type],
        conversation_id=delivery.conversation_id,
        state=_DELIVERY_STATE_PB[delivery.state],
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
    )
    message.payload.update(delivery.payload)
    message.create_time.FromDatetime(delivery.create_time)
    if delivery.next_attempt_time is not None:
        message.next_attempt_time.FromDatetime(delivery.next_attempt_time)
    if delivery.delivered_time is not None:
        message.delivered_time.FromDatetime(delivery.delivered_time)
    return message


def approval_decision(value: int) -> ApprovalDecision:
    return _enum_field(value, _DECISION, "decision", "ApprovalDecision")


def pending_action_to_pb(action: PendingAction) -> pb.PendingAction:
    return pb.PendingAction(
        event_id=action.event_id,
        action=action.action,
        content=action.content,
        security_risk=(
            _RISK[action.security_risk]
            if action.security_risk is not None
            else pb.SECURITY_RISK_UNSPECIFIED
        ),
        thought=action.thought,
    )


def optional_struct(message: Message, field: str) -> JsonObject | None:
    """The JSON object in a Struct field, or None when the field is unset."""
    if not message.HasField(field):
        return None
    value: struct_pb2.Struct = getattr(message, field)
    return struct_to_dict(value)


class StructList(Sequence[JsonObject]):
    """A repeated Struct field read as JSON objects one at a time, when asked: the engine
    checks how many there are before any is converted."""

    def __init__(self, structs: Sequence[struct_pb2.Struct]) -> None:
        self._structs = structs

    def __len__(self) -> int:
        return len(self._structs)

    @overload
    def __getitem__(self, index: int) -> JsonObject: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[JsonObject]: ...

    def __getitem__(self, index: int | slice) -> JsonObject | Sequence[JsonObject]:
        if isinstance(index, slice):
            return [struct_to_dict(s) for s in self._structs[index]]
        return struct_to_dict(self._structs[index])


def conversation_to_pb(view: ConversationView) -> pb.Conversation:
    message = pb.Conversation(
        conversation_id=view.conversation_id,
        user_id=view.user_id or "",
        status=_STATUS[view.status],
        agent=view.agent,
        agent_state=view.agent_state,
        latest_event_id=view.latest_event_id,
        connection_count=view.connection_count,
        queue_position=view.queue_position,
        owner_address=view.owner_address,
        labels=view.labels,
        title=view.title,
    )
    message.create_time.FromDatetime(view.create_time)
    message.last_active_time.FromDatetime(view.last_active_time)
    if view.pending_action is not None:
        message.pending_action.CopyFrom(pending_action_to_pb(view.pending_action))
    return message


def connection_to_pb(connection: Connection) -> pb.Connection:
    return pb.Connection(
        connection_id=connection.connection_id,
        conversation_id=connection.conversation_id,
        user_id=connection.user_id or "",
        client_instance_id=connection.client_instance_id or "",
    )


def stream_items_to_bytes(items: list[StreamItem]) -> list[bytes]:
    """Serialized StreamEventsResponse messages: consecutive events share one message;
    a status update is one of its own (already encoded)."""
    out: list[bytes] = []
    run: list[bytes] = []
    for item in items:
        if isinstance(item, StatusUpdate):
            if run:
                out.append(encode_event_batch(run))
                run = []
            out.append(item.encoded)
        else:
            run.append(item.encoded)
    if run:
        out.append(encode_event_batch(run))
    return out


def search_page_to_bytes(encoded_events: list[bytes], next_page_token: str) -> bytes:
    """A serialized SearchEventsResponse built from stored event encodings."""
    tail = pb.SearchEventsResponse(next_page_token=next_page_token).SerializeToString()
    return encode_event_batch(encoded_events) + tail


def watched_to_pb(watched: WatchedConversation) -> pb.WatchedConversation:
    return pb.WatchedConversation(
        conversation=conversation_to_pb(watched.view), connection_ids=watched.connection_ids
    )


def change_to_pb(change: Change) -> pb.ConversationChange:
    message = pb.ConversationChange(
        kind=_CHANGE_KIND[change.kind], watched=watched_to_pb(change.watched)
    )
    message.change_time.FromDatetime(change.time)
    return message


_CHANGES_FIELD = pb.WatchConversationsResponse.CHANGES_FIELD_NUMBER


def watch_update_to_bytes(update: WatchUpdate) -> list[bytes]:
    """Like ``watch_update_to_pb``, serialized; a response of changes is assembled from the
    changes' shared encodings (many watchers send the same change)."""
    if update.snapshot is not None:
        return [response.SerializeToString() for response in watch_update_to_pb(update)]
    parts: list[bytes] = []
    for change in update.changes:
        if change.wire is None:
            change.wire = encode_message_field(
                _CHANGES_FIELD, change_to_pb(change).SerializeToString()
            )
        parts.append(change.wire)
    tail = pb.WatchConversationsResponse(resume_token=update.resume_token).SerializeToString()
    return [b"".join(parts) + tail]


def watch_update_to_pb(update: WatchUpdate) -> list[pb.WatchConversationsResponse]:
    """A snapshot in pages (the token on the last), or one response of changes."""
    if update.snapshot is None:
        return [
            pb.WatchConversationsResponse(
                changes=[change_to_pb(c) for c in update.changes],
                resume_token=update.resume_token,
            )
        ]
    pages = [
        update.snapshot[start : start + SNAPSHOT_PAGE]
        for start in range(0, len(update.snapshot), SNAPSHOT_PAGE)
    ] or [[]]
    responses = [
        pb.WatchConversationsResponse(snapshot=[watched_to_pb(w) for w in page]) for page in pages
    ]
    responses[-1].snapshot_complete = True
    responses[-1].resume_token = update.resume_token
    return responses


def worker_to_pb(worker: WorkerView, node_address: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker.worker_id,
        kinds=list(worker.kinds),
        capacity=worker.capacity,
        load=len(worker.conversation_ids),
        conversation_ids=list(worker.conversation_ids),
        node_address=node_address,
    )


def node_to_pb(node: NodeView) -> pb.NodeInfo:
    message = pb.NodeInfo(
        node_id=node.node_id,
        address=node.address,
        conversation_count=node.conversation_count,
        agent_kinds=list(node.agent_kinds),
    )
    message.heartbeat_time.FromDatetime(node.heartbeat_time)
    message.lease_expire_time.FromDatetime(node.lease_expire_time)
    return message
