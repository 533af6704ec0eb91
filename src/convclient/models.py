"""What the client returns: typed, immutable views of the service's answers."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class ConversationStatus(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    QUEUED = "QUEUED"
    """A start waiting for room under the per-user limit (admission policy ``queue``)."""


class AdmissionPolicy(StrEnum):
    """What a start does when its user runs as many conversations as the limit allows."""

    EVICT_OLDEST = "evict_oldest"
    """OpenHands' behaviour: the least recently active stop to make room."""
    EVICT_IDLE_ONLY = "evict_idle_only"
    """Only loops whose agent is not running may stop; else ResourceExhaustedError."""
    REJECT = "reject"
    """Nothing stops: ResourceExhaustedError (reason TOO_MANY_CONVERSATIONS)."""
    QUEUE = "queue"
    """The start waits for room (status QUEUED, with its position), up to its deadline."""


class SecurityRisk(StrEnum):
    """How risky an action is, as the agent or a security analyzer rated it."""

    UNKNOWN = "unknown"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class PendingAction(_Model):
    """An action the agent waits to have approved (OpenHands' confirmation mode)."""

    event_id: int
    """The action event: confirm_action names it."""
    action: str
    """The action type, e.g. "run", "run_ipython", "edit"."""
    content: str = ""
    """What it would do: the command, the code, the file and its text, the URL."""
    security_risk: SecurityRisk | None = None
    """None when the action states no risk."""
    thought: str = ""


class Conversation(_Model):
    """A conversation (agent loop) and its state, as the service reports it."""

    conversation_id: str
    user_id: str = ""
    status: ConversationStatus
    agent: str = ""
    agent_state: str = ""
    """OpenHands' AgentState value of the latest agent_state_changed event, e.g. "running"."""
    latest_event_id: int = -1
    """Id of the newest event; -1 when there is none."""
    create_time: datetime | None = None
    last_active_time: datetime | None = None
    connection_count: int = 0
    queue_position: int = 0
    """For a QUEUED start: 1 for the next to run; otherwise 0."""
    owner_address: str = ""
    """In a cluster, the node that runs it (the client sends its calls there); else empty."""
    pending_action: PendingAction | None = None
    """The action its agent waits to have approved (agent_state
    "awaiting_user_confirmation"); decide with confirm_action."""
    labels: dict[str, str] = Field(default_factory=dict)
    """The caller's own tags (set at start, changed by update_conversation)."""
    title: str = ""


class Connection(_Model):
    """A viewer of a conversation (a socket.io connection, for OpenHands)."""

    connection_id: str
    conversation_id: str
    user_id: str = ""
    client_instance_id: str = ""


class Event(_Model):
    """One entry of a conversation's event log."""

    conversation_id: str
    id: int
    timestamp: datetime
    source: str
    kind: str
    """"action" or "observation"."""
    name: str
    """The action or observation name, e.g. "message" or "agent_state_changed"."""
    payload: dict[str, Any]
    """The OpenHands event dict (event_to_dict), including id, timestamp and source."""
    trace_parent: str = ""
    """The W3C traceparent of the call (or user event) that caused it, when traced."""


class EventBatch(_Model):
    """What one stream message carries: events in id order, or a transient status update."""

    events: list[Event] = Field(default_factory=list)
    status_update: dict[str, Any] | None = None


class Page(_Model, Generic[T]):
    items: list[T]
    next_page_token: str = ""
    """Pass as page_token for the next page; empty on the last page."""


class SendResult(_Model):
    conversation_id: str
    event_id: int


class BusyPolicy(StrEnum):
    """What a message sent while the agent is busy (running) does."""

    ENQUEUE = "enqueue"
    """It is logged and waits for the agent (OpenHands' behaviour)."""
    REJECT = "reject"
    """FailedPreconditionError, reason CONVERSATION_BUSY (metadata: agent_state)."""
    INTERRUPT = "interrupt"
    """The agent is interrupted first, then the message is logged."""


