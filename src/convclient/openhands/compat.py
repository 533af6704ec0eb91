"""Differences between the OpenHands releases we plug into."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version


def openhands_version() -> tuple[int, int]:
    try:
        found = re.match(r"(\d+)\.(\d+)", version("openhands-ai"))
    except PackageNotFoundError:  # a source checkout: assume the newest behaviour
        return (0, 62)
    return (int(found[1]), int(found[2])) if found else (0, 62)


def replays_through_join() -> bool:
    """Whether OpenHands' socket.io connect handler replays a new connection's backlog from
    the event store that join_conversation returns (0.41), rather than from its own file
    store before joining (0.42 and later, where the adapter must replay it itself)."""
    return openhands_version() < (0, 42)
