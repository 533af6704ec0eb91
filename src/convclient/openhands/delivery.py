"""Which events a browser receives, as OpenHands' own server decides, on plain event dicts.

A new connection first gets its backlog the way OpenHands' connect handler replays it, then
live events the way a running session sends them.
"""

from __future__ import annotations

from typing import Any

EventDict = dict[str, Any]

# Environment observations a live session forwards to the browser, relabelled as the agent's.
_FORWARDED_ENVIRONMENT_OBSERVATIONS = {"run", "agent_state_changed", "recall", "error"}


def is_agent_state_change(event: EventDict) -> bool:
    return event.get("observation") == "agent_state_changed"


def replayed(event: EventDict) -> bool:
    """Whether the connect handler's replay sends this stored event (agent state changes are
    held back and only the last one is sent, after the rest)."""
    if event.get("action") in ("null", "recall") or event.get("observation") == "null":
        return False
    return not is_agent_state_change(event)


def live_view(event: EventDict) -> EventDict | None:
    """The dict a running session emits for a new event, or None when it emits nothing."""
    if event.get("action") == "null" or event.get("observation") == "null":
        return None
    source = event.get("source")
    if source in ("agent", "user"):
        return event
    if source == "environment" and event.get("observation") in _FORWARDED_ENVIRONMENT_OBSERVATIONS:
        return {**event, "source": "agent"}
    return None
