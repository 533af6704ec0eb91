"""Domain types of the engine: plain dataclasses, free of protobuf and gRPC."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

JsonObject = dict[str, Any]


class ConversationStatus(enum.StrEnum):
    """OpenHands' ConversationStatus values that an agent loop can be in."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    QUEUED = "QUEUED"
    """Not OpenHands': a start waiting for a free slot under the per-user limit."""


class AdmissionPolicy(enum.StrEnum):
    """What a start does when its user already runs as many conversations as allowed."""

    EVICT_OLDEST = "evict_oldest"
    """OpenHands' behaviour: the least recently active loops stop to make room."""
    EVICT_IDLE_ONLY = "evict_idle_only"
    """Like EVICT_OLDEST, but a loop whose agent is running is never stopped."""
    REJECT = "reject"
    """Nothing is stopped; the start fails."""
    QUEUE = "queue"
    """The start waits for one of the user's loops to stop."""


class BusyPolicy(enum.StrEnum):
    """What a message sent while the agent is busy does (see ``engine.run_control``)."""

    ENQUEUE = "enqueue"
    """OpenHands' behaviour: the message is logged and waits for the agent."""
    REJECT = "reject"
    """The send is refused with CONVERSATION_BUSY."""
    INTERRUPT = "interrupt"
    """The agent is interrupted, then the message is logged."""


class AgentControl(enum.StrEnum):
    """What ControlAgent asks of a conversation's agent."""

    PAUSE = "pause"
    RESUME = "resume"
    INTERRUPT = "interrupt"


class ApprovalDecision(enum.StrEnum):
    """What ConfirmAction decides about an action awaiting confirmation."""

    APPROVE = "approve"
    REJECT = "reject"


class SecurityRisk(enum.StrEnum):
    """The risk an agent or a security analyzer gave an action (OpenHands'
    ActionSecurityRisk, whose values -1 to 2 these names stand for)."""

    UNKNOWN = "unknown"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(slots=True, frozen=True)
class PendingAction:
    """An action the agent proposed and waits to have approved (confirmation mode)."""

    event_id: int
    """The action event awaiting confirmation: ConfirmAction names it."""
    action: str
    """The action type, for example "run", "run_ipython", "edit" or "browse_interactive"."""
    content: str
    """What it would do: the command, the code, the file and its text, the URL."""
    security_risk: SecurityRisk | None
    """None when the action states none."""
    thought: str = ""


class EventKind(enum.StrEnum):
    """OpenHands splits events into actions and observations."""

    ACTION = "action"
    OBSERVATION = "observation"


class EventSource(enum.StrEnum):
    """Who produced an event, as OpenHands' EventSource names it."""

    USER = "user"
    AGENT = "agent"
    ENVIRONMENT = "environment"


@dataclass(slots=True)
class ConversationRecord:
    """What the store keeps of a conversation (settings already stripped of secrets)."""

    conversation_id: str
    user_id: str | None
    agent: str
    settings: JsonObject
    create_time: datetime
    last_active_time: datetime
    labels: dict[str, str] = field(default_factory=dict)
    """The caller's own key/value tags, set at start or by UpdateConversation; searchable."""
    title: str = ""
    running: bool = False
    """Whether its loop runs (kept in the store, for searches over stored conversations)."""


@dataclass(slots=True)
class ConversationView:
    """A conversation as callers see it: the record plus its live state."""

    conversation_id: str
    user_id: str | None
    agent: str
    status: ConversationStatus
    agent_state: str
    latest_event_id: int
    create_time: datetime
    last_active_time: datetime
    connection_count: int
    queue_position: int = 0
    """For a QUEUED start: 1 for the next to run; otherwise 0."""
    owner_address: str = ""
    """In a cluster, the address of the node that runs or queued it (clients may call it)."""
    pending_action: PendingAction | None = None
    """The action awaiting confirmation while the agent waits for one."""
    labels: dict[str, str] = field(default_factory=dict)
    title: str = ""


@dataclass(slots=True, frozen=True)
class ConversationSearch:
    """What SearchConversations asks of the store: filters (each optional, all must hold)
    and where the page starts, in order of last activity (newest first)."""

    user_id: str | None = None
    """None: every user's (a trusted call)."""
    conversation_ids: frozenset[str] = frozenset()
    running: bool | None = None
    """True: only running ones; False: only stopped ones; None: both."""
    agent_states: frozenset[str] = frozenset()
    agents: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    title_contains: str = ""
    """Case-insensitive."""
    created_after: datetime | None = None
    created_before: datetime | None = None
    active_after: datetime | None = None
    active_before: datetime | None = None
    after: tuple[datetime, str] | None = None
    """The (last activity, id) of the previous page's last conversation."""
    limit: int = 100


@dataclass(slots=True, frozen=True)
class StoredConversation:
    """A conversation as SearchConversations finds it in the store."""

    record: ConversationRecord
    agent_state: str
    latest_event_id: int


@dataclass(slots=True, frozen=True)
class Connection:
    """A connection (a browser socket held by a web server) joined to a conversation."""

    connection_id: str
    conversation_id: str
    user_id: str | None
    client_instance_id: str | None