class AgentControl(StrEnum):
    """What control_agent asks of a conversation's agent."""

    PAUSE = "pause"
    RESUME = "resume"
    INTERRUPT = "interrupt"


class ApprovalDecision(StrEnum):
    """What confirm_action decides about the pending action."""

    APPROVE = "approve"
    REJECT = "reject"


class ControlResult(_Model):
    conversation_id: str
    event_id: int | None
    """The change_agent_state event written; None when the control had nothing to do."""
    agent_state: str


class HeartbeatResult(_Model):
    connection_count: int
    ttl_seconds: float


class ChangeKind(StrEnum):
    CREATED = "CREATED"
    STATUS_CHANGED = "STATUS_CHANGED"
    AGENT_STATE_CHANGED = "AGENT_STATE_CHANGED"
    CONNECTIONS_CHANGED = "CONNECTIONS_CHANGED"
    QUEUE_POSITION_CHANGED = "QUEUE_POSITION_CHANGED"
    CLOSED = "CLOSED"
    """The loop stopped (or its queued start gave up): forget it until it appears again."""
    PENDING_ACTION_CHANGED = "PENDING_ACTION_CHANGED"
    """Its agent proposed an action and waits to have it approved (``pending_action``)."""
    UPDATED = "UPDATED"
    """Its labels or title changed."""


class WatchedConversation(_Model):
    conversation: Conversation
    connection_ids: list[str] = Field(default_factory=list)


class ConversationChange(_Model):
    kind: ChangeKind
    watched: WatchedConversation
    change_time: datetime | None = None


class WatchUpdate(_Model):
    """What a watch yields: a whole snapshot (replace what you knew) or changes in order."""

    snapshot: list[WatchedConversation] | None = None
    changes: list[ConversationChange] = Field(default_factory=list)
    resume_token: str = ""
    """Pass to watch_conversations to continue after this update."""


class Permission(StrEnum):
    """What a scoped token allows."""

    READ = "read"
    """GetConversation, ListConversations, ListConnections, SearchEvents, StreamEvents,
    WatchConversations."""
    WRITE = "write"
    """SendEvent, Connect, JoinConversation, DisconnectConnection."""
    ADMIN = "admin"
    """StartConversation, CloseConversation."""


class ScopedToken(_Model):
    token: str
    """Send as the client's ``token`` (``authorization: Bearer <token>``)."""
    token_id: str
    """Revoke it with this."""
    expire_time: datetime


class AuditEntry(_Model):
    """One recorded mutation."""

    sequence: int
    time: datetime | None = None
    credential: str
    """"service", "token", "anonymous" or "unauthenticated" (credentials refused)."""
    subject: str = ""
    token_id: str = ""
    method: str
    user_id: str = ""
    conversation_id: str = ""
    connection_id: str = ""
    request_id: str = ""
    code: str
    """"OK" or the gRPC status code's name."""
    reason: str = ""
    affected_token_id: str = ""


class WebhookEventType(StrEnum):
    """What a webhook endpoint is told of (the message's ``type``)."""

    FINISHED = "conversation.finished"
    ERROR = "conversation.error"
    AWAITING_USER = "conversation.awaiting_user"
    AWAITING_CONFIRMATION = "conversation.awaiting_confirmation"
    CLOSED = "conversation.closed"
    EVICTED = "conversation.evicted"


class Webhook(_Model):
    webhook_id: str
    url: str
    event_types: list[WebhookEventType] = Field(default_factory=list)
    """Every type when empty."""
    secret: str = ""
    """The signing secret: only in create_webhook's answer."""
    description: str = ""
    create_time: datetime | None = None


class WebhookDeliveryState(StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    DEAD = "DEAD"


class WebhookDelivery(_Model):
    delivery_id: str
    """The message's webhook-id, the same on every attempt."""
    webhook_id: str
    type: WebhookEventType
    conversation_id: str
    payload: dict[str, Any]
    state: WebhookDeliveryState
    attempts: int
    create_time: datetime | None = None
    next_attempt_time: datetime | None = None
    last_status_code: int = 0
    last_error: str = ""
    delivered_time: datetime | None = None
