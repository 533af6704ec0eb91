"""The event encoding shared by disk and wire: what goes in comes back out."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from convsvc.codec import decode_event, encode_event
from convsvc.domain import Event, EventKind
from convsvc.v1 import conversation_service_pb2 as pb


@pytest.mark.parametrize(
    "timestamp",
    [
        datetime(2026, 11, 25, 7, 41, 4, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch
    ],
)
def test_an_event_survives_encoding_to_the_microsecond(timestamp: datetime) -> None:
    payload = {
        "id": 7,
        "timestamp": timestamp.isoformat(),
        "source": "agent",
        "action": "message",
        "message": "hi",
        "args": {"content": "hi", "image_urls": None, "wait_for_response": True, "n": [1, 2.5]},
    }
    event = Event("c1", 7, timestamp, "agent", EventKind.ACTION, "message", payload)
    encoded = encode_event(event)
    decoded = decode_event(encoded)
    assert (decoded.conversation_id, decoded.id, decoded.source, decoded.name) == (
        "c1",
        7,
        "agent",
        "message",
    )
    assert decoded.kind is EventKind.ACTION
    assert decoded.timestamp == timestamp
    assert decoded.payload == payload
    wire = pb.Event.FromString(encoded)
    assert wire.timestamp.ToDatetime(tzinfo=UTC) == timestamp
    assert 0 <= wire.timestamp.nanos < 1_000_000_000
