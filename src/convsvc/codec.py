"""The one encoding of events, on disk and on the wire.

An event is stored as a serialized ``convsvc.v1.Event``. Using the wire message as the disk
format means a stream or search sends stored events without decoding and re-encoding them:
a ``repeated Event`` field is the concatenation of its tagged, length-prefixed elements.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from convclient.structs import dict_to_struct, struct_to_dict
from convsvc.domain import Event, EventKind, JsonObject, StatusUpdate
from convsvc.v1 import conversation_service_pb2 as pb

_KIND_TO_PB = {
    EventKind.ACTION: pb.EVENT_KIND_ACTION,
    EventKind.OBSERVATION: pb.EVENT_KIND_OBSERVATION,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_REPEATED_EVENTS_TAG = b"\x0a"  # field 1 (events), wire type 2 (length-delimited)


def encode_event(event: Event) -> bytes:
    """Serializes an event as a ``convsvc.v1.Event``."""
    # Integer microseconds since the epoch (exact, unlike a float), handed to the constructor:
    # a third cheaper than Timestamp.FromDatetime, and this runs for every event.
    micros = (event.timestamp - _EPOCH) // _MICROSECOND
    message = pb.Event(
        conversation_id=event.conversation_id,
        id=event.id,
        timestamp=timestamp_pb2.Timestamp(
            seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000
        ),
        source=event.source,
        kind=_KIND_TO_PB[event.kind],
        name=event.name,
        trace_parent=event.trace_parent,
    )
    message.payload.update(event.payload)
    encoded: bytes = message.SerializeToString()
    return encoded


def decode_event(encoded: bytes) -> Event:
    """Parses a serialized ``convsvc.v1.Event`` back into a domain event."""
    message = pb.Event.FromString(encoded)
    kind = EventKind.ACTION if message.kind == pb.EVENT_KIND_ACTION else EventKind.OBSERVATION
    timestamp: datetime = message.timestamp.ToDatetime(tzinfo=UTC)
    return Event(
        conversation_id=message.conversation_id,
        id=message.id,
        timestamp=timestamp,
        source=message.source,
        kind=kind,
        name=message.name,
        payload=struct_to_dict(message.payload),
        encoded=encoded,
        trace_parent=message.trace_parent,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_message_field(field_number: int, encoded_message: bytes) -> bytes:
    """The bytes of a message field (length-delimited) holding an already encoded message."""
    return _varint(field_number << 3 | 2) + _varint(len(encoded_message)) + encoded_message


_SMALL_FRAMES = tuple(_REPEATED_EVENTS_TAG + _varint(size) for size in range(1 << 14))
"""The tag and length of an event field, for every size up to 16 KiB (most events): a
catch-up frames a thousand events per message and a lookup is several times cheaper than
encoding the varint."""


def encode_event_batch(encoded_events: list[bytes]) -> bytes:
    """Builds the bytes of a message whose field 1 is ``repeated Event`` from encoded events.

    Valid for ``StreamEventsResponse`` and ``SearchEventsResponse``, whose field 1 is the events.
    """
    small, limit = _SMALL_FRAMES, len(_SMALL_FRAMES)
    parts: list[bytes] = []
    for encoded in encoded_events:
        size = len(encoded)
        parts.append(small[size] if size < limit else _REPEATED_EVENTS_TAG + _varint(size))
        parts.append(encoded)
    return b"".join(parts)


def status_update(payload: JsonObject) -> StatusUpdate:
    """A status update and its encoding as a ``StreamEventsResponse`` of its own."""
    encoded = pb.StreamEventsResponse(status_update=dict_to_struct(payload)).SerializeToString()
    return StatusUpdate(payload, encoded)
