"""The event encoding shared by disk and wire: what goes in comes back out."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from convsvc.codec import decode_event, encode_event, encode_event_batch
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


def encoded_event_of_size(event_id: int, size: int) -> bytes:
    """An encoded event exactly ``size`` bytes long (its text grown until it fits)."""
    for length in range(max(size - 120, 0), size):
        payload = {"action": "note", "args": {"text": "x" * length}}
        event = Event(
            "c1",
            event_id,
            datetime(2026, 12, 7, tzinfo=UTC),
            "user",
            EventKind.ACTION,
            "note",
            payload,
        )
        encoded = encode_event(event)
        if len(encoded) == size:
            return encoded
    raise AssertionError(f"no event encodes to {size} bytes")


def test_a_batch_of_encoded_events_is_a_stream_response_whatever_their_sizes() -> None:
    # Lengths below 16 KiB come from a table, longer ones are encoded: both edges crossed.
    sizes = [127, 128, 16_383, 16_384, 70_000]
    events = [encoded_event_of_size(n, size) for n, size in enumerate(sizes)]
    assert [len(e) for e in events] == sizes
    response = pb.StreamEventsResponse.FromString(encode_event_batch(events))
    assert [e.id for e in response.events] == list(range(len(sizes)))
    # Compared as messages: re-serialising a Struct may order its map entries differently.
    assert list(response.events) == [pb.Event.FromString(e) for e in events]
