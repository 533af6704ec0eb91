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


class HeartbeatResult(_Model):
    connection_count: int
    ttl_seconds: float
