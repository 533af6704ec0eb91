"""Checks on what callers send, with messages a person can act on."""

from __future__ import annotations

import json
import re
from typing import Any

from convclient.structs import dict_to_struct
from convsvc.errors import InvalidArgument

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@+|-]{1,255}")
ID_RULE = "1 to 128 characters of A-Z a-z 0-9 _ . : -"


def shown(value: str, limit: int = 40) -> str:
    """A caller's value as an error message may quote it: never longer than ``limit``, so
    that no input can blow up a status (whose size gRPC limits)."""
    return value if len(value) <= limit else value[:limit] + "..."


def check_id(kind: str, value: str) -> str:
    """Returns ``value`` if it is a valid id of ``kind`` (e.g. "conversation_id")."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{kind} {shown(value)!r} is not valid: use {ID_RULE}",
            reason="INVALID_ID",
            metadata={"field": kind},
        )
    return value


def check_optional_id(kind: str, value: str) -> str | None:
    """Like :func:`check_id` but an empty value means "none"."""
    return check_id(kind, value) if value else None


def check_user_id(value: str) -> str | None:
    """Returns the user id, or None for an empty (trusted, service-wide) one."""
    if not value:
        return None
    if not USER_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            "user_id is not valid: use 1 to 255 characters of A-Z a-z 0-9 _ . : @ + | -",
            reason="INVALID_ID",
            metadata={"field": "user_id"},
        )
    return value


def check_user_event(event: dict[str, Any], field: str) -> dict[str, Any]:
    """Validates an event a user sends: a JSON object with a non-empty string ``action``."""
    action = event.get("action")
    if not isinstance(action, str) or not action or len(action) > 128:
        raise InvalidArgument(
            f'{field} must be a JSON object with a non-empty string "action" of at most 128 '
            'characters, e.g. {"action": "message", "args": {"content": "hi"}}',
            reason="INVALID_EVENT",
            metadata={"field": field},
        )
    return event


def encoded_size(payload: dict[str, Any]) -> int:
    """The size of a payload in the event encoding (what is stored and streamed)."""
    return int(dict_to_struct(payload).ByteSize())


def check_event_size(field: str, payload: dict[str, Any], max_bytes: int) -> int:
    """Rejects an event payload whose encoding is larger than ``max_bytes``; returns its
    size."""
    size = encoded_size(payload)
    if size > max_bytes:
        raise too_large(field, f"{size} bytes once encoded", max_bytes)
    return size


def too_large(field: str, size: str, max_bytes: int) -> InvalidArgument:
    """PAYLOAD_TOO_LARGE for ``field``, which is ``size`` (e.g. "5 bytes as JSON")."""
    return InvalidArgument(
        f"{field} is {size}; the limit is {max_bytes}",
        reason="PAYLOAD_TOO_LARGE",
        metadata={"field": field, "limit_bytes": str(max_bytes)},
    )


def check_size(field: str, value: Any, max_bytes: int) -> int:
    """Rejects a JSON value whose encoding is larger than ``max_bytes``; returns its size."""
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > max_bytes:
        raise too_large(field, f"{size} bytes as JSON", max_bytes)
    return size


def check_page_size(page_size: int, default: int, maximum: int) -> int:
    """Turns a requested page size into the one to use (AIP-158)."""
    if page_size < 0:
        raise InvalidArgument(
            f"page_size must not be negative (got {page_size})",
            reason="INVALID_PAGE_SIZE",
            metadata={"field": "page_size"},
        )
    return min(page_size or default, maximum)


LABEL_KEY_PATTERN = re.compile(r"[a-z0-9]([a-z0-9_./-]{0,62})")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_TITLE = 512


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """A conversation's labels: at most 64, keys of 1 to 63 characters of a-z 0-9 _ . / -
    (starting with a letter or digit), values of at most 256 characters."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(
            f"labels holds {len(labels)} labels; at most {MAX_LABELS} are allowed",
            reason="INVALID_LABELS",
            metadata={"field": "labels"},
        )
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.fullmatch(key):
            raise InvalidArgument(
                f"label key {shown(key)!r} is not valid: use 1 to 63 characters of "
                "a-z 0-9 _ . / - starting with a letter or digit",
                reason="INVALID_LABELS",
                metadata={"field": "labels", "key": shown(key)},
            )
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidArgument(
                f"the value of label {key!r} has {len(value)} characters; at most "
                f"{MAX_LABEL_VALUE} are allowed",
                reason="INVALID_LABELS",
                metadata={"field": "labels", "key": key},
            )
    return dict(labels)


def check_title(title: str, field: str = "title") -> str:
    if len(title) > MAX_TITLE:
        raise InvalidArgument(
            f"{field} has {len(title)} characters; at most {MAX_TITLE} are allowed",
            reason="INVALID_ARGUMENT",
            metadata={"field": field},
        )
    return title