@dataclass(slots=True)
class Event:
    """One event of a conversation's log.

    ``payload`` is the whole OpenHands event dict (``id``, ``timestamp`` and ``source``
    included); ``encoded`` is its wire/disk encoding, made once when the event is appended.
    """

    conversation_id: str
    id: int
    timestamp: datetime
    source: str
    kind: EventKind
    name: str
    payload: JsonObject
    encoded: bytes = field(default=b"", repr=False)
    trace_parent: str = ""
    """The W3C traceparent of the call (or user event) that caused it; "" untraced."""


class StoredEvent(NamedTuple):
    """An event as the store returns it: its id and its encoding, ready to stream.

    A named tuple: a catch-up makes one per event it reads, and ``StoredEvent._make`` turns a
    database row into one three times faster than a frozen dataclass is built.
    """

    id: int
    encoded: bytes


@dataclass(slots=True, frozen=True)
class StatusUpdate:
    """A transient status update for a conversation's live streams (never logged), with its
    wire encoding, made once however many streams send it (see ``codec.status_update``)."""

    payload: JsonObject
    encoded: bytes


@dataclass(slots=True, frozen=True)
class IdempotencyRecord:
    """The first answer to a mutating call made with a request id (AIP-155)."""

    scope: str
    request_id: str
    method: str
    fingerprint: str
    result: JsonObject


@dataclass(slots=True, frozen=True)
class AuditEntry:
    """One recorded mutation: who made it, what it was and how it ended."""

    time: datetime
    credential: str
    """"service", "token", "anonymous" or "unauthenticated"."""
    subject: str
    token_id: str
    method: str
    user_id: str
    conversation_id: str
    connection_id: str
    request_id: str
    code: str
    """"OK" or the gRPC status code's name."""
    reason: str
    affected_token_id: str = ""
    """For MintToken and RevokeToken: the token minted or revoked."""
    sequence: int = 0
    """Given by the store (0 until stored)."""
    entry_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Unique per entry: an entry retried after a commit of unknown outcome is stored once."""


@dataclass(slots=True, frozen=True)
class AuditQuery:
    """Which audit entries to read: those after ``after`` matching the filters."""

    after: int = 0
    conversation_id: str = ""
    user_id: str = ""
    limit: int = 100


class WebhookEventType(enum.StrEnum):
    """What a webhook endpoint may be told of, as the Standard Webhooks ``type`` names it."""

    FINISHED = "conversation.finished"
    """The agent reported ``finished``."""
    ERROR = "conversation.error"
    """The agent reported ``error``."""
    AWAITING_USER = "conversation.awaiting_user"
    """The agent waits for the user (``awaiting_user_input``)."""
    AWAITING_CONFIRMATION = "conversation.awaiting_confirmation"
    """The agent waits for an approval (``awaiting_user_confirmation``)."""
    CLOSED = "conversation.closed"
    """Its loop stopped (CloseConversation, idle cleanup, the server stopping)."""
    EVICTED = "conversation.evicted"
    """Its loop stopped to make room under its user's limit."""


@dataclass(slots=True, frozen=True)
class Notification:
    """A change webhooks tell of, committed with the change that caused it."""

    type: WebhookEventType
    conversation_id: str
    user_id: str | None
    time: datetime
    data: JsonObject = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class WebhookEndpoint:
    webhook_id: str
    url: str
    event_types: tuple[WebhookEventType, ...]
    """The types it is sent; all when empty."""
    secret: str
    """The Standard Webhooks signing secret ("whsec_" and base64)."""
    description: str
    create_time: datetime


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    """Given up after the last attempt."""


@dataclass(slots=True, frozen=True)
class WebhookDelivery:
    """One notification to one endpoint, and how sending it went."""

    delivery_id: str
    """Stable across attempts: the Standard Webhooks ``webhook-id``."""
    webhook_id: str
    type: WebhookEventType
    conversation_id: str
    payload: JsonObject
    state: DeliveryState
    attempts: int
    create_time: datetime
    next_attempt_time: datetime | None
    last_status_code: int = 0
    last_error: str = ""
    delivered_time: datetime | None = None


@dataclass(slots=True, frozen=True)
class DeliveryQuery:
    """What ListWebhookDeliveries asks for (filters optional), newest first."""

    webhook_id: str = ""
    conversation_id: str = ""
    states: frozenset[DeliveryState] = frozenset()
    after: tuple[datetime, str] | None = None
    """The (create time, id) of the previous page's last delivery."""
    limit: int = 100


@dataclass(slots=True, frozen=True)
class WorkerView:
    """An attached agent worker, as ListWorkers shows it."""

    worker_id: str
    kinds: tuple[str, ...]
    capacity: int
    conversation_ids: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class NodeView:
    """A live node of a cluster, as ListWorkers shows it."""

    node_id: str
    address: str
    heartbeat_time: datetime
    lease_expire_time: datetime
    conversation_count: int
    agent_kinds: tuple[str, ...]
