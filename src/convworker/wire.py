"""The framing between the worker process and its conversation processes: one JSON object
per line over a Unix socket (the socket never leaves the machine; secrets cross it in
memory only)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

LINE_LIMIT = 256 * 1024 * 1024
"""The longest line (an assignment carries the conversation's whole history)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream."""
    line = await reader.readline()
    if not line:
        return None
    message: dict[str, Any] = json.loads(line)
    return message
