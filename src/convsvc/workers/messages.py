"""The messages between the worker pool and its workers, as the engine side sees them: what
convsvc tells a worker (the transport turns them into ``AttachResponse``) and the events a
worker sends back."""

from __future__ import annotations

import json
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
    payload_bytes: int = 0
    """The payload's encoded size (measured where the send entered)."""


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


_SMALL = 256
"""What a message without payloads is counted as."""


def message_size(message: Outgoing) -> int:
    """About how many bytes a message takes on its way to the worker (what its outbox is
    bounded by)."""
    if isinstance(message, HistoryMessage):
        return _SMALL + sum(len(encoded) for encoded in message.events)
    if isinstance(message, DeliverMessage):
        return _SMALL + message.payload_bytes
    if isinstance(message, AssignMessage):
        first = [message.initial_user_message, *message.replay_events]
        return _SMALL + _json_size(dict(message.settings)) + sum(_json_size(e) for e in first)
    if isinstance(message, CompletionMessage):
        return _SMALL + _json_size(message.llm_config) + _json_size({"m": message.messages})
    return _SMALL


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))
