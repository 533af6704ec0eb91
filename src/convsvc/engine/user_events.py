"""What users send into a log: checked, limited, and stripped of what only the server sets."""

from __future__ import annotations

from collections.abc import Sequence

from convsvc import validation
from convsvc.config import EngineConfig
from convsvc.domain import JsonObject
from convsvc.errors import InvalidArgument

SERVER_SET_FIELDS = ("id", "timestamp", "source")


def user_payload(event: JsonObject) -> JsonObject:
    """A user event without the fields the log sets, shaped as OpenHands renders it."""
    payload = {k: v for k, v in event.items() if k not in SERVER_SET_FIELDS}
    args = payload.get("args")
    if payload.get("action") == "message" and "message" not in payload and isinstance(args, dict):
        # OpenHands' event_to_dict renders a MessageAction's content as "message" too.
        payload["message"] = args.get("content", "")
    return payload


def checked_user_payload(
    field: str, event: JsonObject, config: EngineConfig
) -> tuple[JsonObject, int]:
    """A user event's payload and its encoded size, refused when it is not an action or is
    larger than a user event may be."""
    payload = user_payload(validation.check_user_event(event, field))
    return payload, validation.check_event_size(field, payload, config.max_event_bytes)


def first_events(
    initial_user_message: JsonObject | None,
    replay_events: Sequence[JsonObject],
    config: EngineConfig,
) -> tuple[list[JsonObject], int]:
    """The user events a start appends after ``loading``, each checked like a send, and
    their encoded size together."""
    limit = config.max_replay_events
    if len(replay_events) > limit:
        raise InvalidArgument(
            f"replay_events holds {len(replay_events)} events; the limit is {limit}",
            reason="TOO_MANY_REPLAY_EVENTS",
            metadata={"field": "replay_events", "limit": str(limit)},
        )
    first: list[JsonObject] = []
    total = 0
    if initial_user_message is not None:
        payload, size = checked_user_payload("initial_user_message", initial_user_message, config)
        first.append(payload)
        total += size
    for replayed in replay_events:
        # A trajectory replays only what its user did; the agent produces the rest anew.
        if replayed.get("source") == "user" and isinstance(replayed.get("action"), str):
            payload, size = checked_user_payload("replay_events", replayed, config)
            first.append(payload)
            total += size
    return first, total
