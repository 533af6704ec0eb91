"""The webhook outbox both backends keep: what a commit notifies, the message an endpoint
receives, and stored rows as domain types.

A notification is written in the same transaction as the change that caused it (the event
that reported an agent state, the record of a closed conversation), one delivery row per
endpoint that wants its type. Deliveries are then sent from the table, so nothing
acknowledged is lost and each has one stable id whatever the retries.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from convsvc.domain import (
    DeliveryState,
    Event,
    EventKind,
    Notification,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventType,
)

NOTIFIED_STATES = {
    "finished": WebhookEventType.FINISHED,
    "error": WebhookEventType.ERROR,
    "awaiting_user_input": WebhookEventType.AWAITING_USER,
    "awaiting_user_confirmation": WebhookEventType.AWAITING_CONFIRMATION,
}
"""Agent states an endpoint is told of, by the type it is told of them as."""

WEBHOOK_COLUMNS = "webhook_id, url, event_types, secret, description, create_time"
DELIVERY_COLUMNS = (
    "delivery_id, webhook_id, type, conversation_id, payload, state, attempts, create_time, "
    "next_attempt_time, last_status_code, last_error, delivered_time"
)


def notifications_in(events: Sequence[Event]) -> list[Notification]:
    """What a batch of logged events notifies: the agent states endpoints are told of."""
    found = []
    for event in events:
        if event.name != "agent_state_changed" or event.kind is not EventKind.OBSERVATION:
            continue
        extras = event.payload.get("extras") or {}
        state = str(extras.get("agent_state", ""))
        kind = NOTIFIED_STATES.get(state)
        if kind is not None:
            found.append(
                Notification(
                    kind,
                    event.conversation_id,
                    None,
                    event.timestamp,
                    {"agent_state": state, "event_id": event.id},
                )
            )
    return found


def message(notification: Notification) -> tuple[str, str]:
    """A new notification's id (``msg_...``, the delivery ids' stem) and the JSON body every
    endpoint gets (Standard Webhooks' type, timestamp and data)."""
    data: dict[str, Any] = {"conversation_id": notification.conversation_id, **notification.data}
    if notification.user_id is not None:
        data["user_id"] = notification.user_id
    body = {
        "type": notification.type.value,
        "timestamp": notification.time.isoformat(),
        "data": data,
    }
    return f"msg_{uuid.uuid4().hex}", json.dumps(body, separators=(",", ":"))


def _time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def endpoint(row: Sequence[Any]) -> WebhookEndpoint:
    webhook_id, url, event_types, secret, description, create_time = row
    types = json.loads(event_types) if isinstance(event_types, str) else list(event_types)
    created = _time(create_time)
    assert created is not None
    return WebhookEndpoint(
        webhook_id,
        url,
        tuple(WebhookEventType(t) for t in types),
        secret,
        description,
        created,
    )


def delivery(row: Sequence[Any]) -> WebhookDelivery:
    (
        delivery_id,
        webhook_id,
        kind,
        conversation_id,
        payload,
        state,
        attempts,
        create_time,
        next_attempt_time,
        last_status_code,
        last_error,
        delivered_time,
    ) = row
    created = _time(create_time)
    assert created is not None
    return WebhookDelivery(
        delivery_id=delivery_id,
        webhook_id=webhook_id,
        type=WebhookEventType(kind),
        conversation_id=conversation_id,
        payload=json.loads(payload),
        state=DeliveryState(state),
        attempts=attempts,
        create_time=created,
        next_attempt_time=_time(next_attempt_time),
        last_status_code=last_status_code,
        last_error=last_error,
        delivered_time=_time(delivered_time),
    )
