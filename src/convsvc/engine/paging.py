"""Opaque page tokens (AIP-158) bound to the query that produced them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from convsvc.errors import InvalidArgument


def _query_key(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_token(query: Any, position: Any) -> str:
    """A token for the page that starts at ``position`` of ``query``."""
    raw = json.dumps({"q": _query_key(query), "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, query: Any) -> Any:
    """The position a token names; it must come from the same query."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(data, dict) or "p" not in data:
            raise ValueError("not a page token")
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            "page_token is not a token this service issued; omit it to start from the first page",
            reason="INVALID_PAGE_TOKEN",
            metadata={"field": "page_token"},
        ) from exc
    if data.get("q") != _query_key(query):
        raise InvalidArgument(
            "page_token belongs to a request with other arguments; repeat them unchanged",
            reason="INVALID_PAGE_TOKEN",
            metadata={"field": "page_token"},
        )
    return data["p"]
