"""JSON objects <-> ``google.protobuf.Struct``: how events and settings travel in convsvc's
protocol. Used by the client, agent workers and the server alike, so the rule below is
written once.

JSON numbers travel as doubles: integers are exact up to 2^53, and an integral double is
turned back into an int on the way out (OpenHands' ids and counts are ints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

JsonObject = dict[str, Any]


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a Struct."""
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def struct_to_dict(struct: struct_pb2.Struct) -> JsonObject:
    """A Struct as a JSON object, with integral numbers as ints."""
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None
