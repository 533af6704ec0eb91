"""The messages between the worker pool and its workers, as the engine side sees them: what
convsvc tells a worker (the transport turns them into ``AttachResponse``) and the events a
worker sends back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convsvc.domain import JsonObject


@dataclass(frozen=True, slots=True)
class AssignMessage:
    conversation_id: str
    assignment: int
    agent_kind: str
    user_id: str
    settings: Mapping[str, Any]
    next_event_id: int
    initial_user_message: JsonObject | None
    replay_events: tuple[JsonObject, ...]


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    conversation_id: str
    assignment: int
    events: list[bytes]
    """Stored encodings (JSON objects with id, timestamp and source)."""


@dataclass(frozen=True, slots=True)
class DeliverMessage:
    conversation_id: str
    assignment: int
    delivery_id: str
    payload: JsonObject
    trace_parent: str = ""


@dataclass(frozen=True, slots=True)
class StopMessage:
    conversation_id: str
    assignment: int


@dataclass(frozen=True, slots=True)
class CompletionMessage:
    conversation_id: str
    assignment: int
    request_id: str
    service_id: str
    llm_config: JsonObject
    messages: list[JsonObject]


Outgoing = AssignMessage | HistoryMessage | DeliverMessage | StopMessage | CompletionMessage


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """An event a worker numbered."""

    id: int
    source: str
    payload: JsonObject
    delivery_id: str
