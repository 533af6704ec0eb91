"""What the agent-server API reads out of convsvc's log: the SDK's events (logged wrapped by
the ``openhands-sdk`` worker kind), the latest snapshot of a conversation's state, and the
mapping between the SDK's execution status and convsvc's agent state.

Pure functions over JSON: no I/O, so the rules are tested alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

JsonObject = dict[str, Any]

AGENT_KIND = "openhands-sdk"
SDK_EVENT = "agent_server_event"
"""The observation name the worker logs an SDK event under."""
LABEL = "agent-server"
"""The label that marks a conversation started through this API, and its state."""
ACTIVE, DELETED = "active", "deleted"

_STATUS_OF_AGENT_STATE = {
    "awaiting_user_input": "idle",
    "running": "running",
    "paused": "paused",
    "stopped": "paused",  # interrupted: paused, as the SDK reports an interrupt
    "awaiting_user_confirmation": "waiting_for_confirmation",
    "finished": "finished",
    "error": "error",
    "loading": "idle",
}
EXECUTION_STATUSES = frozenset(
    {"idle", "running", "paused", "waiting_for_confirmation", "finished", "error", "stuck"}
)


def execution_status(agent_state: str) -> str:
    """The SDK's execution status for convsvc's agent state."""
    return _STATUS_OF_AGENT_STATE.get(agent_state, "idle")


def sdk_event(payload: JsonObject) -> JsonObject | None:
    """The SDK event a logged payload wraps; None for convsvc's own records."""
    if payload.get("observation") != SDK_EVENT:
        return None
    event = payload.get("event")
    return event if isinstance(event, dict) else None


def snapshot(payload: JsonObject) -> JsonObject | None:
    """The files and info an ``agent_state_changed`` record of the worker holds, if any."""
    if payload.get("observation") != "agent_state_changed":
        return None
    files = (payload.get("extras") or {}).get("agent_server")
    return files if isinstance(files, dict) else None


def _message_text(event: JsonObject) -> str | None:
    """The text a ``body`` filter searches, as the stock server matches it: only a
    MessageEvent's content, extended content and reasoning; None for other events."""
    if event.get("kind") != "MessageEvent":
        return None
    message = event.get("llm_message") or {}
    parts = _content_texts(message.get("content")) + _content_texts(event.get("extended_content"))
    if isinstance(event.get("reasoning_content"), str):
        parts.append(event["reasoning_content"])
    return " ".join(parts)


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p]
    return []


def server_time(value: datetime) -> str:
    """A filter's datetime as the stock server compares it: naive server-local ISO text
    (the SDK's timestamps are naive local times, compared as strings)."""
    naive = value.astimezone(None).replace(tzinfo=None) if value.tzinfo else value
    return naive.isoformat()


def matches(
    event: JsonObject,
    *,
    kind: str | None = None,
    source: str | None = None,
    body: str | None = None,
    timestamp_gte: str | None = None,
    timestamp_lt: str | None = None,
) -> bool:
    """Whether an SDK event passes the filters of events/search and events/count (timestamps
    as :func:`server_time` gives them)."""
    if (
        kind is not None
        and event.get("kind") != kind
        and not kind.endswith(f".{event.get('kind')}")
    ):
        return False
    if source is not None and event.get("source") != source:
        return False
    stamp = str(event.get("timestamp", ""))
    if timestamp_gte is not None and stamp < timestamp_gte:
        return False
    if timestamp_lt is not None and stamp >= timestamp_lt:
        return False
    if body is not None:
        text = _message_text(event)
        return text is not None and body.lower() in text.lower()
    return True
